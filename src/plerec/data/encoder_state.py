"""The checks an encoder's state dict passes before an Encoder is made from it.

A state comes from a checkpoint or from a prepared encoder.json, files a user may have been handed: every
key must be there with its type, every categorical column must have a vocabulary or a bucket count, and a
bucket count stays below 2^31 (the model's size is checked separately, before its weights are allocated).
"""

from __future__ import annotations

import math
from typing import Any

from plerec.config import TaskConfig

FIELDS = {
    "categorical": list,
    "numeric": list,
    "vocabs": dict,
    "means": dict,
    "stds": dict,
    "indicators": list,
    "tasks": list,
    "missing_numeric": str,
    "inferred": dict,
    "hash_buckets": dict,
    "label_stats": dict,
}
REQUIRED = ("categorical", "numeric", "vocabs", "tasks")


def check_encoder_state(state: Any) -> None:
    """Raise a ValueError naming the first key of `state` that an Encoder cannot be made from."""
    if not isinstance(state, dict):
        raise ValueError(f"Expected the encoder to be a table of its settings, but got {type(state).__name__}")
    for key in state:
        if key not in FIELDS:
            raise ValueError(f"Expected the encoder's keys to be among {', '.join(FIELDS)}, but got {key!r}")
    for key in REQUIRED:
        if key not in state:
            raise ValueError(f"Expected the encoder to have the key `{key}`, but it is missing")
    for key, kind in FIELDS.items():
        if key in state and not isinstance(state[key], kind):
            raise ValueError(f"Expected encoder `{key}` to be a {kind.__name__}, but got {type(state[key]).__name__}")
    for key in ("categorical", "numeric", "indicators"):
        if not all(isinstance(c, str) for c in state.get(key, [])):
            raise ValueError(f"Expected encoder `{key}` to list column names, but got a non-text entry")
    vocabs, buckets = state["vocabs"], state.get("hash_buckets", {})
    for col, n in buckets.items():
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < 2**31:
            raise ValueError(f"Expected encoder `hash_buckets` `{col}` to be an integer in [1, 2^31), but got {n!r}")
    for col in state["categorical"]:
        if col not in buckets and not isinstance(vocabs.get(col), list):
            raise ValueError(f"Expected encoder `vocabs` to hold a list for the categorical column `{col}`, but not")
    for col in state["numeric"]:
        mean, std = state.get("means", {}).get(col), state.get("stds", {}).get(col)
        if not (_number(mean) and _number(std) and std > 0):
            raise ValueError(
                f"Expected encoder `means` and `stds` of the numeric column `{col}` to be finite numbers (std > 0), "
                f"but got mean={mean!r}, std={std!r}"
            )
    extra = [c for c in state.get("indicators", []) if c not in state["numeric"]]
    if extra:
        raise ValueError(f"Expected encoder `indicators` to name numeric columns, but got {extra}")
    if state.get("missing_numeric", "impute") not in ("impute", "error"):
        raise ValueError(
            f"Expected encoder `missing_numeric` to be 'impute' or 'error', but got {state['missing_numeric']!r}"
        )
    for i, task in enumerate(state["tasks"]):
        if not isinstance(task, dict):
            raise ValueError(f"Expected encoder `tasks` #{i} to be a table, but got {type(task).__name__}")
        try:
            TaskConfig(**task)
        except TypeError as err:
            raise ValueError(f"Expected encoder `tasks` #{i} to be a task's settings, but {err}") from None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
