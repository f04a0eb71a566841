"""Properties of every conversion, for every routing rule, over random backbones whose
true stages are known."""

from __future__ import annotations

import pytest
import torch
from backbones import backbones
from helpers import (
    convert,
    max_relative_error,
    paths_per_sample,
    randomize_rule_weights,
    record_routes,
    routed_stages,
    routings,
    rule_flops,
    rule_params,
    spread_routes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rmn_fx
from rmn_fx.errors import StageError
from rmn_fx.measure import count_params, flop_counts
from rmn_fx.nn.modes import hooks

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RULE_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
branch_counts = st.integers(1, 8)
def links(gm) -> list[tuple[bool, bool]]:
    """(receives paths, emits paths) of each routed stage, as the rewrite chose."""
    return [(s.spec.receives_paths, s.spec.emits_paths) for s in routed_stages(gm)]


@PROPERTY_SETTINGS
@given(backbones())
def test_detected_stages_are_the_true_stages(spec):
    anatomy = rmn_fx.analyze(spec.build(), input_size=spec.input_size)
    assert [s.modules for s in anatomy.stages] == spec.expected
    named = rmn_fx.analyze(spec.build(), input_size=spec.input_size, stages=anatomy.stage_ranges())
    assert [s.modules for s in named.stages] == spec.expected  # named by module paths, the same stages (packed ones too)


@pytest.mark.parametrize("rule, options", [("memory", {"attention": True}), ("cross-connections", {})], ids=["memory", "cross-connections"])
@RULE_SETTINGS
@given(spec=backbones(), branches=st.integers(2, 4))
def test_block_granularity_routes_every_block_exactly(rule, options, spec, branches):
    size = spec.input_size
    if len(spec.expected_blocks) == len(spec.expected):
        with pytest.raises(StageError, match="no cut inside any stage"):
            rmn_fx.analyze(spec.build(), input_size=size, granularity="block")
        return
    anatomy = rmn_fx.analyze(spec.build(), input_size=size, granularity="block")
    assert [s.modules for s in anatomy.stages] == spec.expected_blocks
    base, gm, x = convert(spec, branches, rule, {**options, "granularity": "block"})
    with torch.no_grad():
        assert max_relative_error(base(x), gm(x)) <= 1e-5
    blocks = gm.meta["rmn_stages"]
    assert len(routed_stages(gm)) == len(blocks)
    # paths flow from block to block, except into a SizedStage, which reads side values beside its input
    flows = [rule != "memory" and i > 0 and not (spec.side_values and names[0].startswith("stages.")) for i, names in enumerate(spec.expected_blocks)]
    chain = [(flows[i], i + 1 < len(blocks) and flows[i + 1]) for i in range(len(blocks))]
    assert links(gm) == chain  # paths flow block to block
    assert count_params(gm) == count_params(base) + sum((branches - 1) * s.params + rule_params(rule, options, s, branches, *link) for s, link in zip(blocks, chain))


@routings
@RULE_SETTINGS
@given(spec=backbones(), branches=branch_counts)
def test_conversion_preserves_function_flops_and_parameter_anatomy(rule, options, spec, branches):
    base, gm, x = convert(spec, branches, rule, options)
    n = routed_stages(gm)[0].branches
    with torch.no_grad():
        assert max_relative_error(base(x), gm(x)) <= 1e-5  # routes spread, rule weights random

    stages = gm.meta["rmn_stages"]
    flows = rule.startswith("cross") and not spec.side_values  # paths flow only where a stage reads nothing but its input
    chain = [(flows and i > 0, flows and i < len(stages) - 1) for i in range(len(stages))]
    assert links(gm) == chain  # generated backbones are chains: paths flow through every stage
    extra_params = sum((n - 1) * s.params + rule_params(rule, options, s, n, *link) for s, link in zip(stages, chain))
    assert count_params(gm) == count_params(base) + extra_params

    anatomy = rmn_fx.analyze(base, input_size=spec.input_size)
    _, per_part = flop_counts(anatomy.graph_module, x)
    paths = paths_per_sample(rule, options, n)
    extra_flops = sum((paths - 1) * per_part.get(s.name, 0) / x.shape[0] + rule_flops(rule, options, s, n, *link) for s, link in zip(stages, chain))
    assert flop_counts(gm, x)[0] / x.shape[0] == pytest.approx(flop_counts(base, x)[0] / x.shape[0] + extra_flops, rel=1e-12)


@pytest.mark.parametrize("rule", ["cross-connections", "cross-prediction"])
@RULE_SETTINGS
@given(spec=backbones(), branches=st.integers(2, 4), data=st.data())
def test_paths_are_combined_before_every_stage_that_is_not_routed(rule, spec, branches, data):
    count = len(spec.stages)
    routed = data.draw(st.lists(st.integers(1, count), min_size=1, unique=True), label="routed")
    base, gm, x = convert(spec, branches, rule, routed=routed)
    with torch.no_grad():
        assert max_relative_error(base(x), gm(x)) <= 1e-5
    routed = sorted(routed)
    flows = not spec.side_values
    assert links(gm) == [(flows and i - 1 in routed, flows and i + 1 in routed) for i in routed]
    stages = {s.index: s for s in gm.meta["rmn_stages"]}
    extra = sum((branches - 1) * stages[i].params + rule_params(rule, {}, stages[i], branches, *link) for i, link in zip(routed, links(gm)))
    assert count_params(gm) == count_params(base) + extra


@routings
@RULE_SETTINGS
@given(spec=backbones(), branches=branch_counts)
def test_eval_output_of_a_sample_does_not_depend_on_its_batch(rule, options, spec, branches):
    """In float64, so that the kernels' own batch-size dependence (up to 2e-5 relative for
    a float32 Conv3d with GroupNorm) stays far below what a routing leak would show."""
    _, gm, x = convert(spec, branches, rule, options)
    gm, x = gm.double(), x.double()
    with torch.no_grad():
        batched = gm(x)
        for i in range(x.shape[0]):
            assert max_relative_error(batched[i : i + 1], gm(x[i : i + 1])) <= 1e-10


def chosen_procedures(gm, rule: str, options: dict) -> tuple[list[list[torch.Tensor]], list]:
    """The procedures each sample was sent to, per routed stage and forward: [B] routes for
    memory, [B, k] for the gate (recomputed from its probabilities), all N for paths."""
    if rule == "memory":
        return record_routes(gm)
    chosen: list[list[torch.Tensor]] = [[] for _ in routed_stages(gm)]

    def recorder(i):
        def hook(stage, args):
            x = args[0][0] if isinstance(args[0], tuple) else args[0]
            if rule == "gate":
                chosen[i].append(stage.probabilities(x).topk(stage.top_k, dim=1).indices.detach())
            else:
                chosen[i].append(torch.arange(stage.branches).repeat(x.shape[0], 1))

        return hook

    return chosen, [s.register_forward_pre_hook(recorder(i)) for i, s in enumerate(routed_stages(gm))]


@routings
@RULE_SETTINGS
@given(spec=backbones(), branches=st.integers(4, 8))
def test_each_sample_runs_its_procedures_and_backward_reaches_only_those(rule, options, spec, branches):
    _, gm, x = convert(spec, branches, rule, options)
    x = x[:3]  # fewer samples than procedures: hard rules must leave some procedures idle
    chosen, handles = chosen_procedures(gm, rule, options)
    ran: dict[int, int] = {}  # samples each procedure ran on, by id(procedure)
    for stage in routed_stages(gm):
        for p in stage.procedures:
            handles.append(p.register_forward_pre_hook(lambda m, a: ran.__setitem__(id(m), ran.get(id(m), 0) + a[0].shape[0])))
    with hooks(handles):
        gm.train()
        gm(x).square().sum().backward()
    for stage, stage_chosen in zip(routed_stages(gm), chosen):
        picks = torch.cat(stage_chosen).reshape(-1)
        assert picks.numel() == x.shape[0] * paths_per_sample(rule, options, branches)
        counts = [ran.get(id(p), 0) for p in stage.procedures]
        assert counts == torch.bincount(picks, minlength=branches).tolist()  # each sample: its procedures only
        used = set(picks.tolist())
        for j, procedure in enumerate(stage.procedures):
            reached = any(p.grad is not None for p in procedure.parameters())
            assert reached == (j in used), f"procedure {j}: reached={reached}, used={sorted(used)}"
        if rule == "memory":
            assert len(used) < branches
            assert not stage.router.memory.requires_grad and stage.router.memory.grad is None


@routings
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=backbones(max_stages=3), branches=st.integers(2, 4))
def test_training_breaks_the_clones_symmetry_and_reaches_every_routing_parameter(rule, options, spec, branches):
    """Clones start identical; a few SGD steps later every stage's clones differ (for the
    soft rules and the gate; memory routing separates them by its k-means step), and a
    backward pass reaches every parameter of the rule (gates, mixers, attention), with a
    nonzero gradient in each of its modules (a single parameter may sit behind a ReLU that
    is off for the whole batch, as in any MLP)."""
    base = spec.build()
    size = spec.input_size
    gm = rmn_fx.transform(base, branches=branches, routing=rule, input_size=size, **options)
    x = torch.randn(16, *size, generator=torch.Generator().manual_seed(3))
    if rule == "memory":
        spread_routes(gm, x)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    gm.train()
    for _ in range(3):
        optimizer.zero_grad()
        gm(x).logsumexp(dim=1).mean().backward()
        optimizer.step()
    for stage in routed_stages(gm):
        clones = [torch.cat([p.detach().flatten() for p in procedure.parameters()]) for procedure in stage.procedures]
        assert rule == "memory" or all(not torch.equal(clones[0], other) for other in clones[1:]), f"{rule}: clones still identical"
        for module_name, module in stage.named_children():
            if module_name != "procedures" and any(True for _ in module.parameters()):
                assert all(p.grad is not None for p in module.parameters()), f"{rule}: {module_name} is not in the graph"
                assert sum(p.grad.abs().sum() for p in module.parameters()) > 0, f"{rule}: {module_name} gets no gradient"


