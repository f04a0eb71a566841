"""The anatomy rule on real designs, and user-named stages."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from tiny_models import TwoInputCells

import rmn_fx
from rmn_fx.errors import InputSizeError, NoDownsamplingError, StageError
from rmn_fx.measure import relative_error, spread_routes


def stages_of(model, size=64, stages=None):
    anatomy = rmn_fx.analyze(model, stages=stages, input_size=(3, size, size))
    return anatomy, [s.modules for s in anatomy.stages]


def test_vgg_stem_is_the_first_conv_pair_and_pool():
    anatomy, stages = stages_of(torchvision.models.vgg11())
    assert anatomy.graph_module.meta["rmn_part_modules"]["stem"] == ("features.0", "features.1", "features.2")
    assert len(stages) == 4 and stages[0][0] == "features.3"


def test_efficientnet_last_stage_keeps_the_conv_head():
    _, stages = stages_of(torchvision.models.efficientnet_b0())
    assert stages[0] == ("features.1",) and stages[-1][-1] == "features.8" and len(stages) == 5


def test_inception_valid_convs_are_not_downsampling():
    anatomy, stages = stages_of(torchvision.models.inception_v3(init_weights=False, aux_logits=False), size=299)
    assert [s.out_shape[-1] for s in anatomy.stages] == [147, 71, 35, 17, 8]
    assert stages[2] == ("maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d")


def test_swin_stages_are_channels_last():
    anatomy, stages = stages_of(timm.create_model("swin_tiny_patch4_window7_224"), size=224)
    assert stages[:3] == [("layers.0",), ("layers.1",), ("layers.2",)]
    assert {s.in_layout.name for s in anatomy.stages} == {"NHWC"}


def test_video_stages_pool_their_keys_over_frames_and_positions():
    """R3D: channels-first clips (NCTHW); Swin3D: channels-last (NTHWC). A key averages
    every axis but the channels."""
    from rmn_fx.nn.layout import LAYOUTS

    r3d = rmn_fx.analyze(torchvision.models.video.r3d_18(), input_size=(3, 4, 32, 32))
    assert [s.modules for s in r3d.stages] == [("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    assert {s.in_layout.name for s in r3d.stages} == {"NCTHW"}
    swin = rmn_fx.analyze(torchvision.models.video.swin3d_t(), input_size=(3, 4, 64, 64))
    assert {s.in_layout.name for s in swin.stages} == {"NTHWC"}
    clip = torch.randn(2, 5, 3, 4, 6)  # N, C, T, H, W
    assert torch.allclose(LAYOUTS["NCTHW"].pool(clip), clip.mean((2, 3, 4)))
    assert torch.allclose(LAYOUTS["NTHWC"].pool(clip.permute(0, 2, 3, 4, 1)), clip.mean((2, 3, 4)))


def test_segmentation_head_starts_at_the_upsampling_to_the_input():
    """FCN: the dilated ResNet keeps 1/8 after layer2, so the last stage runs through the
    FCN head's convs; the head is the upsampling back to the input's size."""
    anatomy, stages = stages_of(torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None))
    assert stages == [("backbone.layer1",), ("backbone.layer2", "backbone.layer3", "backbone.layer4", "classifier")]
    assert anatomy.graph_module.meta["rmn_part_modules"]["head"] == ()


@pytest.mark.parametrize(
    "name, stem, stages",
    [
        ("resnet50d", ("conv1", "bn1", "act1", "maxpool"), [("layer1",), ("layer2",), ("layer3",), ("layer4",)]),
        ("levit_128s", ("stem",), [("stages.0",), ("stages.1",), ("stages.2",)]),
    ],
)
def test_a_deep_stem_of_plain_convs_is_one_stem(name, stem, stages):
    """ResNet-D's three convs and LeViT's four strided convs are stems, as timm's
    feature_info (and users) say, not stages."""
    anatomy = rmn_fx.analyze(timm.create_model(name), input_size=(3, 224, 224))
    assert anatomy.graph_module.meta["rmn_part_modules"]["stem"] == stem
    assert [s.modules for s in anatomy.stages] == stages


def test_a_stem_that_does_not_downsample_ends_before_the_first_block():
    """A CIFAR ResNet (3x3 stride-1 stem, no max-pool): layer1 is a stage at full
    resolution, not part of the stem."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    anatomy, stages = stages_of(model, size=32)
    assert anatomy.graph_module.meta["rmn_part_modules"]["stem"] == ("conv1", "bn1", "relu", "maxpool")
    assert stages == [("layer1",), ("layer2",), ("layer3",), ("layer4",)]


