"""The rows of docs/RELIABILITY.md's table. Each campaign of the suite calls ``record`` with what
it tried and what happened; when $ACCEL_RELIABILITY_REPORT names a file, the row is appended to it
(JSON lines), so one run of the suite (`python benchmarks/reliability.py`) gives every figure."""

from __future__ import annotations

import json
import os


def record(row: str, **figures) -> None:
    """Append ``{"row": row, **figures}`` to $ACCEL_RELIABILITY_REPORT, if it is set."""
    path = os.environ.get("ACCEL_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"row": row, **figures}, sort_keys=True) + "\n")
