"""Vocabularies and the keys a categorical value is counted, looked up and hashed by.

A value's key is its text, with numbers compared by value (7, 7.0 and "7" are one category); a column
listed in [features] hash_buckets has no vocabulary: its keys map to N buckets by a fixed hash. A fitted
vocabulary of plain integers is held as one int64 array (IntegerVocabulary), any other as a list of
values that serialise to JSON.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from plerec.data.frames import plain_value as _plain


def category_key(value) -> str:
    """The text a categorical value is counted, looked up and hashed by. Numbers compare by value and text
    that reads as a number compares as that number (7, 7.0, "7" and "7.0" are one category), so that a
    category does not depend on the type a file, or one chunk of a CSV file, happened to be read with."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if not isinstance(value, str):
        return str(value)
    text = value.strip()
    if text in _BOOL_TEXT:  # what pandas reads as a boolean in a column without other text
        return _BOOL_TEXT[text]
    if "_" in text:  # Python reads "1_000" as a number, pandas does not
        return value
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return value
    return category_key(number) if np.isfinite(number) else value


_BOOL_TEXT = {"True": "True", "TRUE": "True", "true": "True", "False": "False", "FALSE": "False", "false": "False"}


def integer_key(key: str) -> int | None:
    """The integer a category key stands for, when the key is an integer's decimal text."""
    try:
        number = int(key)
    except ValueError:
        return None
    return number if str(number) == key and -(2**63) <= number < 2**63 else None


def stable_bucket(key: str, buckets: int) -> int:
    """1 + a bucket in [0, buckets) from a fixed hash of the text (BLAKE2b, not Python's salted `hash`):
    the same in every process, run and machine. Id 0 stays reserved for missing values."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % buckets


class IntegerVocabulary(Sequence):
    """A vocabulary of distinct integers, read like the list of Python ints it stands for, held as one
    int64 array: 8 bytes an entry instead of ~40 for a Python int and its list slot (8.6 MB → 2 MB for
    the speed benchmark's 251,465 ids). `Encoder.state_dict` writes it as a list."""

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        return self.values[index].tolist()  # a Python int, or a list for a slice

    def __iter__(self):
        return iter(self.values.tolist())

    def __eq__(self, other) -> bool:
        if isinstance(other, IntegerVocabulary):
            return np.array_equal(self.values, other.values)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # like a list

    def __repr__(self) -> str:
        return f"IntegerVocabulary({self.values.tolist()!r})"


def compact(vocabulary: list) -> Sequence:
    """A vocabulary read back from a state dict: an IntegerVocabulary when it is all plain ints that fit
    int64 (as the encoder fits them), else the list as it is."""
    if not vocabulary or not all(type(v) is int for v in vocabulary):
        return vocabulary
    try:
        return IntegerVocabulary(vocabulary)
    except OverflowError:
        return vocabulary


def json_value(value, key: str):
    """A vocabulary entry that serialises to JSON and checkpoints: the value, or its text (also for ±inf,
    which JSON cannot hold: the text has the same key, so it is the same category)."""
    value = _plain(value)
    if isinstance(value, float) and not np.isfinite(value):
        return key
    return value if isinstance(value, str | int | float | bool) else key