def test_boundaries_where_two_tensors_are_alive_carry_both_packed():
    """Each stage takes and gives the two tensors alive at its boundaries as one packed
    tensor; the packs inside a part are gone, the conversion is exact, and a routing key
    pools both tensors."""
    model = TwoInputCells().eval()
    anatomy, stages = stages_of(model)
    assert stages == [("cell1",), ("cell2_a", "cell2_b"), ("cell3_a", "cell3_b")]
    assert [s.in_layout.name for s in anatomy.stages] == ["NCHW", "packed(NCHW:8x32x32,NCHW:8x32x32)", "packed(NCHW:8x32x32,NCHW:8x16x16)"]
    for stage in anatomy.stages:
        code = anatomy.graph_module.get_submodule(stage.name).code
        assert code.count("layout_unpack(") == (stage.index > 1) and code.count("layout_pack(") == (stage.index < 3)
    gm = rmn_fx.transform(model, branches=3, input_size=(3, 64, 64))
    x = torch.randn(5, 3, 64, 64)
    spread_routes(gm, x)
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= 1e-6  # sub-batches: a conv may sum in another order
    assert gm.stage_3.router.memory.shape == (3, 16)  # both tensors' channels


class RotaryBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, tokens, cos, sin):
        cos, sin = cos[: tokens.shape[0]], sin[: tokens.shape[0]]  # the first rows: all of them, unless `doubled`
        return tokens + torch.relu(self.linear(tokens * cos + tokens.flip(-1) * sin))


class RotaryTokens(torch.nn.Module):
    """A token model whose blocks all read per-sample tables built from the token grid's
    sizes and expanded to the batch (Gemma4's rotary cos/sin): no downsampling after the
    patch embedding, so stages are named. `doubled`: the tables have twice the batch's rows."""

    def __init__(self, doubled: bool = False) -> None:
        super().__init__()
        self.rows = 2 if doubled else 1
        self.embed = torch.nn.Conv2d(3, 16, 4, 4)
        self.blocks = torch.nn.ModuleList(RotaryBlock() for _ in range(4))
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        positions = torch.arange(tokens.shape[1], dtype=tokens.dtype).div(tokens.shape[1])
        angles = positions[None, :, None].expand(self.rows * tokens.shape[0], -1, 16) * torch.linspace(1.0, 3.0, 16)
        cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            tokens = block(tokens, cos, sin)
        return self.head(tokens.mean(1))


def test_tables_with_a_batch_axis_that_stages_read_are_carried_with_their_samples():
    """The tables are carried in every stage's packed input (no key reads them, no attention
    scales them), the conversion is exact with routes spread, and each sample keeps its rows."""
    model = RotaryTokens().eval()
    anatomy, stages = stages_of(model, size=32, stages="blocks.0:blocks.1,blocks.2:blocks.3")
    assert stages == [("blocks.0", "blocks.1"), ("blocks.2", "blocks.3")]
    assert [s.in_layout.name for s in anatomy.stages] == ["packed(NLC:64x16,carried:64x16,carried:64x16)"] * 2
    assert "layout_pack(" in anatomy.graph_module.get_submodule("stage_1").code and "carried = (1, 2)" in anatomy.graph_module.stem.code
    gm = rmn_fx.transform(model, branches=3, input_size=(3, 32, 32), stages="blocks.0:blocks.1,blocks.2:blocks.3")
    assert gm.stage_1.router.memory.shape == (3, 16)  # the tokens' channels only
    x = torch.randn(5, 3, 32, 32)
    spread_routes(gm, x)
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= 1e-6
    layout = anatomy.stages[0].in_layout
    packed = torch.randn(2, 3 * 64 * 16)
    scaled = layout.scale(packed, torch.full((2, 16), 2.0))
    assert torch.equal(scaled[:, 64 * 16 :], packed[:, 64 * 16 :]) and torch.equal(scaled[:, : 64 * 16], 2 * packed[:, : 64 * 16])
    assert layout.pool(packed).shape == (2, 16)


