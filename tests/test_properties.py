"""Properties of every conversion, over random backbones whose true stages are known."""

from __future__ import annotations

import torch
from backbones import backbones
from helpers import (
    attention_flops,
    attention_params,
    max_relative_error,
    record_routes,
    routed_stages,
    spread_routes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rmn_fx
from rmn_fx.nn.modes import hooks
from rmn_fx.measure import count_params, flop_counts

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
branch_counts = st.integers(1, 8)


def convert(spec, branches, attention):
    base = spec.build().eval()
    size = (3, spec.input_side, spec.input_side)
    gm = rmn_fx.transform(base, branches=branches, attention=attention, input_size=size).eval()
    x = torch.randn(max(branches, 3), *size, generator=torch.Generator().manual_seed(1))
    return base, gm, x


@PROPERTY_SETTINGS
@given(backbones())
def test_detected_stages_are_the_true_stages(spec):
    anatomy = rmn_fx.analyze(spec.build(), input_size=(3, spec.input_side, spec.input_side))
    assert [s.modules for s in anatomy.stages] == spec.expected


@PROPERTY_SETTINGS
@given(backbones(), branch_counts, st.booleans())
def test_conversion_preserves_function_flops_and_parameter_anatomy(spec, branches, attention):
    base, gm, x = convert(spec, branches, attention)
    with torch.no_grad():
        want = base(x)
        assert max_relative_error(want, gm(x)) <= 1e-5  # memories at zero: one procedure
        spread_routes(gm, x)
        got = gm(x)
    assert max_relative_error(want, got) <= 1e-5  # every procedure used: still the same function

    stages = gm.meta["rmn_stages"]
    extra_params = sum((branches - 1) * s.params + attention * attention_params(s.out_channels, branches) for s in stages)
    assert count_params(gm) == count_params(base) + extra_params

    base_flops, _ = flop_counts(base, x)
    rmn_flops, _ = flop_counts(gm, x)
    extra_flops = attention * sum(attention_flops(s.out_channels, branches) for s in stages)
    assert rmn_flops / x.shape[0] == base_flops / x.shape[0] + extra_flops


@PROPERTY_SETTINGS
@given(backbones(), branch_counts, st.booleans())
def test_eval_output_of_a_sample_does_not_depend_on_its_batch(spec, branches, attention):
    _, gm, x = convert(spec, branches, attention)
    spread_routes(gm, x)
    with torch.no_grad():
        batched = gm(x)
        for i in range(x.shape[0]):
            assert max_relative_error(batched[i : i + 1], gm(x[i : i + 1])) <= 1e-5


@PROPERTY_SETTINGS
@given(backbones(), st.integers(4, 8), st.booleans())
def test_each_sample_runs_one_procedure_and_backward_reaches_only_those(spec, branches, attention):
    _, gm, x = convert(spec, branches, attention)
    spread_routes(gm, x)
    x = x[:3]  # fewer samples than procedures: some procedures must stay idle
    routes, handles = record_routes(gm)
    ran: dict[int, int] = {}  # samples each procedure ran on, by id(procedure)
    for stage in routed_stages(gm):
        for p in stage.procedures:
            handles.append(p.register_forward_pre_hook(lambda m, a: ran.__setitem__(id(m), ran.get(id(m), 0) + a[0].shape[0])))
    with hooks(handles):
        gm.train()
        gm(x).square().sum().backward()
    for stage, stage_routes in zip(routed_stages(gm), routes):
        route = torch.cat(stage_routes)
        counts = [ran.get(id(p), 0) for p in stage.procedures]
        assert counts == torch.bincount(route, minlength=branches).tolist()  # one procedure per sample
        used = set(route.tolist())
        assert len(used) < branches
        for j, procedure in enumerate(stage.procedures):
            reached = any(p.grad is not None for p in procedure.parameters())
            assert reached == (j in used), f"procedure {j}: reached={reached}, used={sorted(used)}"
        assert not stage.router.memory.requires_grad and stage.router.memory.grad is None


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backbones(max_stages=3), branch_counts, st.booleans())
def test_save_load_round_trip_gives_identical_outputs(tmp_path_factory, spec, branches, attention):
    _, gm, x = convert(spec, branches, attention)
    spread_routes(gm, x)
    path = tmp_path_factory.mktemp("rt") / "model.pt"
    rmn_fx.save(gm, str(path))
    loaded = rmn_fx.load(str(path), model=spec.build())
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
