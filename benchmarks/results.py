"""Where every benchmark writes its rows: PREFIX.json and PREFIX.csv (and reads them back)."""

from __future__ import annotations

import csv
import json
import os


def write_rows(prefix: str, rows: list[dict], header: dict | None = None) -> None:
    """PREFIX.json (the rows, under `header`'s keys if given) and PREFIX.csv (a column for
    every key any row has)."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(rows if header is None else {**header, "runs": rows}, f, indent=1)
    with open(prefix + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list({k: None for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def read_rows(prefix: str) -> list[dict]:
    """The rows `write_rows` wrote to PREFIX.json without a header; none if there is no such file."""
    if not os.path.exists(prefix + ".json"):
        return []
    with open(prefix + ".json") as f:
        return json.load(f)
