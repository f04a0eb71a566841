"""Routing statistics from test-set contingency tables (procedure x class, procedure x context)."""

from __future__ import annotations

import math

import torch

from .loop import RouteCounts
from .monitor import load_balance


def normalized_mutual_information(table: torch.Tensor) -> float:
    """NMI of the two labelings counted in `table` [a, b], arithmetic normalisation
    (scikit-learn's default): 1 = routes determine classes and back, 0 = independent."""
    joint = table.double()
    total = joint.sum()
    if total == 0:
        return 0.0
    p = joint / total
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mutual = float((p[nz] * (p[nz] / (pa.unsqueeze(1) * pb.unsqueeze(0))[nz]).log()).sum())
    ha = float(-(pa[pa > 0] * pa[pa > 0].log()).sum())
    hb = float(-(pb[pb > 0] * pb[pb > 0].log()).sum())
    if ha == 0 or hb == 0:
        return 1.0 if ha == hb else 0.0
    return max(0.0, mutual / ((ha + hb) / 2))


def purity(table: torch.Tensor) -> float:
    """Share of samples whose procedure's majority label is their own."""
    total = int(table.sum())
    return float(table.max(1).values.sum()) / total if total else math.nan


def stage_routing(counts: list[RouteCounts]) -> list[dict]:
    """One row per routed stage: samples per procedure, unused procedures, balance, NMI."""
    rows = []
    for stage in counts:
        load = stage.by_class.sum(1)
        row = {
            "stage": stage.stage,
            "samples_per_procedure": load.tolist(),
            "unused_procedures": int((load == 0).sum()),
            **load_balance(load),
            "nmi_class": normalized_mutual_information(stage.by_class),
            "purity_class": purity(stage.by_class),
        }
        if stage.by_context is not None:
            row["nmi_context"] = normalized_mutual_information(stage.by_context)
            row["purity_context"] = purity(stage.by_context)
        rows.append(row)
    return rows


def routing_summary(counts: list[RouteCounts]) -> dict:
    """The per-stage rows, the raw contingency tables and the mean path weights (rules
    that mix paths), as written to evaluation files."""
    return {
        "stages": stage_routing(counts),
        "routes_by_class": [c.by_class.tolist() for c in counts],
        "routes_by_context": [c.by_context.tolist() for c in counts if c.by_context is not None],
        "mean_weights": [{"stage": c.stage, **{k: w.tolist() for k, w in c.mean_weights.items()}} for c in counts if c.mean_weights],
    }


def at_chance(summary: dict) -> bool:
    """Whether a test accuracy is indistinguishable from always guessing the most frequent
    class: within three binomial standard errors of it."""
    chance, samples = summary["chance_accuracy"], summary["samples"]
    return summary["accuracy"] <= chance + 3 * math.sqrt(chance * (1 - chance) / max(samples, 1))
