"""What does a new mix of routes cost the first time? Eager first passes on unseen batches.

`perf.py` times one input repeatedly, so every sub-batch size the routed model meets has
been seen before. A server meets new route mixes, hence new sub-batch sizes, and on the
CPU oneDNN builds a convolution primitive per new input shape (as cuDNN's benchmark mode
re-tunes on a GPU). Here the routed model (N procedures, routes spread over them) and its
base are warmed on one batch; then each of `--mixes` new batches is run once (its first
pass) and again (repeated), routed and base interleaved. Printed per batch: routed first /
routed repeated, and routed first / base first (the base meets no new shape: its batch
size does not change).

    python benchmarks/route_mixes.py --model resnet18 --branches 8 --batch 64 -o out/route-mixes
"""

from __future__ import annotations

import argparse
import time

import torch
import cpu_options  # benchmarks/cpu_options.py, beside this script
from results import write_rows
from tqdm import tqdm

import rmn_fx
from rmn_fx.deploy.parity import procedures_used
from rmn_fx.measure import spread_routes
from rmn_fx.models import create_model


def seconds(model, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mixes", type=int, default=5, help="New batches, each timed on its first pass and repeated.")
    parser.add_argument("--size", type=int, default=224, help="Input height and width.")
    cpu_options.add_arguments(parser)
    parser.add_argument("-o", "--output", default="out/route-mixes", help="Output prefix for .csv and .json.")
    args = parser.parse_args()
    settings = cpu_options.apply(args)
    base = create_model(args.model).eval()
    routed = rmn_fx.transform(base, branches=args.branches, input_size=(3, args.size, args.size)).eval()
    generator = torch.Generator().manual_seed(0)
    warm, *batches = (torch.randn(args.batch, 3, args.size, args.size, generator=generator) for _ in range(args.mixes + 1))
    spread_routes(routed, warm)
    rows = []
    with torch.no_grad():
        for model in (routed, base, routed, base):
            model(warm)
        for k, x in enumerate(tqdm(batches, desc="route mixes", disable=None)):
            routed_first, base_first = seconds(routed, x), seconds(base, x)
            routed_repeated, base_repeated = seconds(routed, x), seconds(base, x)
            rows.append({
                "model": args.model, "branches": args.branches, "batch": args.batch, **settings, "mix": k,
                "procedures_used": procedures_used(routed, x), "routed_first_s": round(routed_first, 4),
                "routed_repeated_s": round(routed_repeated, 4), "base_first_s": round(base_first, 4), "base_repeated_s": round(base_repeated, 4),
                "routed_first_over_repeated": round(routed_first / routed_repeated, 3),
                "routed_first_over_base_first": round(routed_first / base_first, 3),
                "routed_repeated_over_base_repeated": round(routed_repeated / base_repeated, 3),
            })
    write_rows(args.output, rows)
    print("| batch | procedures used per stage | routed first / repeated | routed / base, first pass | routed / base, repeated |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mix']} | {r['procedures_used']} | {r['routed_first_over_repeated']:.3f} | {r['routed_first_over_base_first']:.3f} | {r['routed_repeated_over_base_repeated']:.3f} |")


if __name__ == "__main__":
    main()
