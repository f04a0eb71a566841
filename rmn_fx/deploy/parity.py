"""Does an exported artifact compute what the eager model computes, routes and all?"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..measure import relative_error
from ..nn.modes import hooks, training_mode
from ..nn.routed_stage import routed_stages

TOLERANCE = 1e-4  # max |eager - exported| / max |eager|


@dataclass(frozen=True)
class ParityRow:
    batch: int
    relative_error: float
    procedures_used: list[int]  # per routed stage: how many procedures got a sample (eager)

    @property
    def ok(self) -> bool:
        return self.relative_error <= TOLERANCE


def procedures_used(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Per routed stage, how many procedures the samples of `x` go to (eval mode)."""
    used = []
    stages = routed_stages(model)

    def record(kind, value):
        if kind == "route":
            used.append(int(value.unique().numel()))

    with hooks(h for s in stages for h in s.watch(record)), training_mode(model, False), torch.no_grad():
        model(x)
    return used


def check_parity(
    model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, batches: Sequence[int] = (1, 2, 7, 64), seed: int = 0
) -> list[ParityRow]:
    """Run the eager `model` and the exported `run` on random batches shaped like `example`."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batches:
        x = torch.randn(batch, *example.shape[1:], generator=generator).to(example.device, example.dtype)
        with training_mode(model, False), torch.no_grad():
            want = model(x)
        got = run(x)
        rows.append(ParityRow(batch, relative_error(want, got.to(want.device)), procedures_used(model, x)))
    return rows
