"""Where every benchmark writes its rows: PREFIX.json and PREFIX.csv."""

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
