"""Progress that shows wherever the output goes: a tqdm bar on a terminal, and in batch
jobs (output to a file or a pipe) a plain line every `every` seconds, which tqdm would
otherwise swallow or fill with carriage returns."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

PLAIN_EVERY_S = 30.0


def progress(
    iterable: Iterable,
    desc: str | None,
    total: int | None = None,
    status: Callable[[], str] | None = None,
    every: float = PLAIN_EVERY_S,
) -> Iterator:
    """Iterate over `iterable` with progress on stderr (none when `desc` is None).
    `status` adds a live text (e.g. the running loss) to each update."""
    if desc is None:
        yield from iterable
        return
    total = total if total is not None else _length(iterable)
    if sys.stderr.isatty():
        bar = tqdm(iterable, desc=desc, total=total, leave=False)
        for i, item in enumerate(bar):
            yield item
            if status is not None and i % 10 == 0:
                bar.set_postfix_str(status(), refresh=False)
        return
    started = last = time.monotonic()
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            of = f"/{total}" if total else ""
            extra = f"  {status()}" if status is not None else ""
            print(f"{desc}: {done}{of}  {now - started:.0f}s{extra}", file=sys.stderr, flush=True)


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None
