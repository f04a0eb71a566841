"""Convert every model of a torchvision list (classification by default) and a list of timm architectures.

For each model: convert with N procedures (attention on) and record parameter and FLOP
accounting and the function error right after conversion; then spread the samples over
the procedures and record the error against the base model run on each sample alone
(memory routing: the batch split into one-sample sub-batches, one per procedure; other
rules: each sample alone, since their random gates make sub-batches of any size and a
randomly initialised net's own output moves by up to 1e-3 between batch sizes). A model rmn-fx cannot
convert is recorded with its one-line error. A detector (`--task detection`) gets its
backbone converted and put back, and its detections of two images compared with the base's
(`rmn_fx.zoo.check_detector`). Writes CSV and JSON, prints a Markdown table.

    python benchmarks/zoo.py --hub torchvision -o out/zoo_torchvision
    python benchmarks/zoo.py --hub torchvision --task video -o out/zoo_video
    python benchmarks/zoo.py --hub torchvision --task detection -o out/zoo_detection
    python benchmarks/zoo.py --hub timm -o out/zoo_timm
    python benchmarks/zoo.py --hub timm --families -o out/zoo_families
    python benchmarks/zoo.py --hub torchvision --routing gate --top-k 2 -o out/zoo_torchvision_gate2
    python benchmarks/zoo.py --hub timm --granularity block -o out/zoo_timm_block
"""

from __future__ import annotations

import argparse
import sys

from results import write_rows  # benchmarks/results.py, beside this script
from tqdm import tqdm

from rmn_fx.models import TORCHVISION_TASKS, torchvision_names
from rmn_fx.tracing import CAPTURES
from rmn_fx.zoo import SIDES, TIMM_MODELS, check, check_detector, exact_row, max_error, one_per_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub", choices=["torchvision", "timm"], required=True)
    parser.add_argument("--branches", type=int, default=2)
    parser.add_argument("--models", nargs="*", help="Only these models.")
    parser.add_argument("--task", choices=[t for t in TORCHVISION_TASKS if t != "optical_flow"], default="classification", help="torchvision: which list (detection: each detector's backbone, converted and put back).")
    parser.add_argument("--families", action="store_true", help="timm: one model per timm module instead of TIMM_MODELS.")
    parser.add_argument("--routing", default="memory", help="The routing rule (memory, gate, cross-connections, cross-prediction).")
    parser.add_argument("--top-k", type=int, help="gate routing: procedures per sample.")
    parser.add_argument("--granularity", choices=["stage", "block"], default="stage", help="Route whole stages or every block.")
    parser.add_argument("-o", "--output", default="out/zoo", help="Output prefix for .csv and .json.")
    args = parser.parse_args()
    if args.models:
        names = args.models
    elif args.hub == "torchvision":
        names = list(torchvision_names(args.task))
    else:
        names = one_per_family() if args.families else TIMM_MODELS
    prefix = "timm:" if args.hub == "timm" else "torchvision:"
    sides = SIDES if args.hub == "torchvision" else None
    rule = {"routing": args.routing, "top_k": args.top_k, "granularity": args.granularity}
    rows = []
    for name in tqdm(names, desc=f"{args.hub} zoo", disable=None):
        if args.hub == "torchvision" and args.task == "detection":  # the detector's backbone, put back
            rows.append(check_detector(name, args.branches))
        else:
            rows.append(check(prefix + name, args.branches, sides, **rule))
        write_rows(args.output, rows)  # after every model: a long sweep keeps what it measured
    print(f"| model | input | stages | params base -> N={args.branches} | params & FLOPs exact | FLOPs ratio | max rel. error | result |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "ok":
            exact = "yes" if exact_row(r) else "NO"
            print(
                f"| {r['model']} | {r['input']} | {r['stages']}{' (named)' if r['named_stages'] else ''}{capture_note(r)} | "
                f"{r['base_params'] / 1e6:.2f}M -> {r['converted_params'] / 1e6:.2f}M | {exact} | "
                f"{r['flops_ratio']:.4f} | {max_error(r):.1e} | ok{detections_note(r)} |"
            )
        else:
            print(f"| {r['model']} | | | | | | | {r['status']}: {r['error']} |")
    bad = [r for r in rows if r["status"] == "crash" or (r["status"] == "ok" and not (exact_row(r) and max_error(r) <= 1e-5 and r.get("detections_relative_error", 0.0) <= 1e-4))]
    sys.exit(1 if bad else 0)


def detections_note(row: dict) -> str:
    """A detector's boxes, scores and labels with its backbone converted, against the base's."""
    return f", {row['detections']} detections within {row['detections_relative_error']:.1e}" if "detections" in row else ""


def capture_note(row: dict) -> str:
    """Said beside the stages: the part converted (a detector's backbone), and the capture
    where the graph did not come from plain torch.fx."""
    part = f" of {row['part']}" if row.get("part") else ""
    return part + ("" if row["capture"] == CAPTURES[0] else f", {row['capture']}")


if __name__ == "__main__":
    main()
