"""MemoryRouter, dispatch, Conditional Attention and memory-routed stages on their own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rmn_fx.nn import PartSpec, RoutingConfig, create_stage
from rmn_fx.nn.attention import ConditionalAttention
from rmn_fx.nn.routing import MemoryRouter, dispatch


def test_router_picks_the_nearest_memory_and_updates_by_moving_average():
    router = MemoryRouter(branches=3, key_dim=2, momentum=0.9)
    router.memory.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    keys = torch.tensor([[1.0, 0.0], [9.0, 1.0], [11.0, -1.0]])
    router.eval()
    assert router(keys).tolist() == [0, 1, 1]
    assert torch.equal(router.memory[1], torch.tensor([10.0, 0.0]))  # eval: untouched
    router.train()
    router(keys)
    expected = torch.tensor([[0.1, 0.0], [10.0, 0.0], [0.0, 10.0]])  # [1]: 0.9*[10,0] + 0.1*mean([9,1],[11,-1])
    assert torch.allclose(router.memory, expected)
    assert router.samples.tolist() == [1, 2, 0]


def test_router_memories_get_no_gradient():
    router = MemoryRouter(2, 4).train()
    key = torch.randn(5, 4, requires_grad=True)
    router(key)
    assert not router.memory.requires_grad
    assert "memory" in dict(router.named_buffers()) and not list(router.parameters())


def test_dispatch_runs_each_sample_through_its_procedure_only():
    procedures = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    x = torch.randn(7, 3)
    route = torch.tensor([2, 0, 2, 3, 0, 2, 3])
    calls = []
    for j, p in enumerate(procedures):
        p.register_forward_hook(lambda m, a, out, j=j: calls.append((j, a[0].shape[0])))
    y = dispatch(x, route, procedures)
    assert calls == [(0, 2), (2, 3), (3, 2)]  # procedure 1 got nothing and never ran
    for i in range(7):
        assert torch.allclose(y[i], procedures[route[i]](x[i : i + 1])[0], atol=1e-6)


def test_dispatch_handles_an_empty_batch():
    procedures = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))
    assert dispatch(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), procedures).shape == (0, 3)


def test_dispatch_keeps_a_channels_last_batch_channels_last():
    procedures = nn.ModuleList(nn.Conv2d(3, 5, 1) for _ in range(3)).to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 4, 4).to(memory_format=torch.channels_last)
    route = torch.tensor([2, 0, 2, 1, 0, 2])
    y = dispatch(x, route, procedures)
    assert y.is_contiguous(memory_format=torch.channels_last)
    for i in range(6):
        assert torch.allclose(y[i], procedures[route[i]](x[i : i + 1])[0], atol=1e-6)


def test_conditional_attention_looks_up_the_route_as_its_one_hot_code_would_multiply():
    ca = ConditionalAttention(channels=32, branches=4)
    nn.init.normal_(ca.excite.weight)
    nn.init.normal_(ca.excite.bias)
    y, route = torch.randn(6, 32, 3, 3), torch.tensor([3, 0, 1, 3, 2, 0])
    squeezed = torch.relu(ca.squeeze(y.mean((2, 3))))
    one_hot = torch.nn.functional.one_hot(route, 4).float()
    want = y * 2 * torch.sigmoid(ca.excite(torch.cat([squeezed, one_hot], 1)))[:, :, None, None]
    assert torch.allclose(ca(y, route), want, atol=1e-6)
    assert torch.allclose(ca.gate(y, one_hot), want, atol=1e-6)


def test_conditional_attention_is_the_identity_at_conversion_and_learns():
    ca = ConditionalAttention(channels=32, branches=4)
    y = torch.randn(5, 32, 3, 3)
    route = torch.tensor([0, 1, 2, 3, 0])
    assert torch.equal(ca(y, route), y)
    ca(y, route).square().sum().backward()
    assert ca.excite.weight.grad.abs().sum() > 0


def test_conditional_attention_depends_on_the_route_after_training():
    ca = ConditionalAttention(channels=16, branches=2, layout="NHWC")
    nn.init.normal_(ca.excite.weight)
    y = torch.randn(1, 4, 4, 16)
    assert not torch.allclose(ca(y, torch.tensor([0])), ca(y, torch.tensor([1])))


def block():
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def memory_stage(branches: int):
    return create_stage(block(), PartSpec(in_channels=4, out_channels=4), RoutingConfig("memory", branches))


@pytest.mark.parametrize("spatial", [1, 4])
def test_training_step_with_a_one_sample_procedure_does_not_crash(spatial):
    stage = memory_stage(3).train()
    x = torch.randn(4, 4, spatial, spatial)
    stage.router.memory.copy_(torch.stack([x[0].mean((1, 2)), x[1].mean((1, 2)), x[2].mean((1, 2)) + 100]))
    y = stage(x)  # procedure 1 receives exactly one sample, with batch norm in training mode
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert stage.procedures[1][0].weight.grad is not None
    assert stage.procedures[1].training  # back in training mode after its eval-mode step


@pytest.mark.parametrize("first_mode", [True, False])
def test_a_lone_training_sample_uses_running_statistics(first_mode):
    """Whichever mode the stage first ran in (the procedures followed by the attention are
    built then), it follows the stage's mode after."""
    stage = memory_stage(1)
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        first = stage.train(first_mode)(x)
        assert torch.equal(stage.train(not first_mode)(x), first)


def test_the_attention_gates_each_sub_batch_as_it_would_gate_the_whole_batch():
    """The memory rule runs the attention right after each procedure, with that procedure's
    route code: the same function as the attention over the dispatched batch."""
    stage = memory_stage(4).eval()
    nn.init.normal_(stage.attention.excite.weight)
    x = torch.randn(12, 4, 5, 5)
    stage.spread_over_procedures(x)
    route = stage.first_choice(x)
    assert route.unique().numel() == 4
    with torch.no_grad():
        want = stage.attention(dispatch(x, route, stage.procedures), route)
        assert torch.allclose(stage(x), want, atol=1e-6)


