"""The training steps as functions a user can put in their own loop.

    set_phase(model, "stem")            step 1: plain network (procedure 0), CA on random routes
    train_epoch(...)                    one epoch of either phase
    clone_procedures(model, optimizer)  step 2 (cloning.py)
    init_memories(model, batches)       step 3 (memory_init.py)
    set_phase(model, "routed")          step 4: routing, moving-average memories
    evaluate(model, batches)            accuracy and where the samples went

`train_stem` and `train_routed` run whole phases on one LR curve (`WarmupCosine`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rmn_fx.errors import RMNError
from rmn_fx.routed_stage import routed_stages

from .monitor import DeadProcedureMonitor
from .schedule import set_lr

PHASES = ("stem", "routed")


class DivergenceError(RMNError):
    """The loss became NaN or infinite."""


def set_phase(model: nn.Module, phase: str) -> None:
    """"stem": every sample through procedure 0 (step 1); "routed": route by memory (step 4)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    for stage in routed_stages(model):
        stage.stem_phase = phase == "stem"


@dataclass
class EpochTotals:
    """Running sums of an epoch, so that an interrupted epoch can be continued exactly."""

    loss: float = 0.0
    correct: int = 0
    samples: int = 0
    steps: int = 0
    interrupted: bool = False

    @property
    def mean_loss(self) -> float:
        return self.loss / self.samples if self.samples else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else math.nan


@dataclass
class StepContext:
    """How to run a step: device, autocast, loss scaling, the LR curve and the monitors."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False
    scaler: torch.amp.GradScaler | None = None
    schedule: Callable[[int], float] | None = None
    monitor: DeadProcedureMonitor | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # sums over ranks (DDP)
    should_stop: Callable[[], bool] = lambda: False
    progress: str | None = None

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if self.device.type == "cuda" else torch.bfloat16)


def train_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    context: StepContext | None = None,
    first_step: int = 0,
    totals: EpochTotals | None = None,
    loss_fn=F.cross_entropy,
) -> EpochTotals:
    """Train over `batches` of (images, labels). The epoch starts at step `first_step` of the
    LR curve; `totals` of a partly done epoch continue it (its steps count on). Stops early, after a whole step, when `context.should_stop()` (on
    any rank: the flag is reduced with the step's statistics) and sets `interrupted`.
    Raises DivergenceError, before the optimizer step, if the loss is not finite."""
    context = context or StepContext()
    totals = totals or EpochTotals()
    model.train()
    for images, labels in tqdm(batches, desc=context.progress, disable=None if context.progress else True, leave=False):
        images, labels = images.to(context.device, non_blocking=True), labels.to(context.device, non_blocking=True)
        step = first_step + totals.steps
        if context.schedule is not None:
            set_lr(optimizer, context.schedule(step))
        with context.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        stop = 1.0 if context.should_stop() else 0.0  # summed over ranks: all stop at the same step
        stats = torch.stack([loss.detach().float() * labels.shape[0], (logits.argmax(1) == labels).sum().float()])
        stats = torch.cat([stats, stats.new_tensor([labels.shape[0], stop])])
        if context.reduce is not None:
            context.reduce(stats)
        if not torch.isfinite(stats[0]):
            raise DivergenceError(f"the loss became {float(stats[0])} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        if context.scaler is not None:
            context.scaler.scale(loss).backward()
            context.scaler.step(optimizer)
            context.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if context.monitor is not None:
            context.monitor.after_step(optimizer)
        totals.loss += float(stats[0])
        totals.correct += int(stats[1])
        totals.samples += int(stats[2])
        totals.steps += 1
        if stats[3] > 0:
            totals.interrupted = True
            break
    return totals


def train_stem(model, epochs: int, batches_for_epoch: Callable[[int], Iterable], optimizer, context=None) -> list[EpochTotals]:
    """Step 1: `epochs` epochs of the plain network; the LR curve starts at step 0."""
    set_phase(model, "stem")
    return _train_epochs(model, range(epochs), batches_for_epoch, optimizer, context)


def train_routed(model, epochs: range, batches_for_epoch: Callable[[int], Iterable], optimizer, context=None) -> list[EpochTotals]:
    """Step 4: the epochs `epochs` (e.g. range(40, 120)) with routing, continuing the LR curve."""
    set_phase(model, "routed")
    return _train_epochs(model, epochs, batches_for_epoch, optimizer, context)


def _train_epochs(model, epochs, batches_for_epoch, optimizer, context) -> list[EpochTotals]:
    results = []
    for epoch in epochs:
        batches = batches_for_epoch(epoch)  # a DataLoader: epochs of equal length
        results.append(train_epoch(model, batches, optimizer, context, first_step=epoch * len(batches)))
    return results


@dataclass
class RouteCounts:
    """Test-set routing of one stage: samples per (procedure, class) and (procedure, context)."""

    by_class: torch.Tensor
    by_context: torch.Tensor | None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    num_classes: int,
    contexts: Iterable | None = None,
    context_count: int = 0,
    device: torch.device | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict, list[RouteCounts]]:
    """Loss and accuracy over `batches`, and the routes of every routed stage
    (empty while the model is in the stem phase). `contexts` yields one tensor of context
    indices per batch (the embedded data's hidden contexts)."""
    stages = routed_stages(model)
    routes: list[torch.Tensor | None] = [None] * len(stages)
    handles = [s.router.register_forward_hook(lambda m, a, out, i=i: routes.__setitem__(i, out)) for i, s in enumerate(stages)]
    device = device or next(model.parameters()).device
    by_class = [torch.zeros(s.branches, num_classes, dtype=torch.long, device=device) for s in stages]
    by_context = [torch.zeros(s.branches, max(context_count, 1), dtype=torch.long, device=device) for s in stages]
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    context_iter = iter(contexts) if contexts is not None else None
    try:
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            routes[:] = [None] * len(stages)
            logits = model(images).float()
            stats += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), (logits.argmax(1) == labels).sum().double(), torch.tensor(float(len(labels)), device=device, dtype=torch.float64)])
            batch_contexts = next(context_iter).to(device) if context_iter is not None else None
            for i, route in enumerate(routes):
                if route is None:
                    continue
                by_class[i].index_put_((route, labels), torch.ones_like(route), accumulate=True)
                if batch_contexts is not None:
                    by_context[i].index_put_((route, batch_contexts), torch.ones_like(route), accumulate=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if reduce is not None:
        for t in (stats, *by_class, *by_context):
            reduce(t)
    summary = {"loss": float(stats[0] / stats[2]), "accuracy": float(stats[1] / stats[2]), "samples": int(stats[2])}
    counts = [RouteCounts(c.cpu(), x.cpu() if contexts is not None else None) for c, x in zip(by_class, by_context)]
    return summary, counts
