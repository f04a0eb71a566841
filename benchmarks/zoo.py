"""Convert every torchvision classification model and a list of timm architectures.

For each model: convert with N procedures (attention on) and record parameter and FLOP
accounting and the function error right after conversion; then route the N samples of
the batch to N different procedures and record the error against the base model run on
each sample alone (a randomly initialised net's own output moves by up to 1e-3 between
batch sizes, so a split batch is compared with the same split). A model rmn-fx cannot
convert is recorded with its one-line error. Writes CSV and JSON, prints a Markdown table.

    python benchmarks/zoo.py --hub torchvision -o out/zoo_torchvision
    python benchmarks/zoo.py --hub timm -o out/zoo_timm
    python benchmarks/zoo.py --hub timm --families -o out/zoo_families
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch
from rmn_fx.passes.find_stages import suggest_stage_ranges
from tqdm import tqdm

import rmn_fx
from rmn_fx.errors import InputSizeError, NoDownsamplingError, RMNError, first_line
from rmn_fx.measure import compare, relative_error, spread_routes
from rmn_fx.models import create_model, torchvision_names

# One or more architectures per timm family, the smallest variant of each.
TIMM_MODELS = [
    "resnet18", "resnet50d", "seresnet50", "resnext26ts", "regnetx_002", "regnety_002",
    "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv4_conv_small", "convnext_atto", "densenet121", "dla34", "ghostnet_100",
    "rexnet_100", "res2net50_14w_8s", "cspresnet50", "cspdarknet53", "dpn68", "ese_vovnet19b_dw",
    "nf_resnet26", "repvgg_a0", "hrnet_w18_small", "swin_tiny_patch4_window7_224",
    "maxvit_nano_rw_256", "coatnet_nano_rw_224", "mixnet_s", "fbnetc_100", "lcnet_050",
    "mnasnet_050", "resnest14d", "skresnet18", "selecsls42b", "inception_v3", "inception_v4",
    "xception41", "gernet_s", "edgenext_xx_small", "mobilevit_xxs", "fastvit_t8",
    "efficientvit_b0", "tiny_vit_5m_224", "pvt_v2_b0", "poolformer_s12", "levit_128s",
    "hgnet_tiny", "starnet_s1", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
]
SIDES = (64, 128, 224)  # torchvision models are checked at the smallest side they accept
SMALL = ("tiny", "nano", "pico", "atto", "femto", "small", "_s", "xxs", "xs", "b0", "050", "18", "lite")


def one_per_family() -> list[str]:
    """One model per timm module, preferring names that mark a small variant."""
    import timm

    picks = []
    for family in timm.list_modules():
        names = timm.list_models(module=family)
        if names:
            picks.append(min(names, key=lambda n: (not any(t in n for t in SMALL), len(n))))
    return picks


def check(name: str, branches: int, sides) -> dict:
    """Convert `name` and measure it; an RMNError is a result too (its message is kept)."""
    row = {"model": name, "status": "ok", "stages": None, "input": None, "named_stages": None, "error": ""}
    start = time.perf_counter()
    try:
        base = create_model(name).eval()
        sizes = [tuple(base.pretrained_cfg["input_size"])] if sides is None else [(3, s, s) for s in sides]
        for i, size in enumerate(sizes):
            try:
                try:
                    gm = rmn_fx.transform(base, branches=branches, input_size=size)
                except NoDownsamplingError:
                    row["named_stages"] = suggest_stage_ranges(base)
                    if row["named_stages"] is None:
                        raise
                    gm = rmn_fx.transform(base, branches=branches, input_size=size, stages=row["named_stages"])
                break
            except InputSizeError:
                if i == len(sizes) - 1:
                    raise
        x = torch.randn(branches, *size, generator=torch.Generator().manual_seed(0))
        row.update(compare(base, gm, x), stages=len(gm.meta["rmn_stages"]), input=size[-1])
        spread_routes(gm, x)  # now each sample runs alone through its own procedure
        with torch.no_grad():
            alone = torch.cat([base(x[i : i + 1]) for i in range(x.shape[0])])
            row["routed_relative_error"] = relative_error(alone, gm(x))
    except RMNError as exc:
        row.update(status=type(exc).__name__, error=str(exc))
    except Exception as exc:  # noqa: BLE001 -- a bug (ours or the measurement's): recorded, and failing the sweep
        row.update(status="crash", error=f"{type(exc).__name__}: {first_line(exc)}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def max_error(r: dict) -> float:
    return max(r["max_relative_error"], r["routed_relative_error"])


def exact_row(r: dict) -> bool:
    """Parameters and FLOPs are exactly what the anatomy predicts."""
    return r["converted_params"] == r["expected_params"] and r["converted_flops_per_sample"] == r["expected_flops_per_sample"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", choices=["torchvision", "timm"], required=True)
    parser.add_argument("--branches", type=int, default=2)
    parser.add_argument("--models", nargs="*", help="Only these models.")
    parser.add_argument("--families", action="store_true", help="timm: one model per timm module instead of TIMM_MODELS.")
    parser.add_argument("-o", "--output", default="out/zoo", help="Output prefix for .csv and .json.")
    args = parser.parse_args()
    if args.models:
        names = args.models
    elif args.hub == "torchvision":
        names = list(torchvision_names())
    else:
        names = one_per_family() if args.families else TIMM_MODELS
    prefix = "timm:" if args.hub == "timm" else "torchvision:"
    sides = SIDES if args.hub == "torchvision" else None
    rows = [check(prefix + n, args.branches, sides) for n in tqdm(names, desc=f"{args.hub} zoo", disable=None)]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.output + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list({k: None for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    print(f"| model | input | stages | params base -> N={args.branches} | params & FLOPs exact | FLOPs ratio | max rel. error | result |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "ok":
            exact = "yes" if exact_row(r) else "NO"
            print(
                f"| {r['model']} | {r['input']} | {r['stages']}{' (named)' if r['named_stages'] else ''} | "
                f"{r['base_params'] / 1e6:.2f}M -> {r['converted_params'] / 1e6:.2f}M | {exact} | "
                f"{r['flops_ratio']:.4f} | {max_error(r):.1e} | ok |"
            )
        else:
            print(f"| {r['model']} | | | | | | | {r['status']}: {r['error']} |")
    bad = [r for r in rows if r["status"] == "crash" or (r["status"] == "ok" and not (exact_row(r) and max_error(r) <= 1e-5))]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
