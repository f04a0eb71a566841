"""Does routing help on the embedded digits task? Base vs RMN, same epochs, same seeds.

Trains, with the quick recipe (digits at 32x32, batch 128, one LR curve), for each seed:
  base        the plain network (N = 1, no attention)
  rmn         N procedures, no Conditional Attention
  rmn+ca      N procedures with Conditional Attention
  rmn+ca-norevive   as rmn+ca, dead procedures left dead (the paper's behaviour)
and prints mean +- std test accuracy, FLOPs per sample (and the ratio to the base model,
measured in this run), routing NMI with the hidden contexts and the classes, and the
procedures dead at the end of training (no training sample for --dead-window steps) at
batch 128. Writes OUT.json and OUT.csv.

    python benchmarks/recipe.py -o out/recipe            # about 18 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch
from results import write_rows  # benchmarks/results.py, beside this script
from rmn_fx.recipes.config import RunConfig
from rmn_fx.recipes.trainer import train

import rmn_fx
from rmn_fx.measure import flop_counts

CONFIGS = {
    "base": {"branches": 1, "attention": False, "revive": True},
    "rmn": {"attention": False, "revive": True},
    "rmn+ca": {"attention": True, "revive": True},
    "rmn+ca-norevive": {"attention": True, "revive": False},
}


def run_one(model: str, name: str, seed: int, args, folder: str) -> dict:
    settings = CONFIGS[name]
    branches = settings.get("branches", args.branches)
    overrides = {"epochs": args.epochs, "stem_epochs": args.stem_epochs}
    machine = {"seed": seed, "device": "cpu", "amp": False, "dead_window": args.dead_window}
    config = RunConfig.create("quick", model, branches, overrides, {"attention": settings["attention"], "revive": settings["revive"], **machine})
    run = os.path.join(folder, f"{name}-{seed}")
    evaluation = train(config, run)
    trained = rmn_fx.load(os.path.join(run, "model.pt"))
    flops, _ = flop_counts(trained, torch.zeros(1, *config.input_size))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    stages = evaluation["stages"]
    return {
        "config": name,
        "seed": seed,
        "branches": branches,
        "test_accuracy": evaluation["accuracy"],
        "flops_per_sample": flops,
        "params": evaluation["params"],
        "nmi_context": statistics.mean(s["nmi_context"] for s in stages) if branches > 1 else None,
        "nmi_class": statistics.mean(s["nmi_class"] for s in stages) if branches > 1 else None,
        "dead_at_end": last.get("dead_procedures", 0),
        "revived": last.get("revived_procedures", 0),
        "procedures": branches * len(stages) if branches > 1 else 0,
    }


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def table(rows: list[dict]) -> str:
    base_flops = statistics.mean(r["flops_per_sample"] for r in rows if r["config"] == "base")
    lines = [
        "| config | N | test accuracy | FLOPs/sample (ratio to base) | params | NMI context | NMI class | dead at end / procedures | revived |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        group = [r for r in rows if r["config"] == name]
        if not group:
            continue
        flops = statistics.mean(r["flops_per_sample"] for r in group)
        lines.append(
            f"| {name} | {group[0]['branches']} | {_mean_std(r['test_accuracy'] for r in group)} "
            f"| {flops / 1e6:.2f}M ({flops / base_flops:.4f}) | {group[0]['params'] / 1e6:.2f}M "
            f"| {_mean_std(r['nmi_context'] for r in group)} | {_mean_std(r['nmi_class'] for r in group)} "
            f"| {' '.join(str(r['dead_at_end']) for r in group)} / {group[0]['procedures']} | {' '.join(str(r['revived']) for r in group)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--stem-epochs", type=int, default=2)
    parser.add_argument("--dead-window", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("-o", "--output", default="out/recipe", help="prefix of the .json and .csv files")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for name in args.configs:
                print(f"== {name}, seed {seed}", flush=True)
                rows.append(run_one(args.model, name, seed, args, folder))
    write_rows(args.output, rows, {"args": vars(args)})
    print(table(rows))
    print(f"wrote {args.output}.json and {args.output}.csv")


if __name__ == "__main__":
    main()