def test_a_table_that_changes_with_the_batch_without_a_batch_axis_is_refused():
    """Twice the batch's rows: no axis to split by sample, and shared it would be wrong."""
    with pytest.raises(StageError, match=r"stage 1 \(nodes .*\) reads '\w+', computed before it, whose value changes with the batch"):
        stages_of(RotaryTokens(doubled=True).eval(), size=32, stages="blocks.0:blocks.1,blocks.2:blocks.3")


class FoldedTwoInputCells(TwoInputCells):
    """The stem's output stays alive until the last cell with its batch folded into groups
    of channels (`fold`: two rows per sample, [2B, 4, H, W], as TNT's pixel tokens fold it)
    or with its batch moved to the second axis (`transpose`: no boundary can carry that)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x):
        x0 = self.stem(x)
        kept = x0.reshape(-1, 4, 32, 32) if self.how == "fold" else x0.transpose(0, 1)
        x1 = self.cell1(x0)
        x2 = self.cell2_a(x1) + self.cell2_b(x0)
        x3 = self.cell3_a(x2) + self.cell3_b(x1)
        restored = kept.reshape(-1, 8, 32, 32) if self.how == "fold" else kept.transpose(0, 1)  # after the last drop
        return self.head(x3 + restored[:, :, ::4, ::4])


def test_a_tensor_with_its_batch_folded_into_its_first_axis_is_carried_with_its_rows():
    model = FoldedTwoInputCells("fold").eval()
    anatomy, stages = stages_of(model)
    assert stages == [("cell1",), ("cell2_a", "cell2_b"), ("cell3_a", "cell3_b")]
    assert anatomy.stages[1].in_layout.name == "packed(NCHW:8x32x32,carried:2x4x32x32,NCHW:8x32x32)"  # two rows per sample
    assert "carried = (1,), rows = (1, 2)" in anatomy.graph_module.stem.code
    gm = rmn_fx.transform(model, branches=3, input_size=(3, 64, 64))
    x = torch.randn(5, 3, 64, 64)
    spread_routes(gm, x)
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= 1e-6
    assert gm.stage_2.router.memory.shape == (3, 16)  # the feature maps' channels, not the carried rows'


def test_drops_where_a_tensor_alive_is_no_feature_map_are_named_as_such():
    with pytest.raises(StageError, match=r"downsamples after node 'stem' \(at node 'cell2_a' in module 'cell2_a'\), but only where more than one tensor is alive"):
        stages_of(FoldedTwoInputCells("transpose"))


class RowsStage(torch.nn.Module):
    """A stage that reads a row count computed before it beside its input (it views its
    input as that many rows), and hands on the row count of its first conv's output."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, stride, 1)
        self.residual = torch.nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x, count):
        y = torch.relu(self.conv(x.view(count, -1).view_as(x)))
        rows = y.shape[0]
        return y + self.residual(y), rows


class SharedAcrossTheBatch(torch.nn.Module):
    """Stages whose side values change with the batch: `leak` "reads", a count computed
    before the stages (twice the batch size; the batch size itself would be allowed: the
    stage reads its own); "hands on", a count computed in the middle of a stage (a
    sub-batch's size, once routed) that the head reads."""

    def __init__(self, leak: str) -> None:
        super().__init__()
        self.leak = leak
        self.stem = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.stage1, self.stage2 = RowsStage(1), RowsStage(2)
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))

    def forward(self, x):
        count = x.shape[0] * 2 if self.leak == "reads" else x.shape[0]  # twice the batch size, or the batch size (allowed)
        y, _ = self.stage1(self.stem(x), count)
        y, rows = self.stage2(y, count)
        return self.head(y) * rows if self.leak == "hands on" else self.head(y)


@pytest.mark.parametrize("leak, needle", [
    ("reads", r"stage 1 \(nodes .*\) reads 'mul', computed before it, whose value changes with the batch"),
    ("hands on", r"stage 2 \(nodes .*\) hands on to later nodes 'getitem_\d+', beside its output, whose value changes with the batch"),
])
def test_side_values_that_change_with_the_batch_are_refused(leak, needle):
    with pytest.raises(StageError, match=needle):
        stages_of(SharedAcrossTheBatch(leak))


