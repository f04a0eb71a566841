"""The `train` driver: the four steps in order, in a run directory that survives crashes.

    RUN/config.json         the resolved config (recipe + the user's overrides)
    RUN/metrics.jsonl       one row per epoch: losses, accuracies, LR, per-stage load,
    RUN/metrics.csv         dead procedures, balance and routing purity (CSV: the scalars)
    RUN/checkpoints/last.pt after every step of the recipe and every epoch (atomic);
                            on Ctrl-C also mid-epoch
    RUN/model.pt            the trained model, for `rmn_fx.load` and `rmn-fx eval`
    RUN/evaluation.json     the final test evaluation, routes by class and context included

A resumed run continues from last.pt and gives the results of an uninterrupted run: the
batches depend only on (seed, epoch), augmentation on (seed, epoch, sample), the LR on
the step, and the RNG states, memories and monitors are in the checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import rmn_fx
from rmn_fx.errors import OptionError, OutputPathError, RMNError
from rmn_fx.errors import TrainingInterrupted as Interrupted
from rmn_fx.files import atomic_write, check_writable, read_torch_file, write_text
from rmn_fx.measure import count_params
from rmn_fx.routed_stage import routed_stages

from . import batches as B
from .cloning import clone_procedures
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
from .monitor import DeadProcedureMonitor, load_balance
from .schedule import WarmupCosine
from .statistics import routing_summary, stage_routing

CHECKPOINT_FORMAT = "rmn-fx-run"
CHECKPOINT_VERSION = 1
MINIBATCH_KMEANS_ABOVE = 50_000  # samples; plain k-means below
RUN_IDENTITY = ("model", "branches", "attention", "image_size", "remove_downsamplings", "data")


class RunError(RMNError):
    """A run directory cannot be used as asked (or training cannot go on)."""


def run_paths(run_dir: str) -> dict[str, str]:
    return {
        "config": os.path.join(run_dir, "config.json"),
        "metrics": os.path.join(run_dir, "metrics.jsonl"),
        "csv": os.path.join(run_dir, "metrics.csv"),
        "checkpoint": os.path.join(run_dir, "checkpoints", "last.pt"),
        "model": os.path.join(run_dir, "model.pt"),
        "evaluation": os.path.join(run_dir, "evaluation.json"),
    }


def read_run_config(run_dir: str) -> dict:
    path = run_paths(run_dir)["config"]
    if not os.path.isfile(path):
        raise RunError(f"'{run_dir}' is not a run directory (no config.json); give the -o folder of an earlier `rmn-fx train`")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read '{path}' ({exc}); the run directory is damaged") from exc


def check_resume(saved: dict, asked: dict, run_dir: str) -> None:
    """Refuse to resume a run with a different model, branch count, data..."""
    for key in RUN_IDENTITY:
        if asked.get(key) is not None and asked[key] != saved.get(key):
            raise RunError(
                f"'{run_dir}' was trained with {key} {saved.get(key)!r}, not {asked[key]!r}; "
                f"resume without --{key.replace('_', '-')}, or start a new run with another -o"
            )


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda, but this machine has no usable CUDA device; use --device cpu")
    return torch.device(choice)


def build_model(config: dict, classes: list[str]) -> torch.nn.Module:
    size = config["image_size"]
    return rmn_fx.transform(
        config["model"],
        branches=config["branches"],
        attention=config["attention"],
        input_size=(3, size, size),
        remove_downsamplings=config["remove_downsamplings"],
        num_classes=len(classes),
        momentum=config["memory_momentum"],
    )


def build_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.Optimizer:
    """SGD (Nesterov off, as the paper) or RMSprop (timm's EfficientNet settings); no weight
    decay on norms and biases, as torchvision's and timm's recipes."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"])
    if config["optimizer"] == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config["lr"], alpha=0.9, eps=1e-3, momentum=config["momentum"])
    raise OptionError(f"unknown optimizer '{config['optimizer']}'; use sgd or rmsprop")


