"""The per-epoch metrics row of a run (metrics.jsonl) and its one-line console form."""

from __future__ import annotations

from rmn_fx.nn.routed_stage import routed_stages

from .monitor import load_balance
from .statistics import stage_routing


def epoch_row(trainer, epoch: int, start_counts, summary: dict, counts, seconds: float) -> dict:
    """Losses, accuracies, LR and, once routed, per-stage load, dead procedures (memory
    routing), the balance loss (the gate) and routing statistics of the epoch that just
    ended (`start_counts`: the stages' sample counters when it began)."""
    routed = trainer.progress["memories"]
    row = {
        "epoch": epoch + 1,
        "phase": "routed" if routed else "stem",
        "lr": trainer.schedule((epoch + 1) * trainer.steps_per_epoch - 1),
        "train_loss": trainer.totals.mean_loss,
        "train_accuracy": trainer.totals.accuracy,
        "test_loss": summary["loss"],
        "test_accuracy": summary["accuracy"],
        "seconds": seconds,
    }
    if not routed:
        return row
    if trainer.totals.auxiliary_steps:
        row["train_balance_loss"] = trainer.totals.mean_auxiliary_loss
    stages_now = routed_stages(trainer.model)
    dead = trainer.monitor.dead() if trainer.monitor else [[] for _ in stages_now]
    test_rows = {row["stage"]: row for row in stage_routing(counts)}
    stages = []
    for i, (stage, before) in enumerate(zip(stages_now, start_counts)):
        after = stage.sample_counts()
        row_stage = {"stage": i + 1}
        if after is not None:
            load = after.detach().cpu() - before
            row_stage.update({"train_samples_per_procedure": load.tolist(), **{f"train_{k}": v for k, v in load_balance(load).items()}})
        if trainer.monitor:
            row_stage["dead"] = dead[i]
        row_stage.update({k: v for k, v in test_rows.get(i + 1, {}).items() if k.startswith(("nmi", "purity"))})
        if len(row_stage) > 1:  # the first part of a multi-path chain weighs nothing: no row
            stages.append(row_stage)
    if stages:
        row["stages"] = stages
    if trainer.monitor:
        row["dead_procedures"] = sum(len(d) for d in dead)
        row["revived_procedures"] = trainer.monitor.revived
    if trainer.group.distributed and trainer.uses_memories:
        row["memory_spread_across_ranks"] = memory_spread(trainer)
    return row


def memory_spread(trainer) -> float:
    """Largest difference between any rank's memories and rank 0's (0.0: in sync)."""
    memories = [s.router.memory.detach().cpu() for s in routed_stages(trainer.model)]
    ranks = trainer.group.gather(memories)
    return max(float((mine - first).abs().max()) for other in ranks for mine, first in zip(other, ranks[0]))


def epoch_line(row: dict) -> str:
    line = (
        f"epoch {row['epoch']:>3} [{row['phase']}] lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
        f"  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.4f}  {row['seconds']:.0f}s"
    )
    if "dead_procedures" in row:
        line += f"  dead {row['dead_procedures']} revived {row['revived_procedures']}"
    return line
