"""Fixtures shared by the test modules."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import rmn_fx


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (`pytest -n 2`), give each worker its share of the cores, for its
    own ops and for the processes it starts: threads that outnumber the cores spin against
    each other and make the parallel run slower than a serial one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_workers()


@pytest.fixture
def converted():
    """Build a converted ResNet-18 for 4 classes at 32x32 (seeded): the recipes' test model."""

    def build(branches: int = 3, attention: bool = True):
        torch.manual_seed(0)
        return rmn_fx.transform("resnet18", branches=branches, attention=attention, num_classes=4, input_size=(3, 32, 32))

    return build


@pytest.fixture(autouse=True)
def free_sweep_models(request):
    """After a zoo or slow test, collect its models now: GraphModules hold reference cycles,
    and a sweep of large models (ViT-H) must not pile up until the cyclic collector runs."""
    yield
    if request.node.get_closest_marker("zoo") or request.node.get_closest_marker("slow"):
        gc.collect()
