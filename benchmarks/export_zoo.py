"""Which zoo models export, base and converted, per format?

For each model: convert it as the zoo sweep does (N procedures, memory routing unless
--routing; routes spread over the procedures), then for each format export the *base*
model and the converted one (`rmn_fx.export`) and compare each with eager PyTorch on
random batches (--batches). A converted model counts as exported when its program agrees
with eager within 1e-4 on every batch. Failures keep their one-line reason. Writes CSV and
JSON, prints the counts per format and every failure.

    python benchmarks/export_zoo.py --hub torchvision -o out/export_torchvision
    python benchmarks/export_zoo.py --hub timm --formats pt2 -o out/export_timm
    python benchmarks/export_zoo.py --hub timm --models resnet18 convnext_atto -o out/export_some

--jobs J exports J models at once, each in its own process with one thread (export is
mostly single-threaded Python; the rows keep the list's order). A model whose process
dies (the kernel's out-of-memory killer: the largest ViTs) is retried alone, and if it
dies again its row says so; the sweep goes on.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
from results import read_rows, write_rows  # benchmarks/results.py, beside this script
from tqdm import tqdm

from rmn_fx.deploy import FORMATS, check_parity, example_input, export_program
from rmn_fx.errors import RMNError, first_line
from rmn_fx.measure import spread_routes
from rmn_fx.models import torchvision_names
from rmn_fx.zoo import SIDES, TIMM_MODELS, convert_for_sweep


def failure(exc: Exception) -> str:
    return first_line(exc) if isinstance(exc, RMNError) else f"{type(exc).__name__}: {first_line(exc)}"


def exports(model, size: tuple[int, ...], formats: list[str], batches) -> dict[str, tuple[str, float | None, str]]:
    """Per format, (status, worst relative error, reason) of exporting `model`, fed C,H,W =
    `size`: one torch.export (`export_program`), converted to each format, as `rmn_fx.export` does."""
    example = example_input(model, size)
    try:
        program = export_program(model, example)
    except Exception as exc:  # noqa: BLE001 -- every failure is a result of the sweep
        return {fmt: ("fails", None, failure(exc)) for fmt in formats}
    results = {}
    for fmt in formats:
        try:
            rows = check_parity(model, FORMATS[fmt].runner(FORMATS[fmt].convert(program)), example, batches)
        except Exception as exc:  # noqa: BLE001
            results[fmt] = ("fails", None, failure(exc))
            continue
        results[fmt] = ("ok" if all(r.ok for r in rows) else "differs", max(r.relative_error for r in rows), "")
    return results


def sweep_one(name: str, args, sides) -> dict:
    row = {"model": name}
    start = time.perf_counter()
    try:
        base, gm, size, _ = convert_for_sweep(name, args.branches, sides, routing=args.routing)
    except Exception as exc:  # noqa: BLE001
        return {**row, "convert": failure(exc)}
    spread_routes(gm, torch.randn(max(args.branches, 2), *size, generator=torch.Generator().manual_seed(1)))
    row.update(convert="ok", input=size[-1])
    for which, model in (("base", base), ("routed", gm)):
        for fmt, (status, worst, reason) in exports(model, size, args.formats, args.batches).items():
            row.update({f"{fmt}_{which}": status, f"{fmt}_{which}_error": worst, f"{fmt}_{which}_reason": reason})
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def one_thread() -> None:
    torch.set_num_threads(1)


def run_in_processes(work, names: list[str], jobs: int, per_process: int = 4):
    """`work(name)` for each name, `jobs` processes at a time, yielded in order; a fresh
    pool every `per_process` models a process (what a model leaves in memory goes with its
    process; the pool's own `max_tasks_per_child` can hang on Python 3.11). When a process
    dies, the models not yet finished run again one at a time, and one whose process dies
    alone gets a row naming that instead of a result."""
    pending = list(names)
    while pending:
        chunk = pending[: jobs * per_process]
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread)
        futures = [pool.submit(work, name) for name in chunk]
        finished = 0
        try:
            for future in futures:
                yield future.result()
                finished += 1
        except BrokenProcessPool:
            if jobs == 1:
                yield {"model": chunk[finished], "convert": "its process died (killed by the kernel: out of memory?)"}
                finished += 1
            jobs = 1
        finally:
            pool.shutdown(cancel_futures=True)
        pending = pending[finished:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub", choices=["torchvision", "timm"], required=True)
    parser.add_argument("--models", nargs="*", help="Only these models.")
    parser.add_argument("--branches", type=int, default=2)
    parser.add_argument("--routing", default="memory")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--jobs", type=int, default=1, help="Models exported at once, one process and one thread each.")
    parser.add_argument("--resume", action="store_true", help="Keep the rows of models the output files already hold; export the rest.")
    parser.add_argument("-o", "--output", default="out/export_zoo", help="Output prefix for .csv and .json.")
    args = parser.parse_args()
    names = args.models or (list(torchvision_names()) if args.hub == "torchvision" else TIMM_MODELS)
    prefix = "timm:" if args.hub == "timm" else "torchvision:"
    sides = SIDES if args.hub == "torchvision" else None
    done = {r["model"]: r for r in read_rows(args.output)} if args.resume else {}
    rows = list(done.values())  # every row the files hold, --models or not
    todo = [prefix + n for n in names if prefix + n not in done]
    work = functools.partial(sweep_one, args=args, sides=sides)
    for row in tqdm(run_in_processes(work, todo, args.jobs), total=len(todo), desc=f"{args.hub} export", disable=None):
        rows.append(row)
        write_rows(args.output, rows)  # after every model: a long sweep keeps what it measured
    converted = [r for r in rows if r["convert"] == "ok"]
    print(f"{len(converted)}/{len(rows)} converted (N = {args.branches}, {args.routing} routing)")
    print("| format | base exports | routed exports (of those whose base does) | routed exports (all) |")
    print("|---|---|---|---|")
    for fmt in args.formats:
        base_ok = [r for r in converted if r[f"{fmt}_base"] == "ok"]
        both = [r for r in base_ok if r[f"{fmt}_routed"] == "ok"]
        routed_ok = [r for r in converted if r[f"{fmt}_routed"] == "ok"]
        print(f"| {fmt} | {len(base_ok)}/{len(converted)} | {len(both)}/{len(base_ok)} | {len(routed_ok)}/{len(converted)} |")
    for r in rows:
        if r["convert"] != "ok":
            print(f"- {r['model']}: not converted: {r['convert']}")
            continue
        for fmt in args.formats:
            for which in ("base", "routed"):
                if r[f"{fmt}_{which}"] != "ok":
                    print(f"- {r['model']} {which} {fmt}: {r[f'{fmt}_{which}']} {r[f'{fmt}_{which}_reason'] or r[f'{fmt}_{which}_error']}")


if __name__ == "__main__":
    main()
