"""Where a routed model's extra time goes, stage by stage: its procedures, the Conditional
Attention, the routing (key, nearest memory, dispatch) and the sub-batching, each timed on
the stage's own input.

`perf.py` gives one ratio per model; this splits the routed model's cost over its routed
stages. For each stage (memory routing with attention, routes spread over the N
procedures, eval mode), interleaved and repeated on the input it receives in a forward:
  - the stage as the model calls it;
  - each procedure that receives samples, followed by the attention for its route, on its
    sub-batch (what the stage runs after routing);
  - the same procedures alone;
  - procedure 0 on the whole input: the base model's part, since every procedure is an
    exact clone of it.
attention = the second minus the third; routing = the first minus the second (the key,
the nearest memory, the host sync and, at batch > 1, the sort, gather and scatter of the
sub-batches); sub-batching = the third minus the fourth (N sets of weights, each read for
its sub-batch, and smaller operations). Each is also given as a share of the base model's
whole forward at the same batch, timed in the same run. The sub-batches are cut before
the timing starts.

    python benchmarks/stage_costs.py --models efficientnet_b0 --batch 1 -o out/stage-costs
"""

from __future__ import annotations

import argparse

import torch
import cpu_options  # benchmarks/cpu_options.py, beside this script
from perf import median_latencies
from results import write_rows
from tqdm import tqdm

import rmn_fx
from rmn_fx.measure import spread_routes
from rmn_fx.models import create_model
from rmn_fx.nn.routed_stage import RoutedStage, routed_stages

COSTS = ("sub_batching", "attention", "routing")  # the routed stage's costs beyond the base's part, as row fields *_ms and *_share_of_base


def stage_arguments(model: torch.nn.Module, stages: list[RoutedStage], x: torch.Tensor) -> list[tuple]:
    """The arguments each of `stages` receives when `model` runs on `x`."""
    captured: dict[int, tuple] = {}
    handles = [stage.register_forward_pre_hook(lambda s, args, i=i: captured.setdefault(i, args)) for i, stage in enumerate(stages)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(stages))]


def sub_batches(stage: RoutedStage, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(procedure, its samples of `x`) for every procedure the stage sends samples to."""
    route = stage.first_choice(x)
    chosen = [(j, torch.nonzero(route == j).squeeze(1)) for j in range(stage.branches)]
    return [(j, x.index_select(0, rows)) for j, rows in chosen if rows.numel()]


def stage_runners(stage: RoutedStage, args: tuple, chunks: list[tuple[int, torch.Tensor]]) -> dict[str, object]:
    """Callables (their argument ignored) for the stage on `args`, its attended procedures
    and its procedures alone on their `chunks` (`sub_batches`), and the base's part
    (procedure 0 on the whole input)."""
    x, side = args[0], args[1:]
    attended = stage.attended_procedures() if stage.attention is not None else stage.procedures

    def with_side_inputs(run):
        def call(_):
            with stage.side_inputs(side):  # none for most parts: then it sets nothing they read
                return run()
        return call

    return {
        "stage": lambda _: stage(*args),
        "attended": with_side_inputs(lambda: [attended[j](chunk) for j, chunk in chunks]),
        "procedures": with_side_inputs(lambda: [stage.procedures[j](chunk) for j, chunk in chunks]),
        "base_part": with_side_inputs(lambda: stage.procedures[0](x)),
    }


def measure(name: str, branches: int, batch: int, repeats: int, settings: dict) -> list[dict]:
    base = create_model(name).eval()
    routed = rmn_fx.transform(base, branches=branches).eval()
    x = torch.randn(max(batch, branches), 3, 224, 224, generator=torch.Generator().manual_seed(0))
    spread_routes(routed, x)
    x = x[:batch]
    stages = routed_stages(routed)
    names = {module: path for path, module in routed.named_modules()}
    rows = []
    with torch.no_grad():
        whole = median_latencies({"base": base, "routed": routed}, x, repeats)
        for i, (stage, args) in enumerate(tqdm(list(zip(stages, stage_arguments(routed, stages, x))), desc=name, disable=None)):
            chunks = sub_batches(stage, args[0])
            t = median_latencies(stage_runners(stage, args, chunks), x, repeats)
            attention, routing, sub_batching = t["attended"] - t["procedures"], t["stage"] - t["attended"], t["procedures"] - t["base_part"]
            rows.append(
                {
                    "model": name, "branches": branches, "batch": batch, "threads": torch.get_num_threads(), **settings,
                    "stage": i, "part": names[stage], "procedures_used": len(chunks),
                    "stage_ms": round(1000 * t["stage"], 3), "procedures_ms": round(1000 * t["procedures"], 3), "base_part_ms": round(1000 * t["base_part"], 3),
                    "attention_ms": round(1000 * attention, 3), "routing_ms": round(1000 * routing, 3), "sub_batching_ms": round(1000 * sub_batching, 3),
                    "attention_share_of_base": round(attention / whole["base"], 4), "routing_share_of_base": round(routing / whole["base"], 4),
                    "sub_batching_share_of_base": round(sub_batching / whole["base"], 4),
                    "base_ms": round(1000 * whole["base"], 2), "routed_ms": round(1000 * whole["routed"], 2),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0"], help="Model names, as rmn-fx takes them (torchvision first, then timm; timm:NAME forces timm), with random weights.")
    parser.add_argument("--branches", type=int, default=8, help="Procedures per routed stage (N).")
    parser.add_argument("--batch", type=int, default=1, help="Samples per forward; routes are spread over min(batch, N) procedures.")
    parser.add_argument("--repeats", type=int, default=100, help="Timed runs of each part (and of the whole models).")
    parser.add_argument("--threads", type=int, help="Intra-op threads (default: torch's).")
    cpu_options.add_arguments(parser)
    parser.add_argument("-o", "--output", default="out/stage-costs", help="Output prefix for .csv and .json.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = cpu_options.apply(args)
    rows = [row for name in args.models for row in measure(name, args.branches, args.batch, args.repeats, settings)]
    write_rows(args.output, rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: {settings['allocator']}, N = {args.branches}, batch {args.batch}, memory routing with attention, 224x224")
    print("| model | stage | part | base's part (ms) | sub-batching | attention | routing |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['stage']} | {r['part']} | {r['base_part_ms']:.2f} | "
            + " | ".join(f"{r[k + '_ms']:.2f} ({100 * r[k + '_share_of_base']:.1f}%)" for k in COSTS)
            + " |"
        )
    print("(ms, and in brackets the share of the base model's whole forward)")
    for name in args.models:
        own = [r for r in rows if r["model"] == name]
        summed = ", ".join(f"{k.replace('_', '-')} {100 * sum(r[k + '_share_of_base'] for r in own):.1f}%" for k in COSTS)
        print(f"{name}, summed over {len(own)} stages: {summed}; whole routed / base {own[0]['routed_ms'] / own[0]['base_ms']:.3f} ({own[0]['routed_ms']:.1f} / {own[0]['base_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
