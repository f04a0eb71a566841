"""A hypothesis strategy for random CNN backbones whose true stages are known.

A backbone is `stem` (one to three plain conv-norm-activation layers and an optional
max-pool: a deep stem, or one that does not downsample when a block follows it), `stages` (each a Sequential of blocks; every stage after the first opens
with a downsampling: a strided block, a pool, or a strided conv), an optional 1x1
`head_conv` that belongs to the last stage (EfficientNet's conv_head), and a `head`:
global pooling + linear (a classifier), or a per-position 1x1 conv whose output is
upsampled to the input's size (segmentation; the conv belongs to the last stage, the
upsampling is the head). Blocks are plain, residual or concatenation blocks, with
BatchNorm or GroupNorm and optional squeeze-excitation. Images use 2-D layers; videos
(`frames`) 3-D ones that downsample space only, as R3D's stem does. With `side_values`,
the stages pass batch-independent values beside the tensor, as MViT's blocks do: each
stage reads the sizes its predecessor handed on (the stem's, for the first), a gain
vector and the batch size computed before the stages, a table the first stage computes
from its input's sizes (a rotary table, as timm's DeepSeek-ViT builds), and hands on its
own output's sizes. With `two_inputs`, every stage after the first also reads the input of
the stage before it (NASNet's cells read the two previous cells' outputs), so two tensors
are alive between stages and the boundaries are packed (`PackBoundaries`); with `folded`
too, that input is handed on with its batch folded into its first axis (two rows per
sample, as TNT's pixel tokens), a carried segment of the packs. With
`batched_rows`, every stage reads per-sample rows built before the stages from the batch
size alone (a table expanded to the batch, as Gemma4's rotary tables are), which are
carried into each stage with its input (`CarryBatchedSideInputs`). With
`shape_branches`, forward branches in Python on its input's sizes (it checks them, and
takes an image or a video path by rank), which plain torch.fx cannot trace, so the graph
comes from the capture at the sample's shapes (`rmn_fx.fixed_shape_tracing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

BLOCKS = ("plain", "residual", "concat")
DOWNSAMPLES = ("block", "pool", "conv")


@dataclass(frozen=True)
class Layers:
    """The layers of a 2-D (image) or 3-D (video) backbone; a 3-D one keeps its frames."""

    dims: int

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True) -> nn.Module:
        conv = nn.Conv2d if self.dims == 2 else nn.Conv3d
        return conv(cin, cout, kernel, self.spatial(stride), padding, bias=bias)

    def norm(self, kind: str, channels: int) -> nn.Module:
        if kind == "gn":
            return nn.GroupNorm(min(2, channels), channels)
        return nn.BatchNorm2d(channels) if self.dims == 2 else nn.BatchNorm3d(channels)

    def max_pool(self, kernel: int, stride: int, padding: int = 0) -> nn.Module:
        pool = nn.MaxPool2d if self.dims == 2 else nn.MaxPool3d
        return pool(self.spatial(kernel), self.spatial(stride), self.spatial(padding, 0))

    def global_pool(self) -> nn.Module:
        return nn.AdaptiveAvgPool2d(1) if self.dims == 2 else nn.AdaptiveAvgPool3d(1)

    def spatial(self, size: int, frames: int = 1):
        """`size` over height and width; over frames, `frames` (a stride or kernel of 1)."""
        return size if self.dims == 2 else (frames, size, size)


class SqueezeExcite(nn.Module):
    def __init__(self, layers: Layers, channels: int) -> None:
        super().__init__()
        self.spatial = tuple(range(2, 2 + layers.dims))  # every axis after the channels
        self.fc = layers.conv(channels, max(1, channels // 4), 1)
        self.out = layers.conv(max(1, channels // 4), channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.out(torch.relu(self.fc(x.mean(self.spatial, keepdim=True)))))


class Block(nn.Module):
    def __init__(self, layers: Layers, kind: str, cin: int, cout: int, stride: int, norm_kind: str, se: bool) -> None:
        super().__init__()
        self.kind = kind
        if kind == "concat":
            half = cout // 2
            self.left = layers.conv(cin, half, 3, stride, 1, bias=False)
            self.right = nn.Sequential(layers.conv(cin, cout - half, 1, stride, bias=False), nn.ReLU())
        else:
            self.conv1 = layers.conv(cin, cout, 3, stride, 1, bias=False)
            self.norm1 = layers.norm(norm_kind, cout)
            self.conv2 = layers.conv(cout, cout, 3, 1, 1, bias=False) if kind == "residual" else nn.Identity()
        self.norm = layers.norm(norm_kind, cout)
        self.se = SqueezeExcite(layers, cout) if se else nn.Identity()
        if kind == "residual":
            self.shortcut = (
                nn.Identity() if stride == 1 and cin == cout
                else nn.Sequential(layers.conv(cin, cout, 1, stride, bias=False), layers.norm(norm_kind, cout))
            )

    def forward(self, x):
        if self.kind == "concat":
            y = torch.cat([self.left(x), self.right(x)], dim=1)
        else:
            y = self.conv2(torch.relu(self.norm1(self.conv1(x))))
        y = self.se(self.norm(y))
        if self.kind == "residual":
            y = y + self.shortcut(x)
        return torch.relu(y)


class SizedStage(nn.Module):
    """A stage that reads the sizes of its input (handed on by the stage before it), a gain
    and the batch size computed before the stages, a table over the positions of the last
    axis, and hands on its output's sizes (MViT's (T, H, W))."""

    def __init__(self, layers: Layers, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.gain_shape = (-1,) + (1,) * layers.dims  # over the channels, broadcast over the positions

    def forward(self, x, sizes, gain, batch, table):
        x = x.narrow(-1, 0, sizes[-1]) + table[: x.shape[-1]]  # as wide as the last stage left it: the sizes are read
        x = self.blocks(x.view(batch, -1).view_as(x))  # the batch size read once before the stages (CoaT, Twins)
        sizes = x.shape[2:]
        return x * gain[: x.shape[1]].view(self.gain_shape), sizes


class RowsStage(nn.Module):
    """A stage that adds, per sample, a row of a table computed before the stages to its
    input's channels."""

    def __init__(self, layers: Layers, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.dims = layers.dims

    def forward(self, x, rows):
        return self.blocks(x + rows.narrow(1, 0, x.shape[1]).reshape(x.shape[0], x.shape[1], *(1,) * self.dims))


class TwoInputStage(nn.Module):
    """A stage that adds a strided 1x1 conv of the previous stage's input to its blocks' output."""

    def __init__(self, layers: Layers, stride: int, previous_channels: int, channels: int, *blocks: nn.Module, rows: int = 1) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.previous = layers.conv(previous_channels, channels, 1, stride)
        self.rows = rows  # rows per sample of the previous stage's input (2: handed on folded)

    def forward(self, x, previous):
        previous = previous.unflatten(0, (x.shape[0], self.rows)).flatten(1, 2)  # unfolded, where it was folded (no size inferred: torch.export)
        return self.blocks(x) + self.previous(previous)


@dataclass
class StageSpec:
    downsample: str | None
    blocks: list[str]
    width: int
    se: list[bool]


@dataclass
class BackboneSpec:
    stem_stride: int
    stem_pool: bool
    stem_width: int
    stem_convs: tuple[int, ...]  # strides of the stem's further convs (a deep stem: ResNet-D's)
    norm: str
    stages: list[StageSpec]
    head_conv: bool
    input_side: int
    frames: int | None = None  # a video backbone, fed clips of this many frames
    dense: bool = False  # a segmentation head instead of a classifier
    side_values: bool = False  # stages read and hand on batch-independent values (`SizedStage`)
    two_inputs: bool = False  # stages after the first also read the previous stage's input (`TwoInputStage`)
    batched_rows: bool = False  # stages read per-sample rows computed from the batch size (`RowsStage`)
    folded: bool = False  # with two_inputs: the previous stage's input is handed on folded, [2B, C / 2, ...]
    shape_branches: bool = False  # forward branches in Python on its input's sizes (plain torch.fx cannot trace it)
    classes: int = 5
    expected: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def stem_downsamples(self) -> bool:
        return self.stem_stride == 2 or 2 in self.stem_convs or self.stem_pool

    @property
    def input_size(self) -> tuple[int, ...]:
        side = (self.input_side, self.input_side)
        return (3, *side) if self.frames is None else (3, self.frames, *side)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return Backbone(self)

    @property
    def expected_blocks(self) -> list[tuple[str, ...]]:
        """The parts of granularity "block": every block of every stage; a pool that opens a
        stage belongs to its first block, a conv downsampling is a block of its own, and so
        are the last stage's 1x1 convs (head_conv, a segmentation head's classifier). With
        side values: the stages, which no block cut may split."""
        blocks = []
        for i, stage in enumerate(self.stages):
            if self.side_values or self.batched_rows or (self.two_inputs and i > 0):  # a stage that computes tensors itself (no container): no block cut splits it
                blocks.append((f"stages.{i}",))
                continue
            names = [f"stages.{i}.{j}" for j in range(len(stage.blocks) + (stage.downsample in ("pool", "conv")))]
            if stage.downsample == "pool":
                names[:2] = [tuple(names[:2])]
            if len(names) == 1:  # the block is the whole stage: its outermost module
                names = [f"stages.{i}"]
            blocks.extend(name if isinstance(name, tuple) else (name,) for name in names)
        return blocks + [("head_conv",)] * self.head_conv + [("head",)] * self.dense


class Backbone(nn.Module):
    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        layers = Layers(2 if spec.frames is None else 3)
        stem = []
        for i, stride in enumerate((spec.stem_stride, *spec.stem_convs)):
            stem += [layers.conv(3 if i == 0 else spec.stem_width, spec.stem_width, 3, stride, 1), layers.norm(spec.norm, spec.stem_width), nn.ReLU()]
        if spec.stem_pool:
            stem.append(layers.max_pool(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages, cin, widths, drops = [], spec.stem_width, [spec.stem_width], [False]
        for s in spec.stages:
            stage = []
            if s.downsample == "pool":
                stage.append(layers.max_pool(2, 2))
            elif s.downsample == "conv":
                stage.append(nn.Sequential(layers.conv(cin, cin, 3, 2, 1), layers.norm(spec.norm, cin)))
            for i, kind in enumerate(s.blocks):
                stride = 2 if i == 0 and s.downsample == "block" else 1
                stage.append(Block(layers, kind, cin, s.width, stride, spec.norm, s.se[i]))
                cin = s.width
            drops.append(s.downsample is not None)
            widths.append(cin)
            if spec.side_values:
                stages.append(SizedStage(layers, *stage))
            elif spec.batched_rows:
                stages.append(RowsStage(layers, *stage))
            elif spec.two_inputs and len(stages) > 0:  # the previous stage's input, two drops back at most
                stages.append(TwoInputStage(layers, 2 ** (drops[-2] + drops[-1]), widths[-3], cin, *stage, rows=2 if spec.folded else 1))
            else:
                stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.gain = nn.Parameter(torch.linspace(-1.0, 1.0, max(s.width for s in spec.stages))) if spec.side_values else None
        self.rows = nn.Parameter(torch.linspace(-0.1, 0.1, max(spec.stem_width, *(s.width for s in spec.stages)))) if spec.batched_rows else None
        self.head_conv = nn.Sequential(layers.conv(cin, 2 * cin, 1), nn.ReLU()) if spec.head_conv else None
        features = 2 * cin if spec.head_conv else cin
        self.dense, self.two_inputs, self.shape_branches, self.folded = spec.dense, spec.two_inputs, spec.shape_branches, spec.folded
        self.side = spec.input_side
        if spec.dense:  # per-position classes, upsampled to the input in forward (torchvision's FCN)
            self.head = layers.conv(features, spec.classes, 1)
        else:
            self.head = nn.Sequential(layers.global_pool(), nn.Flatten(), nn.Linear(features, spec.classes))

    def hand_on(self, y):
        """A stage's input as the stage after the next reads it: folded, two rows per sample."""
        return y.unflatten(1, (2, y.shape[1] // 2)).flatten(0, 1) if self.folded else y

    def forward(self, x):
        gain = None if self.gain is None else 1.0 + torch.tanh(self.gain)  # batch-independent, computed before the stages
        batch = x.shape[0]
        if self.shape_branches:
            if x.shape[-1] != self.side or x.shape[-2] != self.side:
                raise ValueError(f"expected {self.side}x{self.side} inputs")
            x = x.contiguous() if x.dim() == 4 else x.clone()  # a path per rank, as Gemma4's patch embedding has
        y = self.stem(x)
        if self.two_inputs:
            previous, y = self.hand_on(y), self.stages[0](y)
            for stage in self.stages[1:]:
                previous, y = self.hand_on(y), stage(y, previous)
        elif self.rows is not None:
            rows = self.rows.expand(batch, -1)  # one row per sample, from the batch size alone
            for stage in self.stages:
                y = stage(y, rows)
        elif gain is None:
            y = self.stages(y)
        else:
            sizes = y.shape[2:]
            table = torch.arange(y.shape[-1], dtype=y.dtype, device=y.device).div(y.shape[-1]).cos()  # in the first stage's nodes, from its input's sizes
            for stage in self.stages:
                y, sizes = stage(y, sizes, gain, batch, table)
        if self.head_conv is not None:
            y = self.head_conv(y)
        if self.dense:
            return F.interpolate(self.head(y), size=x.shape[2:], mode="nearest")
        return self.head(y)


@st.composite
def backbones(draw, max_stages: int = 4) -> BackboneSpec:
    """A random backbone: an image classifier most often, sometimes a video one (3-D
    layers), a segmentation one, or both."""
    count = draw(st.integers(2, max_stages))
    stem_stride = draw(st.sampled_from([1, 2]))
    stem_convs = tuple(draw(st.lists(st.sampled_from([1, 2]), max_size=2)))
    widths = st.sampled_from([4, 6, 8, 12])
    stages = []
    for i in range(count):
        blocks = draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=3))
        stages.append(
            StageSpec(
                downsample=None if i == 0 else draw(st.sampled_from(DOWNSAMPLES)),
                blocks=blocks,
                width=draw(widths),
                se=[draw(st.booleans()) for _ in blocks],
            )
        )
    first = stages[0]
    opens_with_a_block = first.blocks[0] != "plain" or first.se[0]  # not a chain of plain layers
    # a stem that does not downsample (CIFAR's) needs a block after it, or nothing tells it apart from a stage
    stem_pool = draw(st.booleans()) if opens_with_a_block or stem_stride == 2 or 2 in stem_convs else True
    drops = (stem_stride == 2) + stem_convs.count(2) + stem_pool + count - 1
    spec = BackboneSpec(
        stem_stride=stem_stride,
        stem_pool=stem_pool,
        stem_width=draw(widths),
        stem_convs=stem_convs,
        norm=draw(st.sampled_from(["bn", "gn"])),
        stages=stages,
        head_conv=draw(st.booleans()),
        input_side=2**drops * draw(st.sampled_from([2, 3, 4])),
        frames=draw(st.sampled_from([None, None, None, 1, 3])),
        dense=draw(st.sampled_from([False, False, True])),
    )
    kind = draw(st.sampled_from(["plain", "plain", "side_values", "two_inputs", "batched_rows"]))
    spec.side_values, spec.two_inputs, spec.batched_rows = kind == "side_values", kind == "two_inputs", kind == "batched_rows"
    spec.shape_branches = draw(st.booleans())
    spec.folded = spec.two_inputs and draw(st.booleans())
    spec.expected = [(f"stages.{i}",) for i in range(count)]
    spec.expected[-1] += ("head_conv",) * spec.head_conv + ("head",) * spec.dense
    return spec
