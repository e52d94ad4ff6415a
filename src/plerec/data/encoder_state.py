"""The checks an encoder's state dict passes before an Encoder is made from it.

A state comes from a checkpoint or from a prepared encoder.json, files a user may have been handed: every
key must be there with its type, every categorical column must have a vocabulary or a bucket count, and a
bucket count stays below 2^31 (the model's size is checked separately, before its weights are allocated).
"""

from __future__ import annotations

import math
from typing import Any

from plerec.config import ListFeature, TaskConfig

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
    "lists": dict,
    "embedding_dims": dict,
    "group": str,
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
    for name, spec in state.get("lists", {}).items():
        _check_list(name, spec, state)
    tables = set(state["categorical"]) | {n for n, s in state.get("lists", {}).items() if not s.get("share")}
    for col, width in state.get("embedding_dims", {}).items():
        if col not in tables or not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 65_536:
            raise ValueError(
                f"Expected encoder `embedding_dims` to map categorical or own-table list columns to widths in "
                f"[1, 65536], but got {col!r} = {width!r}"
            )
    for i, task in enumerate(state["tasks"]):
        if not isinstance(task, dict):
            raise ValueError(f"Expected encoder `tasks` #{i} to be a table, but got {type(task).__name__}")
        try:
            TaskConfig(**task)
        except TypeError as err:
            raise ValueError(f"Expected encoder `tasks` #{i} to be a task's settings, but {err}") from None


LIST_KEYS = {"pooling", "max_length", "share", "target", "separator", "attention_dims", "elements"}


def _check_list(name: str, spec: Any, state: dict) -> None:
    """One list column's settings: those of [features.lists], `max_length` resolved (≥ 1), its element type,
    and a vocabulary of its own unless it shares a categorical column's."""
    where = f"encoder `lists` `{name}`"
    if not isinstance(spec, dict) or set(spec) != LIST_KEYS:
        raise ValueError(f"Expected {where} to be a table of the keys {', '.join(sorted(LIST_KEYS))}, but got {spec!r}")
    try:
        config = ListFeature(**{k: v for k, v in spec.items() if k != "elements"})
        config.check(name)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected {where} to be valid settings, but {err}") from None
    if not isinstance(config.max_length, int) or config.max_length < 1:
        raise ValueError(f"Expected {where} `max_length` to be a resolved length >= 1, but got {config.max_length!r}")
    if spec["elements"] not in ("integer", "text"):
        raise ValueError(f"Expected {where} `elements` to be 'integer' or 'text', but got {spec['elements']!r}")
    for key in ("share", "target"):
        if spec[key] and spec[key] not in state["categorical"]:
            raise ValueError(f"Expected {where} `{key}` to name a categorical column, but got {spec[key]!r}")
    if not spec["share"] and not isinstance(state["vocabs"].get(name), list):
        raise ValueError(f"Expected encoder `vocabs` to hold a list for the list column `{name}`, but not")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
