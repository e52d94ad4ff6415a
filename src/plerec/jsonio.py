"""JSON as plerec writes it: standard JSON only. A NaN or an infinity (a metric that could not be computed,
a diverged loss) becomes null rather than the `NaN` / `Infinity` tokens that Python writes by default and that
JSON parsers other than Python's (jq, JavaScript, Go, DuckDB, ...) reject."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from plerec.safe_io import atomic_write_text


def finite(value: Any) -> Any:
    """The value with every non-finite float, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):  # numpy's float64 too
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps of `finite(value)`; allow_nan=False, so that a non-finite number that got past is an error."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write `dumps(value)` to `path` atomically (see safe_io: a regular file or a new path only)."""
    return atomic_write_text(path, dumps(value, indent=indent) + "\n")
