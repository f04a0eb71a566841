"""The learning-rate curve of the paper: linear warm-up, then cosine decay, per step.

One curve covers the whole run: stem training uses its start, routed training continues
it where stem training stopped (step 4 of the method: "same LR curve, same total epochs").
The curve is a pure function of the global step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """lr(step): `start` -> `peak` linearly over `warmup_steps`, then cosine to `floor` at `total_steps`."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    start: float = 1e-5
    floor: float = 1e-5

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
