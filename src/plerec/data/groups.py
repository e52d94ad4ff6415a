"""Group codes: the raw value of the [evaluate] group column (e.g. the user) as one int64 per row, for GAUC.

The codes come from the values as read from the split's file, not from the encoded ids: an embedding
vocabulary maps every value unseen in training to id 0, which would merge all new users into one group.
A value is coded by its category key (data/vocab.py), so 7, 7.0 and "7" are one group whichever type a file
or a chunk of it was read with: an integer key is its own code, any other key a fixed 64-bit hash of its
text (BLAKE2b: the same in every process, chunk and file; two distinct values share a code with
probability about 2^-64 per pair). A missing value gets MISSING_GROUP: that row is in no group.
"""

from __future__ import annotations

import hashlib

import numpy as np

from plerec.data.columns import hashable, plain_integers
from plerec.data.frames import missing_values, pd
from plerec.data.vocab import category_key, integer_key
from plerec.metrics import MISSING_GROUP


def group_codes(frame: pd.DataFrame, col: str, source: str) -> np.ndarray:
    """(N,) int64: each row's group code (MISSING_GROUP where the value is missing)."""
    integers = plain_integers(frame, col)
    if integers is not None:
        return integers.astype(np.int64, copy=False)  # uint64 beyond int64 wraps: still one code per value
    column = frame[col]
    codes, uniques = pd.factorize(hashable(column, col, source))
    keyed = np.array([_key_code(category_key(v)) for v in uniques], dtype=np.int64)
    out = np.full(len(column), MISSING_GROUP, dtype=np.int64)
    present = (codes >= 0) & ~missing_values(column)
    out[present] = keyed[codes[present]]
    return out


def _key_code(key: str) -> int:
    number = integer_key(key)
    if number is not None:
        return number
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
