"""Dead procedures: detection, revival, and the load balance of every routed stage.

The paper lost about 40% of its procedures at batch 128: their memories drifted away from
every key and never received a sample again. `DeadProcedureMonitor` watches the routers'
sample counters after each step. A procedure that received no sample for `window` steps
is dead; with `revive` on (the default) it is brought back by splitting the busiest
procedure of its stage (one revival per stage and step): the busiest memory and the dead one move to either side of the
busiest procedure's recent keys along their principal direction, and the busiest
procedure's parameters, buffers and optimizer state are copied into the dead one (as in
cloning), so that the samples it now receives meet a trained procedure.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rmn_fx.nn.routed_stage import RoutedStage, routed_stages

from .cloning import copy_procedure


class DeadProcedureMonitor:
    """Per-stage step of the last sample of every procedure; revives the dead ones."""

    def __init__(self, model: nn.Module, window: int = 50, revive: bool = True, broadcast=None) -> None:
        self.stages = routed_stages(model)
        self.window, self.revive = window, revive
        self.broadcast = broadcast  # data-parallel: copy rank 0's tensor to every rank, in place
        self.step = 0
        self.last_seen = [torch.zeros(s.branches, dtype=torch.long) for s in self.stages]
        self.previous = [s.router.samples.detach().cpu().clone() for s in self.stages]
        self.revived = 0
        self.recent: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.stages)  # per stage: keys, routes
        for i, stage in enumerate(self.stages):
            stage.router.register_forward_hook(self._recorder(i))

    def _recorder(self, i: int):
        """A forward hook keeping stage i's latest training keys and routes (for the split)."""

        def record(router: nn.Module, args: tuple, route: torch.Tensor) -> None:
            if router.training:
                self.recent[i] = (args[0].detach(), route)

        return record

    def state_dict(self) -> dict:
        return {"step": self.step, "last_seen": self.last_seen, "previous": self.previous, "revived": self.revived}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.revived = state["step"], state["revived"]
        self.last_seen = [t.clone() for t in state["last_seen"]]
        self.previous = [t.clone() for t in state["previous"]]

    def dead(self) -> list[list[int]]:
        """Per stage, the procedures without a sample in the last `window` steps."""
        return [(self.step - seen >= self.window).nonzero().flatten().tolist() for seen in self.last_seen]

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> list[tuple[int, int]]:
        """Record this step's routes; revive the dead. Returns (stage, procedure) revived."""
        self.step += 1
        revived = []
        for i, stage in enumerate(self.stages):
            counts = stage.router.samples.detach().cpu()
            self.last_seen[i][counts > self.previous[i]] = self.step
            self.previous[i] = counts.clone()
            if not self.revive:
                continue
            dead = (self.step - self.last_seen[i] >= self.window).nonzero().flatten().tolist()
            if dead:  # one per stage and step: the next split needs the next step's routes
                self._revive(stage, self.recent[i], dead[0], optimizer)
                self.last_seen[i][dead[0]] = self.step
                revived.append((i, dead[0]))
        self.revived += len(revived)
        return revived

    @torch.no_grad()
    def _revive(self, stage: RoutedStage, recent: tuple[torch.Tensor, torch.Tensor] | None, dead: int, optimizer) -> None:
        router = stage.router
        if recent is not None and recent[1].numel():
            keys, routes = recent
            busiest = int(torch.bincount(routes.cpu(), minlength=stage.branches).argmax())
            keys = keys[routes == busiest]
        else:
            busiest, keys = 0, router.memory[:1]
        centre, offset = split_directions(keys, router.memory[busiest])
        router.memory[busiest] = centre - offset
        router.memory[dead] = centre + offset
        if self.broadcast is not None:
            self.broadcast(router.memory)
        copy_procedure(stage.procedures[busiest], stage.procedures[dead], optimizer)


def split_directions(keys: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of `keys` and half a standard deviation along their principal direction
    (a tiny nudge of `memory` when there are too few keys to have a direction)."""
    keys = keys.to(memory.dtype)
    if keys.shape[0] < 2:
        return memory.clone(), 1e-3 * (memory.abs().mean() + 1e-6) * torch.ones_like(memory)
    centre = keys.mean(0)
    _, singular, directions = torch.linalg.svd(keys - centre, full_matrices=False)
    spread = singular[0] / math.sqrt(keys.shape[0] - 1)
    return centre, 0.5 * spread * directions[0]


def load_balance(counts: torch.Tensor) -> dict:
    """How evenly a stage's samples spread: entropy / log N (1 = even) and max/min."""
    counts = counts.double()
    total = counts.sum()
    if total == 0 or len(counts) < 2:
        return {"entropy": 1.0, "max_over_min": 1.0}
    p = counts / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(counts)))
    least = float(counts.min())
    return {"entropy": entropy, "max_over_min": float(counts.max()) / least if least else math.inf}
