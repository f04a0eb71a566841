"""Deployment of converted models, for every routing rule: torch.export programs and ONNX
models that keep the routes (parity with eager on batches whose routes differ from the
example's), torch.jit.trace, and torch.compile in eval and training."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest
import torch
from backbones import backbones
from helpers import (
    ROUTING_IDS,
    ROUTINGS,
    SIZE,
    assert_one_line_error,
    convert,
    randomize_rule_weights,
    routed_stages,
    routings,
    spread_routes,
    tiny_converted,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import TwoInputCells, tiny_cnn
from torch._dynamo.testing import CompileCounterWithBackend

import rmn_fx
from rmn_fx.cli import main
from rmn_fx.deploy import FORMATS, check_parity, example_input
from rmn_fx.deploy.subbatch_ops import ExportableOps, gathered_roll
from rmn_fx.errors import ExportError
from rmn_fx.measure import relative_error
from rmn_fx.nn.modes import hooks
from rmn_fx.nn.rules import rule_class
from rmn_fx.nn.routing import in_batch_order

EXPORT_SETTINGS = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = "tiny_models:tiny_cnn"


def hard_routed(gm) -> list:
    """The stages that send each sample to some of their procedures (not the dense rules)."""
    return [s for s in routed_stages(gm) if not s.multipath]


@pytest.mark.slow
@routings
@EXPORT_SETTINGS
@given(spec=backbones(max_stages=3), branches=st.integers(2, 5))
def test_exported_program_keeps_the_routes_on_any_backbone(rule, options, spec, branches):
    _, gm, x = convert(spec, branches, rule, options)
    program = rmn_fx.export(gm, "pt2")
    rows = check_parity(gm, FORMATS["pt2"].runner(program), x, batches=(1, 2, 7))
    assert all(row.ok for row in rows), rows
    nonzeros = sum(1 for n in program.graph.nodes if n.target == torch.ops.aten.nonzero.default)
    assert nonzeros == sum(s.branches for s in hard_routed(gm))  # one sub-batch per procedure, in the graph


@pytest.mark.parametrize("rule, options", ROUTINGS, ids=ROUTING_IDS)
def test_onnx_model_matches_eager_with_every_procedure_used_and_some_empty(tmp_path, rule, options):
    import onnx
    from onnx import numpy_helper

    gm = tiny_converted(rule, options)
    path = tmp_path / "model.onnx"
    program = rmn_fx.export(gm, "onnx", path=str(path))
    rows = check_parity(gm, FORMATS["onnx"].runner(program), example_input(gm), batches=(1, 2, 7, 64))
    assert all(row.ok for row in rows), rows
    if hard_routed(gm):
        assert rows[-1].procedures_used == [4] * len(hard_routed(gm))  # batch 64: every procedure ran
        assert rows[0].procedures_used == [1] * len(hard_routed(gm))  # batch 1: the others were empty

    model = onnx.load(str(path))
    branches = [node for node in model.graph.node if node.op_type == "If"]
    assert len(branches) == sum(s.branches for s in hard_routed(gm))  # each procedure runs only when it has samples
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    constants = [numpy_helper.to_array(t) for t in model.graph.initializer]
    rule_tensors = [t for s in routed_stages(gm) for name, t in [*s.named_buffers(), *s.named_parameters()] if name.startswith(("router.memory", "gate.weight"))]
    for stage in routed_stages(gm):  # FC2 of the attention: its feature columns, and each route's code column (in its procedure's branch)
        if getattr(stage, "attention", None) is not None:
            hidden = stage.attention.squeeze.out_features
            rule_tensors += [stage.attention.excite.weight[:, :hidden], *stage.attention.excite.weight[:, hidden:].t()]
    for tensor in rule_tensors:  # memories, attention and gates are in the graph (reshaped, maybe), not baked into a route
        values = tensor.detach().numpy()
        assert any(c.size == values.size and (np.allclose(c.ravel(), values.ravel()) or np.allclose(c.ravel(), values.T.ravel())) for c in constants)


@routings
def test_packed_boundaries_export_to_onnx_with_parity(rule, options):
    """Stages that take and give two packed tensors (NASNet's pattern) run in ONNX Runtime
    as in eager, every procedure of the hard rules used at batch 64."""
    gm = rmn_fx.transform(TwoInputCells(), branches=3, routing=rule, input_size=(3, 64, 64), **options).eval()
    randomize_rule_weights(gm)
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    spread_routes(gm, x)
    program = rmn_fx.export(gm, "onnx")
    rows = check_parity(gm, FORMATS["onnx"].runner(program), x, batches=(1, 2, 7, 64))
    assert all(row.ok for row in rows), rows
    if hard_routed(gm):
        assert rows[-1].procedures_used == [3] * len(hard_routed(gm))


class TwoProcedureDispatch(torch.nn.Module):
    """The exported dispatch's pattern for two procedures (rows, Gather, the procedure, the
    outputs put back in batch order by `in_batch_order`): procedure 0 is the identity,
    procedure 1 two ops; with `leak`, a value inside procedure 1 is also read outside it."""

    def __init__(self, leak: bool) -> None:
        super().__init__()
        self.leak = leak

    def forward(self, x):
        route = (x[:, 0] > 0).long()
        rows = [torch.nonzero(route == j).squeeze(1) for j in (0, 1)]
        hidden = x.index_select(0, rows[1]) * 2.0
        out = in_batch_order([x.index_select(0, rows[0]), torch.tanh(hidden) + 1.0], route)
        return out + hidden.sum() if self.leak else out


@pytest.mark.parametrize("leak", [False, True])
def test_onnx_if_wraps_a_procedure_only_when_nothing_outside_reads_it(leak):
    from rmn_fx.deploy.onnx_branches import skip_empty_procedures

    model = TwoProcedureDispatch(leak).eval()
    example = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
    onnx_program = torch.onnx.export(
        model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True, verbose=False
    )
    assert skip_empty_procedures(onnx_program.model) == (1 if leak else 2)
    run = FORMATS["onnx"].runner(onnx_program)
    for x in (example, -example.abs(), torch.randn(9, 2)):  # some rows, no rows, a new batch size
        assert torch.allclose(run(x), model(x), atol=1e-6)


def test_exportable_batch_norm_is_its_affine_form_at_inference_only():
    bn = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        want_eval, want_train = bn.eval()(x), copy.deepcopy(bn).train()(x)
        with ExportableOps():
            assert relative_error(want_eval, bn.eval()(x)) < 1e-6
            assert torch.equal(want_train, copy.deepcopy(bn).train()(x))  # batch statistics: left to the kernel


@pytest.mark.slow
def test_shifted_windows_export_on_a_sub_batch():
    """Swin rolls its windows (`torch.roll`, which branches on an empty input): the routed
    model exports and keeps the function in both formats."""
    import torchvision

    torch.manual_seed(0)
    gm = rmn_fx.transform(torchvision.models.swin_t(), branches=2, input_size=(3, 64, 64)).eval()
    spread_routes(gm, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    for fmt in ("pt2", "onnx"):
        rows = check_parity(gm, FORMATS[fmt].runner(rmn_fx.export(gm, fmt)), example_input(gm), batches=(1, 3))
        assert all(row.ok for row in rows), (fmt, rows)


class TokenMixer(torch.nn.Module):
    """A stage block that reshapes with one size inferred: the batch kept
    (`x.reshape(B, C, -1)`, timm's Swin) or folded into another axis
    (`x.reshape(B * P, N, -1)`, MobileViT's patches)."""

    def __init__(self, channels: int, fold_batch: bool) -> None:
        super().__init__()
        self.mix = torch.nn.Linear(channels, channels)
        self.fold_batch = fold_batch

    def forward(self, x):
        b, c, h, w = x.shape
        if self.fold_batch:  # one token sequence per (sample, row)
            tokens = x.permute(0, 2, 3, 1).reshape(b * h, w, -1)
            return x + self.mix(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)
        tokens = x.reshape(b, c, -1).transpose(1, 2)
        return x + self.mix(tokens).transpose(1, 2).reshape(b, c, h, w)


class MaskedAttention(torch.nn.Module):
    """Self-attention over positions with an additive mask of batch 1 (a relative-position
    bias, as timm's CoAtNet and MaxViT pass to `F.scaled_dot_product_attention`)."""

    def __init__(self, channels: int, positions: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Conv2d(channels, 3 * channels, 1)
        self.register_buffer("bias", torch.randn(1, 1, positions, positions))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        mixed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return x + mixed.transpose(-1, -2).reshape(b, c, h, w)


BLOCKS_NEEDING_CARE = {
    "batch_kept_reshape": lambda c, side: TokenMixer(c, fold_batch=False),
    "batch_folded_reshape": lambda c, side: TokenMixer(c, fold_batch=True),
    "masked_attention": lambda c, side: MaskedAttention(c, side * side),
}


@pytest.mark.parametrize("block", list(BLOCKS_NEEDING_CARE))
def test_blocks_whose_ops_check_the_batch_export_with_empty_procedures(block):
    """Inferring a -1 from the sub-batch divides by it, and SDPA checks that a mask of batch 1
    broadcasts: either would make the program guard on, or assert, a nonempty procedure."""
    torch.manual_seed(0)
    make = BLOCKS_NEEDING_CARE[block]
    conv = lambda cin, cout: torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, 2, 1), torch.nn.ReLU())
    sides = [SIZE[-1] // 2, SIZE[-1] // 4]
    base = torch.nn.Sequential(conv(3, 8), make(8, sides[0]), conv(8, 8), make(8, sides[1]), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    gm = rmn_fx.transform(base, branches=3, input_size=SIZE).eval()
    spread_routes(gm, torch.randn(3, *SIZE, generator=torch.Generator().manual_seed(1)))
    program = rmn_fx.export(gm, "pt2")
    rows = check_parity(gm, FORMATS["pt2"].runner(program), example_input(gm), batches=(1, 2, 9))
    assert all(row.ok for row in rows), rows
    assert rows[0].procedures_used == [1] * len(routed_stages(gm))  # the others were empty


def test_resolved_shape_fills_in_the_inferred_size_only_where_the_batch_cancels():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from rmn_fx.deploy.subbatch_ops import resolved_shape

    x = torch.randn(4, 6, 5)
    assert resolved_shape(x, (4, -1, 3)) == (4, 10, 3)
    assert resolved_shape(x, (4, 30)) is None  # nothing to infer
    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):  # a sub-batch as torch.export sees it: its size unknown
        batch = env.create_unbacked_symint()
        sub_batch = torch.empty(batch, 6, 5)
    assert resolved_shape(sub_batch, (batch, -1, 3)) == (batch, 10, 3)
    assert resolved_shape(sub_batch, (batch * 2, 5, -1)) == (batch * 2, 5, 3)  # the batch folded into an axis
    assert resolved_shape(sub_batch, (-1, 3)) is None  # 10 * batch rows: depends on the batch
    with ExportableOps():
        assert torch.equal(x.reshape(4, -1, 3), x.reshape(4, 10, 3)) and x.view(4, 2, -1).shape == (4, 2, 15)


def test_gathered_roll_is_torch_roll():
    x = torch.randn(3, 4, 5, 6)
    for shifts, dims in [((-2, 3), (1, 2)), (7, 3), (-1, -1), ((1, 1), (0, 3)), (5, None)]:
        assert torch.equal(gathered_roll(x, shifts, dims), torch.roll(x, shifts, dims))
    with ExportableOps():
        assert torch.equal(x.roll((2, -1), (1, 2)), gathered_roll(x, (2, -1), (1, 2)))


@pytest.mark.parametrize("rule, options", ROUTINGS, ids=ROUTING_IDS)
def test_jit_trace_records_the_routing_not_the_example_routes(rule, options):
    gm = tiny_converted(rule, options)
    generator = torch.Generator().manual_seed(5)
    example, x = torch.randn(2, *SIZE, generator=generator), torch.randn(16, *SIZE, generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(gm, example)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]  # no value baked in
    with torch.no_grad():
        assert relative_error(gm(x), traced(x)) <= 1e-5
    if hard_routed(gm):
        stage = hard_routed(gm)[0]
        first = gm.stem(x)
        assert stage.first_choice(first).unique().numel() > 2  # x takes routes the example never took


def compile_counter():
    return CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("rule, options", ROUTINGS, ids=ROUTING_IDS)
def test_compiled_model_matches_eager_in_eval(rule, options):
    gm = tiny_converted(rule, options)
    compiled = torch.compile(gm, backend=compile_counter())
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for batch in (16, 16, 5):
            x = torch.randn(batch, *SIZE, generator=generator)
            assert relative_error(gm(x), compiled(x)) <= 1e-4


def test_a_new_mix_of_routes_compiles_nothing():
    """Copies of prototype j go to procedure j in every stage (memories = the prototypes'
    keys), so batches of 16 with any mix of routes can be built. After warm-up (each
    procedure sees sub-batches of 1, 2 and the whole batch: the size classes torch
    specialises), 20 batches of different mixes add no compiled graph."""
    gm = tiny_converted("memory", {"attention": True})
    prototypes = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(7))
    spread_routes(gm, prototypes)
    counter = compile_counter()
    compiled = torch.compile(gm, backend=counter)

    def batch(counts) -> torch.Tensor:
        return torch.cat([prototypes[j : j + 1].expand(c, -1, -1, -1) for j, c in enumerate(counts)])

    warm_up = [[1, 1, 1, 1], [2, 2, 2, 2]] + [[16 if j == k else 0 for j in range(4)] for k in range(4)]
    generator = torch.Generator().manual_seed(8)
    mixes: list[tuple[int, ...]] = []
    while len(mixes) < 20:  # 20 different mixes
        mix = tuple(torch.bincount(torch.randint(4, (16,), generator=generator), minlength=4).tolist())
        if mix not in mixes:
            mixes.append(mix)
    with torch.no_grad():
        for counts in warm_up:
            compiled(batch(counts))
        compiled_after_warm_up = counter.frame_count
        for counts in mixes:
            x = batch(counts)
            assert relative_error(gm(x), compiled(x)) <= 1e-4
    assert counter.frame_count == compiled_after_warm_up


DISPATCHING = [pytest.param(*routing, id=name) for routing, name in zip(ROUTINGS, ROUTING_IDS) if not rule_class(routing[0]).multipath]
MULTIPATH = [pytest.param(*routing, id=name) for routing, name in zip(ROUTINGS, ROUTING_IDS) if rule_class(routing[0]).multipath]


@pytest.mark.parametrize("rule, options", DISPATCHING)
def test_torch_compile_compiles_the_procedures_and_none_of_the_routing_code(rule, options):
    """A dispatching part's routing code (key, route, dispatch) runs eagerly (a graph break
    where the model calls it), its procedures compile, each alone, the memory rule's
    attention with each procedure: no compiled graph holds another node of the runtime's
    code, so no code object is compiled once per part, and a model with more parts (six)
    than torch's recompile limit (set to 1 here, hitting it fails) compiles."""
    gm = tiny_converted(rule, options, granularity="block")
    x = torch.randn(16, *SIZE, generator=torch.Generator().manual_seed(10))
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True), torch.no_grad():
        assert relative_error(gm(x), torch.compile(gm, backend=record)(x)) <= 1e-4
    runtime, attention = os.path.dirname(rmn_fx.nn.__file__), rmn_fx.nn.attention.__file__
    traced_from = [(g, n.meta.get("stack_trace") or "") for g in graphs for n in g.graph.nodes]
    assert all(attention in trace for _, trace in traced_from if runtime in trace)
    ran = set()
    stages = routed_stages(gm)
    procedures = [p for stage in stages for p in stage.procedures]
    with hooks(p.register_forward_pre_hook(lambda p, args: ran.add(p)) for p in procedures), torch.no_grad():
        gm(x)
    assert len(graphs) > len(ran) >= len(procedures) // 2  # a graph per procedure that ran, and the model's own
    with_attention = {g for g, trace in traced_from if attention in trace}
    if options.get("attention"):  # in the graph of every procedure that ran; the others are the model's stretches
        assert len(with_attention) >= len(ran) and len(graphs) - len(with_attention) <= len(stages) + 1
    else:
        assert not with_attention


