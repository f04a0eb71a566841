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

from rmn_fx.errors import RMNError
from rmn_fx.nn.modes import hooks, training_mode
from rmn_fx.nn.routed_stage import routed_stages

from .distributed import model_device
from .monitor import DeadProcedureMonitor
from .progress import progress
from .schedule import set_lr

LOSS_WINDOW = 20  # steps over which an exploding loss is judged


class DivergenceError(RMNError):
    """The loss became NaN or infinite, or exploded past the run's limit while finite
    (`over_limit`: the run's loss limit, not non-finite arithmetic, stopped it)."""

    def __init__(self, message: str, over_limit: bool = False) -> None:
        super().__init__(message)
        self.over_limit = over_limit


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of one training step: its randomness (dropout, drop-path, the stem phase's
    random attention routes) depends on (seed, step, rank) only, so a run resumed at any
    step draws what the uninterrupted run drew, whatever else consumed random numbers."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % 2**63


def set_phase(model: nn.Module, phase: str) -> None:
    """"stem": every sample through procedure 0 (step 1); "routed": route by memory (step 4)."""
    for stage in routed_stages(model):
        stage.set_phase(phase)


@dataclass
class EpochTotals:
    """Running sums of an epoch, so that an interrupted epoch can be continued exactly."""

    loss: float = 0.0
    correct: int = 0
    samples: int = 0
    steps: int = 0
    auxiliary_loss: float = 0.0  # sum over steps of the rules' auxiliary loss (unweighted)
    auxiliary_steps: int = 0
    interrupted: bool = False
    recent_losses: list[float] = field(default_factory=list)  # the last LOSS_WINDOW steps' mean losses

    def record(self, loss_sum: float, correct: int, samples: int) -> None:
        self.loss += loss_sum
        self.correct += correct
        self.samples += samples
        self.steps += 1
        self.recent_losses = (self.recent_losses + [loss_sum / samples])[-LOSS_WINDOW:]

    @property
    def recent_mean_loss(self) -> float:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else math.nan

    @property
    def mean_auxiliary_loss(self) -> float:
        return self.auxiliary_loss / self.auxiliary_steps if self.auxiliary_steps else math.nan

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
    seed: int | None = None  # set: every step is seeded by step_seed(seed, step, rank)
    rank: int = 0
    world: int = 1  # ranks whose statistics `reduce` sums
    max_loss: float | None = None  # a loss averaged over LOSS_WINDOW steps above it stops the run
    auxiliary_weight: float = 0.0  # weight of the rules' auxiliary losses (the gate's load balancing)

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
    LR curve; `totals` of a partly done epoch continue it (its steps count on). Stops early,
    after a whole step, when `context.should_stop()` (on any rank: the flag is reduced with
    the step's statistics) and sets `interrupted`. Raises DivergenceError, before the
    optimizer step, if the loss is not finite, and after it if the loss averaged over the
    last LOSS_WINDOW steps exceeds `context.max_loss`."""
    context = context or StepContext()
    totals = totals or EpochTotals()
    stages = routed_stages(model)
    model.train()
    status = lambda: f"loss {totals.recent_mean_loss:.4f}"
    for images, labels in progress(batches, context.progress, status=status):
        images, labels = images.to(context.device, non_blocking=True), labels.to(context.device, non_blocking=True)
        step = first_step + totals.steps
        if context.seed is not None:
            torch.manual_seed(step_seed(context.seed, step, context.rank))
        if context.schedule is not None:
            set_lr(optimizer, context.schedule(step))
        with context.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        auxiliary = auxiliary_loss(stages)
        stop = 1.0 if context.should_stop() else 0.0  # summed over ranks: all stop at the same step
        stats = torch.stack([loss.detach().float() * labels.shape[0], (logits.argmax(1) == labels).sum().float()])
        aux_stat = stats.new_zeros(1) if auxiliary is None else auxiliary.detach().float().reshape(1)  # no host sync
        stats = torch.cat([stats, stats.new_tensor([labels.shape[0], stop]), aux_stat])
        if context.reduce is not None:
            context.reduce(stats)
        if not torch.isfinite(stats[0]):
            raise DivergenceError(f"the loss became {float(stats[0])} at step {step}")
        if auxiliary is not None:
            loss = loss + context.auxiliary_weight * auxiliary
            totals.auxiliary_loss += float(stats[4]) / context.world
            totals.auxiliary_steps += 1
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
        totals.record(float(stats[0]), int(stats[1]), int(stats[2]))
        if context.max_loss is not None and len(totals.recent_losses) == LOSS_WINDOW and totals.recent_mean_loss > context.max_loss:
            raise DivergenceError(
                f"the loss exploded: it averaged {totals.recent_mean_loss:.4g} over the last {LOSS_WINDOW} steps, above the limit {context.max_loss:.4g} (at step {step})",
                over_limit=True,
            )
        if stats[3] > 0:
            totals.interrupted = True
            break
    return totals


def auxiliary_loss(stages) -> torch.Tensor | None:
    """The sum of the routed stages' auxiliary losses of the latest forward (None if none has one)."""
    losses = [loss for loss in (s.auxiliary_loss() for s in stages) if loss is not None]
    return torch.stack([loss.float() for loss in losses]).sum() if losses else None


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
    """Test-set routing of one routed stage (`stage`: its 1-based place among them): samples
    per (top procedure, class) and (top procedure, context), and for rules that mix paths
    the mean of each weighting they apply ("mix": [sources, destinations], "combine": [N])."""

    stage: int
    by_class: torch.Tensor
    by_context: torch.Tensor | None
    mean_weights: dict[str, torch.Tensor]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    num_classes: int,
    contexts: Iterable | None = None,
    context_count: int = 0,
    device: torch.device | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    desc: str | None = None,
) -> tuple[dict, list[RouteCounts]]:
    """Loss, accuracy and the accuracy of chance over `batches`, and the routes (each
    sample's top procedure, as the stage's `watch` reports it) and mean path weights of
    every routed stage that reports them (none in the stem phase). `contexts` yields one
    tensor of context indices per batch (the embedded data's hidden contexts); `desc` names
    the progress display."""
    stages = [s for s in routed_stages(model) if s.phase == "routed"]
    device = device or model_device(model)
    by_class = [torch.zeros(s.branches, num_classes, dtype=torch.long, device=device) for s in stages]
    by_context = [torch.zeros(s.branches, max(context_count, 1), dtype=torch.long, device=device) for s in stages]
    routing = [False] * len(stages)  # whether the stage reported routes
    weight_sums: list[dict[str, torch.Tensor]] = [{} for _ in stages]
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=device)
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    context_iter = iter(contexts) if contexts is not None else None
    labels = batch_contexts = None  # of the batch being evaluated, read by the recorders

    def recorder(i):
        def record(kind: str, value: torch.Tensor) -> None:
            if kind != "route":
                total = weight_sums[i].get(kind)
                weight_sums[i][kind] = value.detach().double().sum(0) + (0 if total is None else total)
                return
            routing[i] = True
            by_class[i].index_put_((value, labels), torch.ones_like(value), accumulate=True)
            if batch_contexts is not None:
                by_context[i].index_put_((value, batch_contexts), torch.ones_like(value), accumulate=True)

        return record

    watching = (handle for i, s in enumerate(stages) for handle in s.watch(recorder(i)))
    with hooks(watching), training_mode(model, False):
        for images, labels in progress(batches, desc):
            images, labels = images.to(device), labels.to(device)
            batch_contexts = next(context_iter).to(device) if context_iter is not None else None
            logits = model(images).float()
            stats += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), (logits.argmax(1) == labels).sum().double()])
            per_class += torch.bincount(labels, minlength=num_classes).double()
    if reduce is not None:
        for t in (stats, per_class, *by_class, *by_context, *(w for sums in weight_sums for w in sums.values())):
            reduce(t)
    samples = per_class.sum()
    summary = {
        "loss": float(stats[0] / samples),
        "accuracy": float(stats[1] / samples),
        "samples": int(samples),
        "chance_accuracy": float(per_class.max() / samples),  # always guessing the most frequent class
    }
    counts = [
        RouteCounts(i + 1, c.cpu(), x.cpu() if contexts is not None else None, {k: (w / samples).float().cpu() for k, w in sums.items()})
        for i, (c, x, r, sums) in enumerate(zip(by_class, by_context, routing, weight_sums))
        if r
    ]
    return summary, counts
