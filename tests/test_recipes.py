"""Recipe steps 2 (procedure cloning with optimizer state) and 3 (k-means memories)."""

from __future__ import annotations

import pytest
import torch
from rmn_fx.recipes import (
    MemoryInitError,
    clone_procedures,
    collect_keys,
    init_memories,
)
from sklearn.cluster import KMeans

from rmn_fx.measure import spread_routes
from rmn_fx.nn.modes import hooks
from rmn_fx.nn.routed_stage import routed_stages


def batches(n=4, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 4, (size,), generator=generator)) for _ in range(n)]


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-5),
    lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
])
def test_cloning_copies_procedure_zero_and_its_optimizer_state(make_optimizer, converted):
    gm = converted().train()
    optimizer = make_optimizer(gm.parameters())
    for x, y in batches(2):  # stem phase: memories at zero, every sample through procedure 0
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(gm(x), y).backward()
        optimizer.step()
    clone_procedures(gm, optimizer)
    for stage in routed_stages(gm):
        source = dict(stage.procedures[0].named_parameters())
        for clone in stage.procedures[1:]:
            for name, param in clone.named_parameters():
                assert torch.equal(param, source[name]) and param.data_ptr() != source[name].data_ptr()
                want, got = optimizer.state[source[name]], optimizer.state[param]
                assert want.keys() == got.keys()
                for key, value in want.items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(value, got[key]) and value.data_ptr() != got[key].data_ptr()
            for (name, buffer), (_, src) in zip(clone.named_buffers(), stage.procedures[0].named_buffers()):
                assert torch.equal(buffer, src), name


def test_after_cloning_any_routing_computes_the_same_function(converted):
    gm = converted(attention=False).train()  # trained attention reads the route code, so it is left out
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    torch.nn.functional.cross_entropy(gm(x), y).backward()
    optimizer.step()
    clone_procedures(gm, optimizer)
    gm.eval()
    with torch.no_grad():
        before = gm(x)
        spread_routes(gm, x)
        assert torch.allclose(gm(x), before, rtol=1e-5, atol=1e-6)


def test_memories_are_the_kmeans_centres_of_the_stage_keys(converted):
    gm = converted(branches=4)
    data = batches(4)
    init_memories(gm, data, seed=3)
    for stage, keys in zip(routed_stages(gm), collect_keys(gm, data)):
        centres = KMeans(n_clusters=4, random_state=3, n_init=4).fit(keys.double().numpy()).cluster_centers_
        assert torch.allclose(stage.router.memory, torch.from_numpy(centres).float(), atol=1e-5)
    routes = []
    with hooks(s.router.register_forward_hook(lambda m, a, out: routes.append(out)) for s in routed_stages(gm)), torch.no_grad():
        gm.eval()(torch.cat([x for x, _ in data]))
    assert all(len(set(r.tolist())) > 1 for r in routes)  # the batch spreads over procedures


def test_sample_cap_limits_the_keys(converted):
    gm = converted()
    assert all(k.shape[0] == 12 for k in collect_keys(gm, batches(4), max_samples=12))


def test_kmeans_needs_as_many_samples_as_procedures(converted):
    gm = converted(branches=8)
    with pytest.raises(MemoryInitError, match="at least 8 distinct samples"):
        init_memories(gm, batches(1, size=5))
