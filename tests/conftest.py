"""Fixtures shared by the test modules."""

from __future__ import annotations

import gc

import pytest
import torch

import rmn_fx


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
