"""The process settings every latency benchmark applies before building a model, as options
(`rmn_fx.cpu_settings`: why each matters), and their values for the results' rows."""

from __future__ import annotations

import argparse

from rmn_fx.cpu_settings import ROUTED_PRIMITIVE_CACHE, keep_freed_memory, reserve_primitive_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allocator", default="kept", choices=["kept", "default"],
        help="kept (default): glibc's malloc keeps freed memory, so large activations are not page-faulted in on every forward; default: leave it as it is.",
    )
    parser.add_argument(
        "--primitive-cache", type=int, default=ROUTED_PRIMITIVE_CACHE, metavar="ENTRIES",
        help=f"oneDNN's primitive cache capacity (default {ROUTED_PRIMITIVE_CACHE}; oneDNN's own default, 1024, is too small for N procedures' sub-batch sizes). ONEDNN_PRIMITIVE_CACHE_CAPACITY in the environment wins.",
    )


def apply(args: argparse.Namespace) -> dict[str, object]:
    """Apply the settings to this process (before its first convolution); returns them as
    row fields."""
    allocator = keep_freed_memory() if args.allocator == "kept" else "default"
    return {"allocator": allocator, "primitive_cache": reserve_primitive_cache(args.primitive_cache)}