class TableBlock(torch.nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, stride, 1)
        self.residual = torch.nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x, table):
        y = torch.relu(self.conv(x)) + table
        return y + self.residual(y)


class TableFromTheGrid(torch.nn.Module):
    """A table computed from the first stage's input sizes (as timm's DeepSeek-ViT builds its
    rotary table from the token grid) and read by every stage; `per_sample` makes it one row
    per sample, which changes with the batch."""

    def __init__(self, per_sample: bool = False) -> None:
        super().__init__()
        self.per_sample = per_sample
        self.stem = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.stage1, self.stage2 = TableBlock(1), TableBlock(2)
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))

    def forward(self, x):
        x = self.stem(x)
        rows = x.shape[0] if self.per_sample else 1
        table = torch.arange(x.shape[1] * rows, dtype=x.dtype).div(x.shape[2]).sin().view(rows, -1, 1, 1)
        return self.head(self.stage2(self.stage1(x, table), table))


def test_a_table_the_first_stage_computes_from_sizes_and_hands_on_is_computed_in_the_stem():
    model = TableFromTheGrid().eval()
    anatomy, _ = stages_of(model, size=32)
    table = "view"
    assert [stage.side_inputs for stage in anatomy.stages] == [(table,), (table,)]
    gm = rmn_fx.transform(model, branches=3, input_size=(3, 32, 32)).eval()
    x = torch.randn(6, 3, 32, 32)
    spread_routes(gm, x)
    assert ".sin()" in gm.stem.code and ".sin()" not in gm.stage_1.procedures[0].code  # computed once, read by each procedure
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_a_table_with_a_row_per_sample_is_carried_with_its_samples():
    """One row per sample (each row differs): carried into each stage with its input, so
    that every sample meets its own row in whichever procedure it is routed to."""
    model = TableFromTheGrid(per_sample=True).eval()
    anatomy, _ = stages_of(model, size=32)
    assert [stage.in_layout.name for stage in anatomy.stages] == ["packed(NCHW:8x16x16,carried:8x1x1)", "packed(NCHW:8x16x16,carried:8x1x1)"]
    gm = rmn_fx.transform(model, branches=3, input_size=(3, 32, 32)).eval()
    x = torch.randn(6, 3, 32, 32)
    spread_routes(gm, x)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


class BatchStatisticStage(torch.nn.Module):
    """Two stages; the first normalises with the batch's own statistics in eval mode too
    (a BatchNorm that keeps no running statistics) when `mixes`, splits its batch in two
    halves (it takes even batches only) when `pairs`, or asserts that it holds more than one
    sample when `several`."""

    def __init__(self, mixes: bool, pairs: bool = False, several: bool = False) -> None:
        super().__init__()
        self.pairs, self.several = pairs, several
        self.stem = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.stage1 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.BatchNorm2d(8, track_running_stats=not mixes), torch.nn.ReLU())
        self.stage2 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))

    def forward(self, x):
        y = self.stage1(self.stem(x))
        if self.several:
            torch._assert(y.size(0) > 1, "needs more than one sample")
        return self.head(self.stage2(y.unflatten(0, (2, -1)).flatten(0, 1) if self.pairs else y))


def test_a_stage_that_mixes_the_samples_of_its_batch_is_refused():
    anatomy, _ = stages_of(BatchStatisticStage(mixes=False).eval(), size=32)
    assert len(anatomy.stages) == 2
    with pytest.raises(StageError, match=r"stage 1 \(nodes stage1_0\.\.stage1_2\) mixes the samples of its batch: its output for one sample changes by"):
        stages_of(BatchStatisticStage(mixes=True).eval(), size=32)
    with pytest.raises(InputSizeError, match=r"runs a batch of 2 but not of 3 \(node 'unflatten': .*\); routed, each procedure gets a sub-batch of any size"):
        stages_of(BatchStatisticStage(mixes=False, pairs=True).eval(), size=32)
    with pytest.raises(StageError, match=r"stage 2 \(nodes .*\) fails on a single sample \(AssertionError: needs more than one sample\), and routed, a procedure may receive one"):
        stages_of(BatchStatisticStage(mixes=False, several=True).eval(), size=32)


def test_torchvision_convnext_downsample_is_not_split():
    _, stages = stages_of(torchvision.models.convnext_tiny())
    assert stages[1] == ("features.2", "features.3")