class Trainer:
    """One run of the four-step recipe in `run_dir`; `resume` continues it."""

    def __init__(self, config: dict, run_dir: str, resume: bool = False, group: Group | None = None) -> None:
        self.config, self.run_dir, self.paths = config, run_dir, run_paths(run_dir)
        self.device = local_device(pick_device(config["device"]))
        self.group = group or start(self.device)
        self.stop_requested = False
        torch.manual_seed(config["seed"])  # identical initial weights on every rank
        self.data: DataSplits = load_data(config["data"], config["image_size"])
        self.classes = self.data.classes
        B.check_batch_size(config["batch_size"], len(self.data.train), self.group)
        self.model = build_model(config, self.classes).to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        amp = config["amp"] if config["amp"] is not None else self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if amp and self.device.type == "cuda" else None
        self.amp = amp
        self.progress = {"epoch": 0, "batch": 0, "cloned": False, "memories": False}
        self.totals = EpochTotals()
        self.history: list[dict] = []
        self.monitor: DeadProcedureMonitor | None = None
        self.steps_per_epoch = len(self.data.train) // config["batch_size"]
        total = config["epochs"] * self.steps_per_epoch
        self.schedule = WarmupCosine(config["lr"], total, config["warmup_epochs"] * self.steps_per_epoch, config["lr_start"], config["lr_end"])
        if resume:
            self._load_checkpoint()
        else:
            self._start_run_dir()
            torch.manual_seed(config["seed"] * 7919 + self.group.rank)  # training randomness differs per rank
        self.wrapped = prepare(self.model, self.group, config["sync_bn"])

    # ---- run directory -------------------------------------------------------------------
    def _start_run_dir(self) -> None:
        if self.group.is_main:
            if os.path.exists(self.paths["config"]):
                raise RunError(f"'{self.run_dir}' already holds a run; continue it with --resume {self.run_dir}, or choose another -o")
            try:
                os.makedirs(os.path.dirname(self.paths["checkpoint"]), exist_ok=True)
            except OSError as exc:
                raise OutputPathError(f"cannot create run directory '{self.run_dir}' ({exc.strerror}); choose a writable -o") from exc
            check_writable(self.paths["checkpoint"])
            self._check_free_space()
            self._write_json(self.paths["config"], self.config)
        self.group.barrier()

    def _check_free_space(self) -> None:
        """Fail now, not after an hour: room for a checkpoint being written next to the
        last one, plus the final model."""
        tensor_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        needed = 5 * tensor_bytes  # model + optimizer state, twice, + model.pt
        free = shutil.disk_usage(os.path.dirname(self.paths["checkpoint"])).free
        if free < needed:
            raise OutputPathError(
                f"'{self.run_dir}' has {free / 2**30:.1f} GiB free; this run needs about {needed / 2**30:.1f} GiB for checkpoints; free some space or choose another -o"
            )

    def _write_json(self, path: str, obj) -> None:
        write_text(path, json.dumps(obj, indent=2) + "\n")

    def _write_metrics(self) -> None:
        write_text(self.paths["metrics"], "".join(json.dumps(row) + "\n" for row in self.history))
        write_text(self.paths["csv"], metrics_csv(self.history))

    # ---- checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        rng = self.group.gather(_rng_state(self.device))
        if not self.group.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": json.dumps(self.config),
            "classes": self.classes,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": dict(self.progress),
            "totals": asdict(self.totals),
            "monitor": self.monitor.state_dict() if self.monitor else None,
            "history": json.dumps(self.history),
            "rng": rng,
        }
        atomic_write(self.paths["checkpoint"], lambda tmp: torch.save(payload, tmp))
        self._write_metrics()

    def _load_checkpoint(self) -> None:
        path = self.paths["checkpoint"]
        if not os.path.isfile(path):
            raise RunError(f"'{self.run_dir}' has no checkpoint yet (checkpoints/last.pt); start it again without --resume")
        state = read_torch_file(path, RunError, "checkpoint", "the run cannot be resumed; start it again")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("format_version") != CHECKPOINT_VERSION:
            raise RunError(f"'{path}' is not an rmn-fx run checkpoint of version {CHECKPOINT_VERSION}")
        if state["classes"] != self.classes:
            raise RunError(
                f"the data has {len(self.classes)} classes ({_preview(self.classes)}), but '{self.run_dir}' was trained on "
                f"{len(state['classes'])} ({_preview(state['classes'])}); resume with the run's own data"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = dict(state["progress"])
        self.totals = EpochTotals(**state["totals"])
        self.history = json.loads(state["history"])
        set_phase(self.model, "routed" if self.progress["memories"] else "stem")
        if self.progress["memories"]:
            self.monitor = self._new_monitor()
            self.monitor.load_state_dict(state["monitor"])
        rng = state["rng"][self.group.rank] if self.group.rank < len(state["rng"]) else state["rng"][0]
        _set_rng_state(rng, self.device)

    # ---- the recipe ----------------------------------------------------------------------
    def _new_monitor(self) -> DeadProcedureMonitor:
        return DeadProcedureMonitor(self.model, self.config["dead_window"], self.config["revive"], self.group.broadcast)

    def _clone_and_init(self) -> None:
        """Steps 2 and 3, each followed by a checkpoint."""
        if not self.progress["cloned"]:
            clone_procedures(self.model, self.optimizer)
            self.progress["cloned"] = True
            self._save_checkpoint()
        if not self.progress["memories"]:
            view = Augmented(self.data.train.base, self.data.test.transform)  # training images, unaugmented
            keys = B.evaluation_batches(view, self.config["batch_size"], self.group, self.config["workers"], self.device)
            cap = self.config["kmeans_samples"]
            samples = min(len(view), cap or len(view))
            init_memories(self.model, keys, self.config["seed"], cap, samples > MINIBATCH_KMEANS_ABOVE, self.group)
            self.progress["memories"] = True
            set_phase(self.model, "routed")
            self.monitor = self._new_monitor()
            self._save_checkpoint()

    def _request_stop(self, *_) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True

    def run(self) -> dict:
        """Train to the last epoch, save model.pt and evaluation.json; returns the evaluation."""
        config = self.config
        if not self.progress["memories"]:
            set_phase(self.model, "stem")
        previous = signal.signal(signal.SIGINT, self._request_stop)
        try:
            epochs = range(self.progress["epoch"], config["epochs"])
            for epoch in tqdm(epochs, desc="epochs", disable=None if self.group.is_main else True, initial=self.progress["epoch"], total=config["epochs"]):
                if epoch >= config["stem_epochs"]:
                    self._clone_and_init()
                self._train_one_epoch(epoch)
            return self._finish()
        finally:
            signal.signal(signal.SIGINT, previous)
            stop(self.group)

    def _train_one_epoch(self, epoch: int) -> None:
        config, group = self.config, self.group
        start_counts = self._procedure_counts()
        started = time.perf_counter()
        context = StepContext(
            self.device, self.amp, self.scaler, self.schedule, self.monitor, group.all_reduce if group.distributed else None,
            lambda: self.stop_requested, f"epoch {epoch + 1}" if group.is_main else None,
        )
        batches = B.training_batches(self.data.train, config["batch_size"], config["seed"], epoch, group, config["workers"], self.device, self.progress["batch"])
        try:
            train_epoch(self.wrapped, batches, self.optimizer, context, epoch * self.steps_per_epoch, self.totals)
        except DivergenceError as exc:
            done = self.progress["epoch"]
            kept = (
                f"the last good checkpoint is {self.paths['checkpoint']} (after epoch {done})"
                if os.path.isfile(self.paths["checkpoint"])
                else "no epoch had finished, so there is no checkpoint"
            )
            raise RunError(f"{exc} (epoch {epoch + 1}); training stopped, {kept}; lower --lr or raise --warmup-epochs and start a new run") from None
        self.progress["batch"] = self.totals.steps
        if self.totals.interrupted:
            self.totals.interrupted = False
            self._save_checkpoint()
            raise Interrupted(
                f"interrupted in epoch {epoch + 1} after batch {self.progress['batch']}; checkpoint saved. "
                f"Continue with: rmn-fx train --resume {self.run_dir}"
            )
        row = self._epoch_row(epoch, start_counts, time.perf_counter() - started)
        self.history.append(row)
        self.progress.update(epoch=epoch + 1, batch=0)
        self.totals = EpochTotals()
        self._save_checkpoint()
        if group.is_main:
            tqdm.write(_epoch_line(row))

    def _procedure_counts(self) -> list[torch.Tensor]:
        return [s.router.samples.detach().cpu().clone() for s in routed_stages(self.model)]

    def _evaluate(self):
        data, group = self.data, self.group
        test = B.evaluation_batches(data.test, self.config["batch_size"], group, self.config["workers"], self.device)
        contexts = None
        if data.test_contexts is not None:
            shard = data.test_contexts[group.rank :: group.world]
            contexts = shard.split(self.config["batch_size"])
        return evaluate(self.model, test, len(self.classes), contexts, len(data.context_names), self.device, group.all_reduce if group.distributed else None)

    def _epoch_row(self, epoch: int, start_counts, seconds: float) -> dict:
        summary, counts = self._evaluate()
        routed = self.progress["memories"]
        row = {
            "epoch": epoch + 1,
            "phase": "routed" if routed else "stem",
            "lr": self.schedule((epoch + 1) * self.steps_per_epoch - 1),
            "train_loss": self.totals.mean_loss,
            "train_accuracy": self.totals.accuracy,
            "test_loss": summary["loss"],
            "test_accuracy": summary["accuracy"],
            "seconds": seconds,
        }
        if routed:
            dead = self.monitor.dead()
            stages = []
            for i, (before, after, test_row) in enumerate(zip(start_counts, self._procedure_counts(), stage_routing(counts))):
                load = after - before
                stages.append(
                    {
                        "stage": i + 1,
                        "train_samples_per_procedure": load.tolist(),
                        "dead": dead[i],
                        **{f"train_{k}": v for k, v in load_balance(load).items()},
                        **{k: v for k, v in test_row.items() if k.startswith(("nmi", "purity"))},
                    }
                )
            row["stages"] = stages
            row["dead_procedures"] = sum(len(d) for d in dead)
            row["revived_procedures"] = self.monitor.revived
            if self.group.distributed:
                row["memory_spread_across_ranks"] = self._memory_spread()
        return row

    def _memory_spread(self) -> float:
        """Largest difference between any rank's memories and rank 0's (0.0: in sync)."""
        memories = [s.router.memory.detach().cpu() for s in routed_stages(self.model)]
        ranks = self.group.gather(memories)
        return max(float((mine - first).abs().max()) for other in ranks for mine, first in zip(other, ranks[0]))

    def _finish(self) -> dict:
        summary, counts = self._evaluate()
        evaluation = {
            **summary,
            "classes": self.classes,
            "contexts": list(self.data.context_names),
            **routing_summary(counts),
            "params": count_params(self.model),
        }
        if self.group.is_main:
            rmn_fx.save(self.model, self.paths["model"])
            self._write_json(self.paths["evaluation"], evaluation)
        return evaluation


def metrics_csv(history: list[dict]) -> str:
    """The scalar columns of each epoch, plus per-stage dead counts, balance and NMI."""
    rows = []
    for row in history:
        flat = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
        for stage in row.get("stages", []):
            i = stage["stage"]
            flat[f"stage{i}_dead"] = len(stage["dead"])
            flat[f"stage{i}_balance_entropy"] = stage["train_entropy"]
            flat[f"stage{i}_nmi_class"] = stage["nmi_class"]
        rows.append(flat)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _epoch_line(row: dict) -> str:
    line = (
        f"epoch {row['epoch']:>3} [{row['phase']}] lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
        f"  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.4f}  {row['seconds']:.0f}s"
    )
    if "dead_procedures" in row:
        line += f"  dead {row['dead_procedures']} revived {row['revived_procedures']}"
    return line


def _preview(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(config: dict, run_dir: str, resume: bool = False) -> dict:
    """Run (or resume) the recipe `config` in `run_dir`; returns the final evaluation."""
    return Trainer(config, run_dir, resume).run()


__all__ = ["Interrupted", "RunError", "Trainer", "check_resume", "read_run_config", "train"]