@pytest.mark.parametrize("rule, options", MULTIPATH)
def test_a_multi_path_model_compiles_into_one_graph(rule, options):
    """Every procedure of a multi-path part runs on the whole batch: nothing depends on the
    data's routes, so the whole model is one graph (`fullgraph=True` refuses any break),
    compiled without a warning (dynamo warns about a `functools.cache` it traces through)."""
    gm = tiny_converted(rule, options, granularity="block")
    x = torch.randn(16, *SIZE, generator=torch.Generator().manual_seed(10))
    counter = compile_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert relative_error(gm(x), torch.compile(gm, backend=counter, fullgraph=True)(x)) <= 1e-4
    assert counter.frame_count == 1


@pytest.mark.parametrize("rule, options", [ROUTINGS[0], ROUTINGS[2], ROUTINGS[4]], ids=[ROUTING_IDS[0], ROUTING_IDS[2], ROUTING_IDS[4]])
def test_compiled_training_step_matches_eager(rule, options):
    """Forward, backward and an SGD step, compiled and eager from the same state (re-synced
    each step: a near-tie between two routes may flip on a rounding difference)."""
    gm = tiny_converted(rule, options).train()
    eager, compiled_model = copy.deepcopy(gm), copy.deepcopy(gm)
    compiled = torch.compile(compiled_model, backend=compile_counter())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, compiled_model)]
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        compiled_model.load_state_dict(eager.state_dict())
        x, y = torch.randn(16, *SIZE, generator=generator), torch.randint(10, (16,), generator=generator)
        losses = []
        for forward, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert relative_error(losses[0], losses[1]) <= 1e-4
        for p, q in zip(eager.parameters(), compiled_model.parameters()):
            assert relative_error(p, q) <= 1e-4


