"""Does routing help on the embedded digits task, and which rule? Same backbone, epochs, seeds.

Trains, with the quick recipe (digits at 32x32, one LR curve), for each seed, the configs
asked for (default: the rule comparison, N = --branches for every rule):
  base                  the plain network (N = 1)
  memory                RMN: memory routing with Conditional Attention (dead procedures revived)
  memory-noca           RMN without Conditional Attention
  memory-norevive       RMN, dead procedures left dead (the paper's behaviour)
  cross-connections     every path, feature-dependent mixing between stages
  cross-prediction      every path, each source predicts its destinations
  gate-top1, gate-top2  a learned gate, each sample through its top 1 / top 2 procedures
and, to find out why RMN does what it does:
  memory-n2, memory-n8  RMN at N = 2 and N = 8
  memory-paper-batch    RMN at the paper's batch rule, 256 * N / 2 (each procedure's BatchNorm
                        sees about half a base batch), lr following the batch
  memory-long           RMN with twice the epochs, the extra ones routed
  base-long             the plain network with twice the epochs (memory-long's reference)
It prints mean +- std test accuracy, FLOPs per sample (and the ratio to the base model,
measured in this run), parameters, training seconds per epoch as a ratio to the base's
(configs interleave within each seed, so the machine's load hits all alike), routing NMI
with the hidden contexts and the classes (rules that route), and dead procedures at the end
(memory routing). Writes OUT.json and OUT.csv.

    python benchmarks/recipe.py -o out/rules                                  # the rule comparison
    python benchmarks/recipe.py --configs base memory memory-n2 memory-n8 memory-paper-batch memory-long base-long -o out/why
    python benchmarks/recipe.py --branches 8 --configs base memory-noca memory memory-norevive -o out/recipe
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

CONFIGS = {  # name -> run settings; "branches", "batch_rule" and "extra_epochs" are read here
    "base": {"branches": 1, "attention": False},  # the plain network: N = 1 without attention
    "memory": {"attention": True},
    "memory-noca": {"attention": False},
    "memory-norevive": {"attention": True, "revive": False},
    "cross-connections": {"routing": "cross-connections"},
    "cross-prediction": {"routing": "cross-prediction"},
    "gate-top1": {"routing": "gate", "top_k": 1},
    "gate-top2": {"routing": "gate", "top_k": 2},
    "memory-n2": {"branches": 2, "attention": True},
    "memory-n8": {"branches": 8, "attention": True},
    "memory-paper-batch": {"attention": True, "batch_rule": "paper"},
    "memory-long": {"attention": True, "extra_epochs": True},
    "base-long": {"branches": 1, "attention": False, "extra_epochs": True},
}
RULE_COMPARISON = ["base", "memory", "cross-connections", "cross-prediction", "gate-top1", "gate-top2"]


def run_one(model: str, name: str, seed: int, args, folder: str) -> dict:
    settings = dict(CONFIGS[name])
    branches = settings.pop("branches", args.branches)
    overrides = {"epochs": args.epochs * (2 if settings.pop("extra_epochs", False) else 1), "stem_epochs": args.stem_epochs}
    if settings.pop("batch_rule", None) == "paper":
        overrides["batch_size"] = 256 * branches // 2
    machine = {"seed": seed, "device": "cpu", "amp": False, "dead_window": args.dead_window}
    config = RunConfig.create("quick", model, branches, overrides, {**settings, **machine})
    run = os.path.join(folder, f"{name}-{seed}")
    evaluation = train(config, run)
    trained = rmn_fx.load(os.path.join(run, "model.pt"), trust_factory=True)  # written just now, from --model
    flops, _ = flop_counts(trained, torch.zeros(1, *config.input_size))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    stages = evaluation["stages"]
    return {
        "config": name,
        "seed": seed,
        "routing": config.routing,
        "branches": branches,
        "batch_size": config.batch_size,
        "epochs": config.epochs,
        "test_accuracy": evaluation["accuracy"],
        "flops_per_sample": flops,
        "params": evaluation["params"],
        "seconds_per_epoch": statistics.mean(r["seconds"] for r in history),
        "nmi_context": statistics.mean(s["nmi_context"] for s in stages) if branches > 1 and stages else None,
        "nmi_class": statistics.mean(s["nmi_class"] for s in stages) if branches > 1 and stages else None,
        "dead_at_end": history[-1].get("dead_procedures"),
        "procedures": branches * len(stages) if branches > 1 else 0,
    }


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def table(rows: list[dict], names: list[str]) -> str:
    base = [r for r in rows if r["config"] == "base"]
    base_flops = statistics.mean(r["flops_per_sample"] for r in base) if base else None
    base_seconds = statistics.mean(r["seconds_per_epoch"] for r in base) if base else None
    lines = [
        "| config | N | batch | test accuracy | FLOPs/sample (ratio to base) | params | s/epoch (ratio to base) | NMI context | NMI class | dead at end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        group = [r for r in rows if r["config"] == name]
        flops, seconds = statistics.mean(r["flops_per_sample"] for r in group), statistics.mean(r["seconds_per_epoch"] for r in group)
        dead = [str(r["dead_at_end"]) for r in group if r["dead_at_end"] is not None]
        dead_text = f"{' '.join(dead)} / {group[0]['procedures']}" if dead and group[0]["procedures"] else "-"
        lines.append(
            f"| {name} | {group[0]['branches']} | {group[0]['batch_size']} | {_mean_std(r['test_accuracy'] for r in group)} "
            f"| {flops / 1e6:.2f}M{f' ({flops / base_flops:.3f})' if base_flops else ''} | {group[0]['params'] / 1e6:.2f}M "
            f"| {seconds:.0f}{f' ({seconds / base_seconds:.2f})' if base_seconds else ''} "
            f"| {_mean_std(r['nmi_context'] for r in group)} | {_mean_std(r['nmi_class'] for r in group)} "
            f"| {dead_text} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--stem-epochs", type=int, default=2)
    parser.add_argument("--dead-window", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=RULE_COMPARISON, choices=list(CONFIGS))
    parser.add_argument("-o", "--output", default="out/rules", help="prefix of the .json and .csv files")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for name in args.configs:
                print(f"== {name}, seed {seed}", flush=True)
                rows.append(run_one(args.model, name, seed, args, folder))
                write_rows(args.output, rows, {"args": vars(args)})  # after every run: a long sweep stopped early keeps what it measured
    print(table(rows, args.configs))
    print(f"wrote {args.output}.json and {args.output}.csv")


if __name__ == "__main__":
    main()