def test_plain_vit_gets_an_error_with_stages_that_work():
    model = timm.create_model("vit_tiny_patch16_224")
    with pytest.raises(NoDownsamplingError) as error:
        rmn_fx.analyze(model)
    suggestion = re.search(r"--stages (\S+)", str(error.value)).group(1)
    anatomy = rmn_fx.analyze(model, stages=suggestion)
    assert [s.modules for s in anatomy.stages] == [tuple(f"blocks.{i}" for i in range(6)), tuple(f"blocks.{i}" for i in range(6, 12))]
    assert anatomy.stages[0].in_layout.name == "NLC"


@pytest.mark.parametrize(
    "stages, needle",
    [
        ("layer1:layer9", "'layer9' does not exist in the model; did you mean layer4"),
        ("layer1.0.conv1:layer1.0.conv2", "not on the main path"),
        ("layer2:layer1", "backwards"),
        ("layer1,layer1", "overlaps"),
        (":", "cannot read stage range"),
        ("", "no stage ranges given"),
    ],
)
def test_named_stage_errors(stages, needle):
    with pytest.raises(StageError, match=needle):
        stages_of(torchvision.models.resnet18(), stages=stages)


def test_named_stages_can_cover_part_of_a_network():
    _, stages = stages_of(torchvision.models.resnet18(), stages=[("layer2", "layer3"), ("layer4", "layer4")])
    assert stages == [("layer2", "layer3"), ("layer4",)]
    assert stages_of(torchvision.models.resnet18(), stages="layer1:")[1] == [("layer1",)]  # A: means A:A


class _Residual(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class _StageWrapper(torch.nn.Module):
    """A stage as timm writes them: its forward only calls its submodules (shape reads aside)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.downsample = torch.nn.Conv2d(cin, cout, 3, 2, 1)
        self.blocks = torch.nn.Sequential(_Residual(cout), _Residual(cout))

    def forward(self, x):
        batch = x.shape[0]  # read, unused: no computation of the wrapper's own
        del batch
        return self.blocks(self.downsample(x))


class _Unwrapped(torch.nn.Module):
    """The same stage computing a tensor of its own (the scale), so it cannot be cut inside."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.inner = _StageWrapper(cin, cout)

    def forward(self, x):
        return self.inner(x) * 0.5


@pytest.mark.parametrize("stage, blocks_per_stage", [(_StageWrapper, 3), (_Unwrapped, 1)])
def test_block_granularity_cuts_through_stage_wrappers_only(stage, blocks_per_stage):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), stage(8, 8), stage(8, 16), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3))
    size = (3, 32, 32)
    if blocks_per_stage == 1:
        with pytest.raises(StageError, match="no cut inside any stage"):
            rmn_fx.analyze(net, input_size=size, granularity="block")
        return
    blocks = [s.modules for s in rmn_fx.analyze(net, input_size=size, granularity="block").stages]
    assert blocks == [(f"{i}.{name}",) for i in (1, 2) for name in ("downsample", "blocks.0", "blocks.1")]
    gm = rmn_fx.transform(net, branches=2, input_size=size, granularity="block").eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.allclose(gm(x), net.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_backbone_that_returns_every_level_routes_every_stage():
    """A detector's backbone body returns a dict of every stage's maps (FPN): the maps
    handed to the output travel packed through the later stages, and keep their names."""
    from torchvision.models._utils import IntermediateLayerGetter

    torch.manual_seed(0)
    body = IntermediateLayerGetter(torchvision.models.resnet18(), {f"layer{i}": str(i - 1) for i in range(1, 5)}).eval()
    anatomy, stages = stages_of(body)
    assert stages == [("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    assert [len(getattr(s.out_layout, "segments", [s])) for s in anatomy.stages] == [1, 2, 3, 4]
    gm = rmn_fx.transform(body, branches=2, input_size=(3, 64, 64))
    x = torch.randn(3, 3, 64, 64)
    spread_routes(gm, x)
    with torch.no_grad():
        want, got = body(x), gm(x)
    # within the conversion's own check (1e-5): convolutions on sub-batches of 2 and 1 round
    # differently from the batch of 3 (up to 1.02e-6 over 25 random models, unseeded before)
    assert list(got) == list(want) and all(relative_error(want[k], got[k]) <= 1e-5 for k in want)
