"""RMN training recipes: the four steps of the method as functions, and the `train` driver.

    set_phase(model, "stem"); train_epoch(...)     step 1, stem training (or train_stem)
    clone_procedures(model, optimizer)             step 2, parameters and optimizer state
    init_memories(model, batches)                  step 3, k-means over stage-input keys
    set_phase(model, "routed"); train_epoch(...)   step 4, routing (or train_routed)
    train(RunConfig, run_dir) / Trainer            all four, with checkpoints and resume
"""

from .cloning import clone_procedures, copy_procedure
from .config import RunConfig, RunError
from .data import DataError, DataSplits, load_data
from .loop import (
    DivergenceError,
    EpochTotals,
    StepContext,
    evaluate,
    set_phase,
    train_epoch,
    train_routed,
    train_stem,
)
from .memory_init import MemoryInitError, collect_keys, init_memories, kmeans_centres
from .monitor import DeadProcedureMonitor, load_balance
from .presets import RECIPES, resolve
from .schedule import WarmupCosine
from .trainer import Trainer, train

__all__ = [
    "RECIPES",
    "DataError",
    "DataSplits",
    "DeadProcedureMonitor",
    "DivergenceError",
    "EpochTotals",
    "MemoryInitError",
    "RunConfig",
    "RunError",
    "StepContext",
    "Trainer",
    "WarmupCosine",
    "clone_procedures",
    "collect_keys",
    "copy_procedure",
    "evaluate",
    "init_memories",
    "kmeans_centres",
    "load_balance",
    "load_data",
    "resolve",
    "set_phase",
    "train",
    "train_epoch",
    "train_routed",
    "train_stem",
]
