"""Step 2 of the RMN schedule: procedure cloning, optimizer state included.

After stem training (every sample through procedure 0), each routed stage's procedure 0
is copied into procedures 1..N-1, and so is the optimizer's per-parameter state (SGD
momentum buffers, Adam/RMSprop moments and step counts): every clone resumes the schedule
exactly where procedure 0 stands. Copies, not aliases: clones diverge from here on.
"""

from __future__ import annotations

import torch
from torch import nn

from rmn_fx.nn.routed_stage import routed_stages


def _copy_state(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def copy_procedure(source: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Copy parameters, buffers and per-parameter optimizer state of `source` into
    `target` (same architecture). Returns the number of parameter tensors copied."""
    source_params = dict(source.named_parameters())
    source_buffers = dict(source.named_buffers())
    copied = 0
    for name, param in target.named_parameters():
        param.copy_(source_params[name])
        if optimizer is not None:
            state = optimizer.state.get(source_params[name])
            if state:
                optimizer.state[param] = {k: _copy_state(v) for k, v in state.items()}
            else:
                optimizer.state.pop(param, None)
        copied += 1
    for name, buffer in target.named_buffers():
        buffer.copy_(source_buffers[name])
    return copied


def clone_procedures(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Copy procedure 0 of every routed stage (parameters, buffers, optimizer state) into
    its other procedures. Returns the number of parameter tensors cloned."""
    return sum(
        copy_procedure(stage.procedures[0], target, optimizer)
        for stage in routed_stages(model)
        for target in stage.procedures[1:]
    )
