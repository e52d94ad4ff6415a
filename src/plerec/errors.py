"""Error helpers shared by the config, data and model layers."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """A ' Did you mean `x`?' hint, or '' when nothing is close."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def unknown_key(key: str, valid: Iterable[str], where: str) -> ValueError:
    valid = sorted(valid)
    return ValueError(f"Unknown key `{key}` in {where}.{did_you_mean(key, valid)} Expected one of: {', '.join(valid)}")