@routings
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=backbones(max_stages=3), branches=branch_counts)
def test_save_load_round_trip_gives_identical_outputs(tmp_path_factory, rule, options, spec, branches):
    _, gm, x = convert(spec, branches, rule, options)
    path = tmp_path_factory.mktemp("rt") / "model.pt"
    rmn_fx.save(gm, str(path))
    loaded = rmn_fx.load(str(path), model=spec.build().to(x.dtype))  # float64 for a video backbone, as convert made it
    assert [type(s) for s in routed_stages(loaded)] == [type(s) for s in routed_stages(gm)]
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))


@pytest.mark.parametrize("rule, top_k, branches", [("gate", 2, 2), ("cross-connections", None, 3)])
def test_flops_of_work_done_once_per_forward_are_counted_once_per_procedure_run(rule, top_k, branches):
    """A batch-independent table inside a stage is computed by every procedure that runs:
    the FLOPs prediction splits each procedure's cost into per-sample and per-call parts."""
    from tiny_models import tiny_table

    from rmn_fx.measure import compare, run_with_procedure_costs

    torch.manual_seed(0)
    base = tiny_table().eval()
    gm = rmn_fx.transform(base, branches=branches, input_size=(3, 32, 32), routing=rule, top_k=top_k)
    randomize_rule_weights(gm)
    x = torch.randn(6, 3, 32, 32)
    _, costs = run_with_procedure_costs(gm, x)
    assert all(c.per_call == 2 * (1 * 32 + 32 * s.spec.out_channels) * 64 for c, s in zip(costs, rmn_fx.nn.routed_stages(gm)))
    assert all(c.calls == branches for c in costs)  # every procedure ran: the table was computed N times
    row = compare(base, gm, x)
    assert row["max_relative_error"] < 1e-5
    assert row["converted_flops_per_sample"] == pytest.approx(row["expected_flops_per_sample"], rel=1e-12)
    assert row["converted_flops_per_sample"] > row["base_flops_per_sample"]  # the price of routing it