def test_export_errors_are_one_line_and_write_nothing(tmp_path):
    gm = tiny_converted("memory", {})
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        rmn_fx.export(gm, "tflite")
    with pytest.raises(ExportError, match="input size is unknown"):
        rmn_fx.export(tiny_cnn(), "pt2")

    class DataDependent(torch.nn.Module):  # a branch on the data: torch.export cannot capture it
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ExportError, match=r"torch.export cannot capture this model.*at `.*x.sum\(\) > 0") as error:
        rmn_fx.export(DataDependent(), "pt2", path=str(tmp_path / "m.pt2"), input_size=SIZE)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_export_command_checks_parity_then_writes(tmp_path, capsys):
    model, out = tmp_path / "model.pt", tmp_path / "model.onnx"
    assert main(["convert", TINY, "--input-size", "32", "-b", "4", "--routing", "gate", "--top-k", "2", "-o", str(model)]) == 0
    capsys.readouterr()
    assert main(["export", str(model), "-o", str(out), "--check", "--batches", "1,5", "--trust-factory"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" ok ") == 2 and f"wrote {out}" in printed
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        want = rmn_fx.load(str(model), trust_factory=True)(x)
    assert relative_error(want, torch.from_numpy(session.run(None, {"input": x.numpy()})[0])) <= 1e-4


@pytest.mark.parametrize(
    "case, needles",
    [
        ("not_a_model_file", ["not an rmn-fx model file"]),
        ("unknown_suffix", ["cannot tell the export format", ".pt2 or .onnx", "--format"]),
        ("unknown_format", ["--format", "'tflite'"]),
        ("missing_directory", ["does not exist"]),
        ("base_does_not_export", ["torch.export cannot capture this model", "at `return -x if x.mean() < 0 else x`"]),
    ],
)
def test_export_bad_input_gets_a_one_line_error_and_writes_nothing(case, needles, tmp_path, capsys):
    model = tmp_path / "model.pt"
    factory = "tiny_models:tiny_sign_flip" if case == "base_does_not_export" else TINY
    assert main(["convert", factory, "--input-size", "32", "-b", "2", "-o", str(model)]) == 0
    if case == "not_a_model_file":
        torch.save(tiny_cnn().state_dict(), model)
    output = {"unknown_suffix": tmp_path / "model.tflite", "missing_directory": tmp_path / "no" / "model.onnx"}.get(case, tmp_path / "model.onnx")
    extra = ["--format", "tflite"] if case == "unknown_format" else []
    capsys.readouterr()
    code = main(["export", str(model), "-o", str(output), "--trust-factory", *extra])
    assert_one_line_error(code, capsys.readouterr().err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_onnx_past_the_protobuf_limit_keeps_its_weights_beside_the_graph(tmp_path, monkeypatch):
    import onnx
    import onnxruntime

    from rmn_fx.deploy import formats

    monkeypatch.setattr(formats, "ONNX_INLINE_WEIGHT_LIMIT", 0)  # every model counts as over 2 GiB
    gm = tiny_converted("memory", {})
    path = tmp_path / "model.onnx"
    program = rmn_fx.export(gm, "onnx", path=str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # nothing staged is left
    graph = onnx.load(str(path), load_external_data=False).graph
    external = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert max(graph.initializer, key=lambda t: np.prod(t.dims)).name in external  # the weights are in the .data file
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *SIZE)
    with torch.no_grad():
        want = gm(x)
    assert relative_error(want, torch.from_numpy(session.run(None, {"input": x.numpy()})[0])) <= 1e-4
    rows = check_parity(gm, FORMATS["onnx"].runner(program), example_input(gm), batches=(1, 7))  # the runner's own path
    assert all(row.ok for row in rows), rows
