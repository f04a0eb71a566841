"""Conversion time, FLOPs and latency of routed models against their base at its best, in
one run, per runtime (eager PyTorch, torch.compile, ONNX Runtime).

For each model (N procedures, memory routing with attention, 224x224): time
`rmn_fx.transform`; FLOPs per sample routed/base (FlopCounterMode); then, per runtime and
batch size, the median latency of interleaved runs (same threads, after warm-up) of
  - the routed model, its routes spread over the procedures (memories pointed at
    different samples, `spread_routes`; right after conversion every sample would take
    procedure 0);
  - the base model on the whole batch, and split into sub-batches of the routed model's
    mean sub-batch size (batch / procedures used, averaged over the stages): on a CPU small
    batches can be faster per sample, and the routed model runs small batches by design.
The ratio is routed / the faster base layout, so that it shows the method's cost and not a
quirk of the machine's batching. A deep copy of the base, timed the same way, is the noise
floor: `copy / base` would be 1.000 on a quiet machine, and a routed ratio within its
distance of 1 is not a measured cost. Both models run in a process set up as a server's
would be (`cpu_options.py`, `rmn_fx.cpu_settings`): freed memory is kept (otherwise page
faults on each forward's large activations dominate the times at batch 64) and oneDNN's
primitive cache holds 4096 entries (the routed model's procedures meet N times the
base's input shapes).

    python benchmarks/perf.py -o out/perf
    python benchmarks/perf.py --models resnet18 --runtimes eager onnx -o out/perf_r18
    python benchmarks/perf.py --device cuda --runtimes eager compile -o out/perf_cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import cpu_options  # benchmarks/cpu_options.py, beside this script
from results import write_rows
from tqdm import tqdm

import rmn_fx
from rmn_fx.deploy import FORMATS
from rmn_fx.deploy.parity import procedures_used
from rmn_fx.measure import flop_counts, spread_routes
from rmn_fx.models import create_model

Runner = Callable[[torch.Tensor], object]


def median_latencies(runners: dict[str, Runner], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call of each runner on `x`; calls are interleaved so that drift in
    the machine's speed (other load, frequency) affects every runner alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    finish = torch.cuda.synchronize if x.is_cuda else lambda: None  # a call's time includes its kernels
    with torch.no_grad():
        for run in runners.values():
            run(x)
            run(x)
        for _ in range(repeats):
            for name, run in runners.items():
                finish()
                start = time.perf_counter()
                run(x)
                finish()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def split(run: Runner, size: int) -> Runner:
    """`run` on consecutive sub-batches of `size` samples (the base model at the routed model's batching)."""
    return lambda x: [run(chunk) for chunk in x.split(size)]


def runners(runtime: str, model, size: tuple[int, ...], copies: int = 1) -> list[Runner]:
    """`copies` callables of `model` as `runtime` runs it, each with weights of its own (deep
    copies; ONNX: sessions of one export, fed C,H,W = `size`). Compiled with a dynamic batch
    axis: the base meets batch 1, its split sub-batch and the whole batch."""
    if runtime == "onnx":
        artifact = rmn_fx.export(model, "onnx", input_size=size)
        return [FORMATS["onnx"].runner(artifact) for _ in range(copies)]
    models = [model, *(copy.deepcopy(model) for _ in range(copies - 1))]
    return [torch.compile(m, dynamic=True) for m in models] if runtime == "compile" else models


def measure(name: str, branches: int, runtimes: list[str], batches: list[int], repeats: int, device: torch.device, settings: dict) -> list[dict]:
    base = create_model(name).eval()
    start = time.perf_counter()
    gm = rmn_fx.transform(base, branches=branches)
    convert_s = time.perf_counter() - start
    gm.eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, 224, 224, generator=generator) for b in batches}
    spread_routes(gm, inputs[max(batches)])
    x1 = inputs[min(batches)][:1]
    flops_base, flops_routed = flop_counts(base, x1)[0], flop_counts(gm, x1)[0]
    base, gm, inputs = base.to(device), gm.to(device), {b: x.to(device) for b, x in inputs.items()}
    rows = []
    size = tuple(x1.shape[1:])
    for runtime in runtimes:
        (base_run, copy_run), (routed_run,) = runners(runtime, base, size, copies=2), runners(runtime, gm, size)
        for batch, x in inputs.items():
            used = procedures_used(gm, x)
            sub_batch = max(1, round(statistics.mean(batch / u for u in used)))
            timed = {"base": base_run, "base_split": split(base_run, sub_batch), "base_copy": copy_run, "routed": routed_run}
            t = median_latencies(timed, x, repeats if batch == 1 else max(3, repeats // 4))
            best = min(t["base"], t["base_split"])
            rows.append(
                {
                    "model": name, "branches": branches, "runtime": runtime, "batch": batch, "device": device.type, "threads": torch.get_num_threads(), **settings,
                    "convert_s": round(convert_s, 2), "flops_ratio": round(flops_routed / flops_base, 4),
                    "mean_sub_batch": sub_batch, "base_ms": round(1000 * t["base"], 2), "base_split_ms": round(1000 * t["base_split"], 2),
                    "routed_ms": round(1000 * t["routed"], 2), "ratio_to_best_base": round(t["routed"] / best, 3),
                    "copy_ratio": round(t["base_copy"] / t["base"], 3),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50", "efficientnet_b0"])
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--runtimes", nargs="+", default=["eager", "compile", "onnx"], choices=["eager", "compile", "onnx"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=30, help="Timed runs at batch 1 (a quarter of them at larger batches).")
    parser.add_argument("--threads", type=int, help="Intra-op threads (default: torch's).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where eager and compiled models run (ONNX Runtime: the CPU only).")
    cpu_options.add_arguments(parser)
    parser.add_argument("-o", "--output", default="out/perf", help="Output prefix for .csv and .json.")
    args = parser.parse_args()
    if args.device == "cuda" and "onnx" in args.runtimes:
        parser.error("--device cuda times eager and compile only (the export extra's ONNX Runtime runs on the CPU): drop onnx from --runtimes")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = cpu_options.apply(args)
    device = torch.device(args.device)
    rows = [row for n in tqdm(args.models, desc="models", disable=None) for row in measure(n, args.branches, args.runtimes, args.batches, args.repeats, device, settings)]
    write_rows(args.output, rows)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, allocator: {settings['allocator']}, oneDNN primitive cache: {settings['primitive_cache']}, N = {args.branches}, memory routing with attention, 224x224")
    print("| model | runtime | batch | FLOPs ratio | base whole / split into sub-batches of S (ms) | routed (ms) | routed / faster base | noise floor: copy / base |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['flops_ratio']:.4f} | {r['base_ms']:.1f} / {r['base_split_ms']:.1f} (S = {r['mean_sub_batch']}) | "
            f"{r['routed_ms']:.1f} | {r['ratio_to_best_base']:.3f} | {r['copy_ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
