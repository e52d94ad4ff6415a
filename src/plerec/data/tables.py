"""Encoded rows as tensors: a whole split (EncodedTable), a batch of it (Batch), and how ids are stored.

Ids are stored in the narrowest integer type that holds them, or packed over two int16 columns where one
field's vocabulary outgrows int16 (see EncodedTable); a table is filled in place from encoded chunks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch: sparse ids (B, S), dense features (B, D), labels (B, T), which are in-space (B, T), and the
    list fields' padded ids (B, L) with their lengths (B, F) (L = the sum of their max_length; see lists.py)."""

    sparse: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    lists: torch.Tensor = None  # type: ignore[assignment]  # None: no list fields, (B, 0)
    lengths: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _no_lists(self)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self._fields()))

    def pin_memory(self) -> Batch:
        return Batch(*(t.pin_memory() for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.sparse, self.dense, self.labels, self.label_mask, self.lists, self.lengths

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """What the model reads: `model(*batch.inputs)`."""
        return self.sparse, self.dense, self.lists, self.lengths

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True, slots=True)
class EncodedTable:
    """A whole split as tensors: batches are slices or index-selects of these, never per-row Python.

    Ids are stored in int16 where every vocabulary fits it (below 32,768 ids). Where some do not, the
    table is packed rather than widened to int32: `sparse` is then int16 (N, S + W), column f holding the
    low 15 bits of field f's id (the whole id of a narrow field), and one more column per field listed in
    `wide` holding the bits above them. A field of 94,192 ids among 19 smaller ones costs 42 bytes a row
    instead of 80. Batches always carry the ids themselves (`Batch.sparse`, (B, S)).
    """

    sparse: torch.Tensor  # (N, S) ids, or (N, S + len(wide)) int16 packed ids
    dense: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N, T) 0 where masked; uint8 if every task is binary, else float32
    label_mask: torch.Tensor  # (N, T) bool
    lists: torch.Tensor = None  # type: ignore[assignment]  # (N, L) the list fields' padded ids; None: (N, 0)
    lengths: torch.Tensor = None  # type: ignore[assignment]  # (N, F) int16: each list field's length
    source: str = ""
    wide: tuple[int, ...] = ()  # fields whose ids are split over two int16 columns
    # (N,) int64 group codes of the [evaluate] group column (data/groups.py), for GAUC; None: no group column.
    # Evaluation reads them; batches do not carry them (the model never sees them).
    groups: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _no_lists(self)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def ids(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Those rows' ids (len, S), unpacked."""
        stored = self.sparse[rows] if isinstance(rows, slice) else self.sparse.index_select(0, rows)
        return unpack_ids(stored, self.wide)

    def batch_table(self, index: slice) -> EncodedTable:
        """Rows as a table of views (no copy)."""
        return EncodedTable(
            *(getattr(self, name)[index] for name in TABLE_FIELDS),
            source=self.source,
            wide=self.wide,
            groups=None if self.groups is None else self.groups[index],
        )

    def batch(self, index: torch.Tensor | slice) -> Batch:
        """Rows as a batch: ids unpacked, labels as float32 whatever their stored type."""
        if isinstance(index, slice):
            labels = self.labels[index].to(torch.float32)
            return Batch(
                self.ids(index),
                self.dense[index],
                labels,
                self.label_mask[index],
                self.lists[index],
                self.lengths[index],
            )
        return Batch(
            self.ids(index),
            self.dense.index_select(0, index),
            self.labels.index_select(0, index).to(torch.float32),
            self.label_mask.index_select(0, index),
            self.lists.index_select(0, index),
            self.lengths.index_select(0, index),
        )


TABLE_FIELDS = ("sparse", "dense", "labels", "label_mask", "lists", "lengths")  # EncodedTable's tensors


def _no_lists(rows: Batch | EncodedTable) -> None:
    """Rows built without list fields get empty (N, 0) ones."""
    n = rows.labels.shape[0]
    if rows.lists is None:
        object.__setattr__(rows, "lists", torch.zeros(n, 0, dtype=torch.int16))
    if rows.lengths is None:
        object.__setattr__(rows, "lengths", torch.zeros(n, 0, dtype=torch.int16))


LOW_BITS = 15  # a packed id's low part: 0 .. 32,767, a non-negative int16


def wide_fields(vocab_sizes: list[int]) -> tuple[int, ...]:
    """The fields to split over two int16 columns: none where every vocabulary fits int16, or where one is
    too large for two (then the table is int32 or int64)."""
    biggest = max(vocab_sizes, default=1)
    if biggest <= np.iinfo(np.int16).max or biggest > 1 << (2 * LOW_BITS):
        return ()
    return tuple(f for f, size in enumerate(vocab_sizes) if size > np.iinfo(np.int16).max)


def stored_dtype(vocab_sizes: list[int]) -> np.dtype:
    """The dtype of a table's `sparse` (see EncodedTable): int16 when packed, else the narrowest that
    holds every id."""
    biggest = max(vocab_sizes, default=1)
    if wide_fields(vocab_sizes):
        return np.dtype(np.int16)
    for dtype in (np.int16, np.int32):
        if biggest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def pack_ids(ids: np.ndarray, vocab_sizes: list[int]) -> np.ndarray:
    """(N, S) int64 ids as the table stores them (see EncodedTable)."""
    wide = wide_fields(vocab_sizes)
    if not wide:
        return ids.astype(stored_dtype(vocab_sizes))
    packed = np.empty((len(ids), ids.shape[1] + len(wide)), dtype=np.int16)
    packed[:, : ids.shape[1]] = ids & ((1 << LOW_BITS) - 1)
    packed[:, ids.shape[1] :] = ids[:, list(wide)] >> LOW_BITS
    return packed


def unpack_ids(stored: torch.Tensor, wide: tuple[int, ...]) -> torch.Tensor:
    """The ids (B, S) of stored rows (B, S) or packed rows (B, S + W)."""
    if not wide:
        return stored
    num_fields = stored.shape[1] - len(wide)
    ids = stored[:, :num_fields].to(torch.int32)
    ids[:, list(wide)] += stored[:, num_fields:].to(torch.int32) << LOW_BITS
    return ids


def fill_table(table: EncodedTable, parts: Iterable[EncodedTable]) -> EncodedTable:
    """Copy consecutive encoded chunks into the table, which they must fill exactly."""
    start = 0
    for part in parts:
        stop = start + len(part)
        for name in TABLE_FIELDS:
            getattr(table, name)[start:stop] = getattr(part, name)
        if table.groups is not None:
            table.groups[start:stop] = part.groups
        start = stop
    if start != len(table):  # the file changed while it was read
        raise ValueError(f"Expected {len(table)} rows in {table.source}, but read {start}")
    return table