def rule_stage(rule: str, branches: int = 3, **spec_fields):
    spec = PartSpec(in_channels=4, out_channels=4, in_shape=(4, 5, 5), out_shape=(4, 5, 5), **spec_fields)
    return create_stage(block(), spec, RoutingConfig(rule, branches, top_k=1 if rule == "gate" else None))


def test_a_top_1_gate_weighs_by_exactly_one_yet_learns_from_the_task_loss():
    stage = rule_stage("gate").train()
    x = torch.randn(8, 4, 5, 5)
    stage(x).square().sum().backward()
    assert stage.gate.weight.grad.abs().sum() > 0  # through g / stopgrad(g), not only the balance loss
    assert stage.auxiliary_loss() is not None and stage.sample_counts().sum() == 8
    stage.eval()
    with torch.no_grad():
        chosen = stage.first_choice(x)
        expected = torch.stack([stage.procedures[int(j)](x[i : i + 1])[0] for i, j in enumerate(chosen)])
        assert torch.allclose(stage(x), expected, atol=1e-6)  # each sample: its procedure's output, times 1


@pytest.mark.parametrize("rule", ["cross-connections", "cross-prediction"])
def test_mixing_weights_sum_to_one_over_sources_for_any_parameters(rule):
    stage = rule_stage(rule, receives_paths=True)
    for p in stage.mixer.parameters():
        nn.init.normal_(p, std=30.0)  # far from any initialisation: saturated softmaxes
    weights = stage.mixing_weights([torch.randn(6, 4) * 100 for _ in range(3)])
    assert weights.shape == (6, 3, 3) and torch.isfinite(weights).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(6, 3))


def test_a_stage_that_emits_paths_returns_one_tensor_per_path_and_the_last_combines_them():
    first, last = rule_stage("cross-connections", emits_paths=True), rule_stage("cross-connections", receives_paths=True)
    x = torch.randn(2, 4, 5, 5)
    paths = first.eval()(x)
    assert isinstance(paths, tuple) and len(paths) == 3
    with torch.no_grad():  # identical clones: any weights summing to 1 give the plain composition
        assert torch.allclose(last.eval()(paths), last.procedures[0](first.procedures[0](x)), atol=1e-5)


@pytest.mark.parametrize("rule", ["cross-connections", "cross-prediction"])
def test_watch_reports_the_weights_a_multi_path_stage_applies_and_its_top_path(rule):
    first, last = rule_stage(rule, emits_paths=True), rule_stage(rule, receives_paths=True)
    for p in last.parameters():  # break the clones' symmetry, so the weights differ per sample
        nn.init.normal_(p, std=0.5)
    x = torch.randn(6, 4, 5, 5)
    seen = {"first": [], "last": []}
    handles = first.watch(lambda kind, v: seen["first"].append(kind)) + last.watch(lambda kind, v: seen["last"].append((kind, v)))
    with torch.no_grad():
        paths = first.eval()(x)
        out = last.eval()(paths)
    for handle in handles:
        handle.remove()
    assert seen["first"] == []  # hands its paths on unweighted: nothing to report
    reported = dict(seen["last"])
    assert list(reported) == ["mix", "combine", "route"]
    with torch.no_grad():  # what the forward used, recomputed from the stage's own methods
        mix = last.mixing_weights([last.key(p) for p in paths])
        mixed = torch.einsum("bst,bs...->bt...", mix, torch.stack(paths, 1)).unbind(1)
        outputs = torch.stack([proc(p) for proc, p in zip(last.procedures, mixed)], 1)
    assert torch.allclose(reported["mix"], mix)
    assert torch.allclose(reported["combine"].sum(1), torch.ones(6))
    assert torch.allclose(out, torch.einsum("bn,bn...->b...", reported["combine"], outputs), atol=1e-5)
    assert torch.equal(reported["route"], reported["combine"].argmax(1))  # the top path: the combiner's choice


def test_weighing_identical_paths_returns_them_exactly_and_keeps_the_plain_sums_gradients():
    from rmn_fx.nn.routed_stage import weigh

    torch.manual_seed(0)
    path = torch.randn(5, 1, 4, 3, 3) * 1e4  # large values: a plain weighted sum would round
    logits = torch.randn(5, 3, 2, requires_grad=True)
    weights = torch.softmax(logits, dim=1)  # 3 sources -> 2 destinations
    assert torch.equal(weigh(weights, path.expand(5, 3, 4, 3, 3)), path.expand(5, 2, 4, 3, 3))
    paths = torch.randn(5, 3, 4, 3, 3, requires_grad=True)
    ours = weigh(weights, paths)
    plain = torch.einsum("bst,bs...->bt...", weights, paths)
    assert torch.allclose(ours, plain, atol=1e-5)
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, (logits, paths), upstream, retain_graph=True)
    plain_grads = torch.autograd.grad(plain, (logits, paths), upstream)
    for got, want in zip(grads, plain_grads):
        assert torch.allclose(got, want, atol=1e-4)


def test_a_procedure_replaced_after_a_forward_is_the_one_that_runs():
    stage = memory_stage(2).eval()
    x = torch.randn(4, 4, 5, 5)
    stage.spread_over_procedures(x)
    with torch.no_grad():
        before = stage(x)
        stage.procedures[1] = block().eval()
        after = stage(x)
    route = stage.first_choice(x)
    assert torch.equal(after[route == 0], before[route == 0]) and not torch.allclose(after[route == 1], before[route == 1])
