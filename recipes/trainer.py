"""The `train` driver: the recipe's steps in order, in a run directory that survives crashes.

    train(config, run_dir, resume)   joins the process group, builds, runs, leaves the group

`Trainer` holds finished parts (built by `Trainer.build`) and only orders the steps:
stem epochs, cloning, k-means memories (memory routing only: the other rules train on
from the clones), routed epochs, a checkpoint after each. A resumed
run gives the uninterrupted run's result exactly: batches depend only on (seed, epoch),
augmentation on (seed, epoch, sample), the LR and every step's random draws on the step;
memories, monitors and optimizer state are in the checkpoint. Ctrl-C and SIGTERM (Slurm,
Kubernetes, `timeout`) stop after the current step with a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict

import torch

import rmn_fx
from rmn_fx.errors import TrainingInterrupted
from rmn_fx.measure import count_params
from rmn_fx.nn.routed_stage import routed_stages

from . import batches as B
from .builders import build_model, build_optimizer, pick_device
from .cloning import clone_procedures
from .config import RunConfig, RunError
from .data import Augmented, DataSplits, load_data
from .distributed import Group, local_device, prepare, start, stop
from .loop import (
    DivergenceError,
    EpochTotals,
    StepContext,
    evaluate,
    set_phase,
    train_epoch,
)
from .memory_init import init_memories
from .metrics import epoch_line, epoch_row
from .monitor import DeadProcedureMonitor
from .run_dir import RunDirectory
from .schedule import WarmupCosine
from .statistics import at_chance, routing_summary

MINIBATCH_KMEANS_ABOVE = 50_000  # samples; plain k-means below
LOSS_LIMIT_FACTOR = 10  # a loss above 10x that of a uniform guess, ln(classes), has exploded
SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def train(config: RunConfig, run_dir: str, resume: bool = False) -> dict:
    """Run (or resume) `config` in `run_dir`; returns the final evaluation."""
    with stop_at_once():
        device = local_device(pick_device(config.device))
        group = start(device)
    try:
        with stop_at_once():
            trainer = _prepare(config, run_dir, resume, device, group)
        return trainer.run()
    finally:
        stop(group)


def _prepare(config: RunConfig, run_dir: str, resume: bool, device: torch.device, group: Group) -> Trainer:
    """The trainer of a new, restarted or resumed run, its directory ready."""
    run = RunDirectory(run_dir, writer=group.is_main)
    if not resume:
        run.check_new()
    elif run.state == "finished":
        raise RunError(f"'{run_dir}' has finished; see its evaluation.json, or start a new run with another -o")
    trainer = Trainer.build(config, run, device, group)
    if resume and run.state == "checkpointed":
        trainer.restore(run.load_checkpoint())
    else:  # a new run, or one stopped before its first checkpoint: (re)start it
        run.create(config)
        run.check_free_space(trainer.tensor_bytes())
        group.barrier()
    return trainer


def log(group: Group, text: str) -> None:
    """A line for the user on the main rank's standard output (errors and progress go to stderr)."""
    if group.is_main:
        print(text, flush=True)


