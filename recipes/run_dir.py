"""The run directory: where a run's files live, what state the run is in, and atomic writes.

    RUN/config.json         the RunConfig (recipe + the user's options)
    RUN/metrics.jsonl       one row per epoch: losses, accuracies, LR, per-stage load,
    RUN/metrics.csv         dead procedures, balance and routing purity (CSV: the scalars)
    RUN/checkpoints/last.pt after every step of the recipe and every epoch (atomic);
                            on Ctrl-C or SIGTERM also mid-epoch
    RUN/model.pt            the trained model, for `rmn_fx.load` and `rmn-fx eval`
    RUN/evaluation.json     the final test evaluation; its presence means "finished"

Only the main rank writes. Nothing here knows about models or training steps.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass

import torch

from rmn_fx.errors import OutputPathError
from rmn_fx.files import atomic_write, check_writable, read_torch_file, write_text

from .config import RunConfig, RunError

CHECKPOINT_FORMAT = "rmn-fx-run"
CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class RunPaths:
    """The files of a run directory (see the module docstring)."""

    root: str
    config: str
    metrics: str
    csv: str
    checkpoint: str
    model: str
    evaluation: str
    report: str

    @classmethod
    def of(cls, root: str) -> RunPaths:
        names = ("config.json", "metrics.jsonl", "metrics.csv", os.path.join("checkpoints", "last.pt"), "model.pt", "evaluation.json", "report")
        return cls(root, *(os.path.join(root, name) for name in names))


class RunDirectory:
    """One run's folder. States: new (no config), started (config, no checkpoint yet: it
    can be started again), checkpointed (resumable), finished (evaluation written)."""

    def __init__(self, root: str, writer: bool = True) -> None:
        self.paths = RunPaths.of(root)
        self.root = root
        self.writer = writer  # the main rank; the others read only

    @property
    def state(self) -> str:
        if os.path.isfile(self.paths.evaluation):
            return "finished"
        if os.path.isfile(self.paths.checkpoint):
            return "checkpointed"
        return "started" if os.path.isfile(self.paths.config) else "new"

    def read_config(self) -> RunConfig:
        if self.state == "new":
            raise RunError(f"'{self.root}' is not a run directory (no config.json); give the -o folder of an earlier `rmn-fx train`")
        return RunConfig.read(self.paths.config)

    def check_new(self) -> None:
        """A new run may start here: nothing, or a run that never reached its first checkpoint."""
        if self.state in ("checkpointed", "finished"):
            raise RunError(f"'{self.root}' already holds a run; continue it with --resume {self.root}, or choose another -o")

    def create(self, config: RunConfig) -> None:
        """Make the folder for a new run (or a run that never reached its first checkpoint)."""
        self.check_new()
        if not self.writer:
            return
        try:
            os.makedirs(os.path.dirname(self.paths.checkpoint), exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"cannot create run directory '{self.root}' ({exc.strerror}); choose a writable -o") from exc
        check_writable(self.paths.checkpoint)
        self.write_json(self.paths.config, config.to_dict())

    def check_free_space(self, tensor_bytes: int) -> None:
        """Fail now, not after an hour: room for a checkpoint (model + optimizer state)
        being written next to the last one, plus the final model."""
        if not self.writer:  # the folder is the main rank's to make and check
            return
        needed = 5 * tensor_bytes
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise OutputPathError(
                f"'{self.root}' has {free / 2**30:.1f} GiB free; this run needs about {needed / 2**30:.1f} GiB for checkpoints; free some space or choose another -o"
            )

    def write_json(self, path: str, obj) -> None:
        if self.writer:
            write_text(path, json.dumps(obj, indent=2) + "\n")

    def read_json(self, path: str):
        with open(path) as f:
            return json.load(f)

    def write_metrics(self, history: list[dict]) -> None:
        if self.writer:
            write_text(self.paths.metrics, "".join(json.dumps(row) + "\n" for row in history))
            write_text(self.paths.csv, metrics_csv(history))

    def save_checkpoint(self, payload: dict) -> None:
        if self.writer:
            payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **payload}
            atomic_write(self.paths.checkpoint, lambda tmp: torch.save(payload, tmp))

    def load_checkpoint(self) -> dict:
        path = self.paths.checkpoint
        state = read_torch_file(path, RunError, "checkpoint", "the run cannot be resumed; start it again")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("format_version") != CHECKPOINT_VERSION:
            raise RunError(f"'{path}' is not an rmn-fx run checkpoint of version {CHECKPOINT_VERSION}; resume it with the release that wrote it")
        return state

    def last_good_checkpoint(self, epochs_done: int) -> str:
        if os.path.isfile(self.paths.checkpoint):
            return f"the last good checkpoint is {self.paths.checkpoint} (after epoch {epochs_done})"
        return "no epoch had finished, so there is no checkpoint"


def metrics_csv(history: list[dict]) -> str:
    """The scalar columns of each epoch, plus per-stage dead counts, balance and NMI (where
    the rule has them)."""
    rows = []
    for row in history:
        flat = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
        for stage in row.get("stages", []):
            i = stage["stage"]
            if "dead" in stage:  # memory routing
                flat[f"stage{i}_dead"] = len(stage["dead"])
            if "train_entropy" in stage:  # rules that count samples per procedure
                flat[f"stage{i}_balance_entropy"] = stage["train_entropy"]
            flat[f"stage{i}_nmi_class"] = stage["nmi_class"]
        rows.append(flat)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
