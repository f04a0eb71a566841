"""Conversion time, FLOPs and CPU latency of RMN models against their base, in one run.

For each model (N procedures, attention on, 224x224): time `rmn_fx.transform` on a built
model; FLOPs per sample converted/base (FlopCounterMode); eval latency converted/base at
batch 1 and batch 64, the median of interleaved repeated runs with the same threads,
after warm-up.
For batch 64 the memories are set to the keys of different samples, so that the batch is
split over all N procedures (right after conversion every sample would take procedure 0).

    python benchmarks/perf.py -o out/perf
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results import write_rows  # benchmarks/results.py, beside this script
from tqdm import tqdm

import rmn_fx
from rmn_fx.measure import flop_counts, spread_routes
from rmn_fx.models import create_model


def median_latencies(models: list[torch.nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds per forward of each model; runs are interleaved so that drift in the
    machine's speed (other load, frequency) affects every model alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            model(x)
            model(x)
        for _ in range(repeats):
            for model, samples in zip(models, times):
                start = time.perf_counter()
                model(x)
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def measure(name: str, branches: int, repeats: int, big_batch: int) -> dict:
    base = create_model(name).eval()
    start = time.perf_counter()
    gm = rmn_fx.transform(base, branches=branches)
    seconds = time.perf_counter() - start
    gm.eval()
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 3, 224, 224, generator=generator)
    xb = torch.randn(big_batch, 3, 224, 224, generator=generator)
    spread_routes(gm, xb)
    row = {"model": name, "branches": branches, "threads": torch.get_num_threads(), "convert_s": round(seconds, 3)}
    row["flops_base"] = flop_counts(base, x1)[0]
    row["flops_rmn"] = flop_counts(gm, x1)[0]
    for batch, x, runs in ((1, x1, repeats), (big_batch, xb, max(3, repeats // 4))):
        base_t, rmn_t = median_latencies([base, gm], x, runs)
        row[f"latency_base_b{batch}_ms"] = round(1000 * base_t, 2)
        row[f"latency_rmn_b{batch}_ms"] = round(1000 * rmn_t, 2)
        row[f"latency_ratio_b{batch}"] = round(rmn_t / base_t, 3)
    row["flops_ratio"] = round(row["flops_rmn"] / row["flops_base"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50", "efficientnet_b0"])
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30, help="Timed runs at batch 1 (a quarter of them at the big batch).")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("-o", "--output", default="out/perf", help="Output prefix for .csv and .json.")
    args = parser.parse_args()
    rows = [measure(n, args.branches, args.repeats, args.batch) for n in tqdm(args.models, desc="models", disable=None)]
    write_rows(args.output, rows)
    b = args.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {args.branches}, attention on, 224x224")
    print(f"| model | convert (s) | multiply-adds/sample base -> RMN | FLOPs ratio | latency b1 base / RMN (ms) | ratio b1 | latency b{b} base / RMN (ms) | ratio b{b} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['convert_s']:.2f} | {r['flops_base'] / 2e9:.3f}G -> {r['flops_rmn'] / 2e9:.3f}G | {r['flops_ratio']:.4f} | "
            f"{r['latency_base_b1_ms']:.1f} / {r['latency_rmn_b1_ms']:.1f} | {r['latency_ratio_b1']:.3f} | "
            f"{r[f'latency_base_b{b}_ms']:.0f} / {r[f'latency_rmn_b{b}_ms']:.0f} | {r[f'latency_ratio_b{b}']:.3f} |"
        )


if __name__ == "__main__":
    main()
