"""Parameter and FLOP counts, measured the same way for base and converted models.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on a real forward pass: it
counts matrix multiplications and convolutions (2 FLOPs per multiply-add); pooling,
element-wise ops and the router's distance computation are not counted, for either model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def flop_counts(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total FLOPs of `model(x)` and FLOPs per module path (without the root's class prefix)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    per_module = {}
    for name, counts in counter.get_flop_counts().items():
        _, _, path = name.partition(".")
        if path:
            per_module[path] = sum(counts.values())
    return counter.get_total_flops(), per_module


def flops_per_sample(model: nn.Module, x: torch.Tensor) -> float:
    return flop_counts(model, x)[0] / x.shape[0]