class Trainer:
    """The four steps of the recipe over prepared parts, with checkpoints."""

    def __init__(self, config: RunConfig, run: RunDirectory, device: torch.device, group: Group, data: DataSplits, model, optimizer) -> None:
        self.config, self.run_dir, self.device, self.group = config, run, device, group
        self.data, self.model, self.optimizer = data, model, optimizer
        self.amp = config.amp if config.amp is not None else device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and device.type == "cuda" else None
        self.uses_memories = config.routing == "memory"
        # "memories": routing is set up (k-means done, or nothing to do for other rules)
        self.progress = {"epoch": 0, "batch": 0, "cloned": False, "memories": False}
        self.totals = EpochTotals()
        self.history: list[dict] = []
        self.monitor: DeadProcedureMonitor | None = None
        self.epoch_start_counts: list[torch.Tensor] | None = None  # routers' counters when the epoch began
        self.stop_signal: int | None = None
        self.steps_per_epoch = len(data.train) // config.batch_size
        total = config.epochs * self.steps_per_epoch
        self.schedule = WarmupCosine(config.lr, total, config.warmup_epochs * self.steps_per_epoch, config.lr_start, config.lr_end)
        classes = len(data.classes)
        self.max_loss = config.max_loss or (LOSS_LIMIT_FACTOR * math.log(classes) if classes > 1 else None)
        self.wrapped = prepare(model, group, config.sync_bn)

    @classmethod
    def build(cls, config: RunConfig, run: RunDirectory, device: torch.device, group: Group) -> Trainer:
        """Data, model (identical initial weights on every rank) and optimizer of `config`."""
        data = load_data(config.data, config.image_size, config.seed)
        B.check_batch_size(config.batch_size, len(data.train), group)
        torch.manual_seed(config.seed)
        model, new_head = build_model(config, len(data.classes))
        if new_head:
            log(group, f"--weights: {', '.join(new_head)} keep their random initialisation (the file's classifier has another class count)")
        model = model.to(device)
        return cls(config, run, device, group, data, model, build_optimizer(model, config))

    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    # ---- checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        self.run_dir.save_checkpoint(
            {
                "classes": self.data.classes,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "progress": dict(self.progress),
                "totals": asdict(self.totals),
                "monitor": self.monitor.state_dict() if self.monitor else None,
                "epoch_start_counts": self.epoch_start_counts,
                "history": self.history,
            }
        )
        self.run_dir.write_metrics(self.history)

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint of this run."""
        classes = self.data.classes
        if state["classes"] != classes:
            raise RunError(
                f"the data has {len(classes)} classes ({_preview(classes)}), but '{self.run_dir.root}' was trained on "
                f"{len(state['classes'])} ({_preview(state['classes'])}); resume with the run's own data"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = dict(state["progress"])
        self.totals = EpochTotals(**state["totals"])
        self.history = list(state["history"])
        self.epoch_start_counts = state["epoch_start_counts"]
        if self.progress["memories"] and self.uses_memories:
            self.monitor = self._new_monitor()
            self.monitor.load_state_dict(state["monitor"])

    # ---- the recipe ----------------------------------------------------------------------
    def _new_monitor(self) -> DeadProcedureMonitor:
        return DeadProcedureMonitor(self.model, self.config.dead_window, self.config.revive, self.group.broadcast)

    def _clone_and_init(self) -> None:
        """Steps 2 and 3, each followed by a checkpoint."""
        if not self.progress["cloned"]:
            clone_procedures(self.model, self.optimizer)
            self.progress["cloned"] = True
            self._save_checkpoint()
        if not self.progress["memories"]:
            if self.uses_memories:
                view = Augmented(self.data.train.base, self.data.test.transform)  # training images, unaugmented
                keys = B.evaluation_batches(view, self.config.batch_size, self.group, self.config.workers, self.device)
                cap = self.config.kmeans_samples
                samples = min(len(view), cap or len(view))
                init_memories(self.model, keys, self.config.seed, cap, samples > MINIBATCH_KMEANS_ABOVE, self.group)
                self.monitor = self._new_monitor()
            self.progress["memories"] = True
            set_phase(self.model, "routed")
            self._save_checkpoint()

    def run(self) -> dict:
        """Train to the last epoch, save model.pt and evaluation.json; returns the evaluation."""
        set_phase(self.model, "routed" if self.progress["memories"] else "stem")
        with stop_requests(self._request_stop):
            epochs = range(self.progress["epoch"], self.config.epochs)
            for epoch in epochs:
                if epoch >= self.config.stem_epochs:
                    self._clone_and_init()
                self._train_one_epoch(epoch)
        return self._finish()

    def _request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    def _context(self, epoch: int) -> StepContext:
        group = self.group
        return StepContext(
            device=self.device,
            amp=self.amp,
            scaler=self.scaler,
            schedule=self.schedule,
            monitor=self.monitor,
            reduce=group.all_reduce if group.distributed else None,
            should_stop=lambda: self.stop_signal is not None,
            progress=f"epoch {epoch + 1}/{self.config.epochs}" if group.is_main else None,
            seed=self.config.seed,
            rank=group.rank,
            world=group.world,
            max_loss=self.max_loss,
            auxiliary_weight=self.config.balance_loss,
        )

    def _train_one_epoch(self, epoch: int) -> None:
        config = self.config
        if self.epoch_start_counts is None:  # a new epoch (not one resumed in its middle)
            self.epoch_start_counts = self._procedure_counts()
        started = time.perf_counter()
        batches = B.training_batches(self.data.train, config.batch_size, config.seed, epoch, self.group, config.workers, self.device, self.progress["batch"])
        try:
            train_epoch(self.wrapped, batches, self.optimizer, self._context(epoch), epoch * self.steps_per_epoch, self.totals)
        except DivergenceError as exc:
            self._diverged(exc, epoch)
        self.progress["batch"] = self.totals.steps
        if self.totals.interrupted:
            self._interrupted(epoch)
        summary, counts = self._evaluate(f"test after epoch {epoch + 1}")
        row = epoch_row(self, epoch, self.epoch_start_counts, summary, counts, time.perf_counter() - started)
        self.history.append(row)
        self.progress.update(epoch=epoch + 1, batch=0)
        self.totals = EpochTotals()
        self.epoch_start_counts = None
        self._save_checkpoint()
        log(self.group, epoch_line(row))

    def _diverged(self, exc: DivergenceError, epoch: int):
        kept = self.run_dir.last_good_checkpoint(self.progress["epoch"])
        limit = f" (the limit is {LOSS_LIMIT_FACTOR} x ln(classes); --max-loss sets it)" if exc.over_limit and self.config.max_loss is None else ""
        raise RunError(f"{exc} in epoch {epoch + 1}{limit}; training stopped, {kept}; lower --lr or raise --warmup-epochs and start a new run") from None

    def _interrupted(self, epoch: int):
        self.totals.interrupted = False
        self._save_checkpoint()
        raise TrainingInterrupted(
            f"{_stopped_how(self.stop_signal)} in epoch {epoch + 1} after batch {self.progress['batch']}; checkpoint saved. "
            f"Continue with: rmn-fx train --resume {self.run_dir.root}",
            SIGNAL_EXIT_CODES.get(self.stop_signal, 130),
        )

    def _procedure_counts(self) -> list[torch.Tensor | None]:
        counts = [s.sample_counts() for s in routed_stages(self.model)]
        return [None if c is None else c.detach().cpu().clone() for c in counts]

    def _evaluate(self, desc: str):
        data, group, size = self.data, self.group, self.config.batch_size
        test = B.evaluation_batches(data.test, size, group, self.config.workers, self.device)
        contexts = data.test_contexts[group.rank :: group.world].split(size) if data.test_contexts is not None else None
        reduce = group.all_reduce if group.distributed else None
        return evaluate(self.model, test, len(data.classes), contexts, len(data.context_names), self.device, reduce, desc if group.is_main else None)

    def _finish(self) -> dict:
        summary, counts = self._evaluate("final test")
        evaluation = {
            **summary,
            "at_chance": at_chance(summary),
            "classes": self.data.classes,
            "contexts": list(self.data.context_names),
            **routing_summary(counts),
            "params": count_params(self.model),
        }
        if self.group.is_main:
            rmn_fx.save(self.model, self.run_dir.paths.model)
            self.run_dir.write_json(self.run_dir.paths.evaluation, evaluation)
        return evaluation


@contextlib.contextmanager
def stop_requests(request):
    """Ctrl-C and SIGTERM call `request(signum)`, so training stops after the current step
    with a checkpoint; a second Ctrl-C stops at once."""
    seen = []

    def handler(signum, frame):
        if seen and signum == signal.SIGINT:
            raise KeyboardInterrupt
        seen.append(signum)
        request(signum)

    with _stop_signals_call(handler):
        yield


@contextlib.contextmanager
def stop_at_once():
    """Before training starts there is nothing to save: Ctrl-C or SIGTERM ends the run at
    once with one line (a directory left without a checkpoint restarts with the same command)."""

    def handler(signum, frame):
        raise TrainingInterrupted(
            f"{_stopped_how(signum)} before training started; nothing was saved. Start it again with the same command",
            SIGNAL_EXIT_CODES[signum],
        )

    with _stop_signals_call(handler):
        yield


@contextlib.contextmanager
def _stop_signals_call(handler):
    """SIGINT and SIGTERM call `handler` inside the block; the previous handlers after it."""
    previous = {sig: signal.signal(sig, handler) for sig in SIGNAL_EXIT_CODES}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stopped_how(signum: int | None) -> str:
    return "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"


def _preview(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


__all__ = ["Trainer", "train"]
