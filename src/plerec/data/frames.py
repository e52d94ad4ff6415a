"""Chunks of a table as the encoder reads them, and pandas imported only where it is needed.

Importing pandas costs a process about 41 MiB of resident memory (measured with torch 2.13 and pandas
3.1 on the speed benchmark's worker), a tenth of what plerec needs to train the benchmark's model.
Parquet chunks whose columns are all plain numbers (integer ids, float features and labels) are
encoded straight from their Arrow columns as numpy arrays, so that a run on such files never imports
pandas; any other column, and every error message about a column, goes through pandas exactly as a
DataFrame read whole would.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas
    import pyarrow


class _Pandas:
    """The pandas module, imported on first attribute access (`pd.factorize`, `pd.DataFrame`, …)."""

    def __getattr__(self, name: str):
        return getattr(importlib.import_module("pandas"), name)


pd = _Pandas()


def plain_dtype(dtype) -> bool:
    """Numbers that numpy holds exactly as read: signed integers, unsigned ones up to 32 bits (which
    int64 holds), and floats; not booleans (categories `True`/`False`) nor pandas' nullable types."""
    if not isinstance(dtype, np.dtype):
        return False
    return (dtype.kind == "i") or (dtype.kind == "u" and dtype.itemsize <= 4) or dtype.kind == "f"


class ArrowFrame:
    """A chunk of a Parquet file, read by the encoder like a DataFrame of it (`columns`, `frame[col]`,
    `index`, `attrs`, `len`), with `plain(col)` giving a column of plain numbers as a numpy array
    without pandas. The first `frame[col]` converts the whole chunk with pandas, exactly as reading it
    into a DataFrame would; `index` holds the rows' numbers in the file (counted from 0)."""

    def __init__(self, batch: pyarrow.RecordBatch, first_row: int, source: str):
        self.batch = batch
        self.columns = list(batch.schema.names)
        self.index = range(first_row, first_row + batch.num_rows)
        self.attrs = {"source": source}
        self._frame: pandas.DataFrame | None = None
        self._pandas_types: dict[str, str] | None = None

    def __len__(self) -> int:
        return self.batch.num_rows

    def __getitem__(self, col: str) -> pandas.Series:
        return self.to_pandas()[col]

    def to_pandas(self) -> pandas.DataFrame:
        if self._frame is None:
            frame = self.batch.to_pandas()
            frame.index = pd.RangeIndex(self.index.start, self.index.stop)
            frame.attrs["source"] = self.attrs["source"]
            self._frame = frame
        return self._frame

    def plain(self, col: str) -> np.ndarray | None:
        """The column as numpy when its values are plain numbers (missing floats as NaN), else None."""
        column = self.batch.column(col)
        try:
            dtype = np.dtype(column.type.to_pandas_dtype())
        except (NotImplementedError, TypeError):  # dictionary, nested, extension types
            return None
        if not plain_dtype(dtype) or (dtype.kind != "f" and column.null_count):
            return None  # integers with gaps become floats in pandas: leave that to pandas
        if self._pandas_type(col) not in (None, dtype.name):
            return None  # written from a pandas type of its own (e.g. nullable Int64): read as pandas would
        return _numpy_values(column, dtype)

    def _pandas_type(self, col: str) -> str | None:
        """The numpy type pandas recorded for the column when it wrote the file, if it did."""
        if self._pandas_types is None:
            meta = self.batch.schema.pandas_metadata or {}
            self._pandas_types = {e.get("name"): e.get("numpy_type") for e in meta.get("columns", [])}
        return self._pandas_types.get(col)


def arrow_frames(batches: Iterable[pyarrow.RecordBatch], source: str, first: int = 0) -> Iterator[ArrowFrame]:
    """Consecutive record batches of a file, the first of them at row `first` (a row group's first row),
    as ArrowFrames whose index counts the rows in the file."""
    for batch in batches:
        yield ArrowFrame(batch, first, source)
        first += batch.num_rows


def _numpy_values(column: pyarrow.Array, dtype: np.dtype) -> np.ndarray:
    """A numeric Arrow array as numpy, read off its buffers (pyarrow's own `to_numpy` imports pandas);
    missing values (floats only here) as NaN."""
    values = np.frombuffer(column.buffers()[1], dtype=dtype, count=len(column), offset=column.offset * dtype.itemsize)
    if column.null_count:
        bits = np.frombuffer(column.buffers()[0], dtype=np.uint8)
        valid = np.unpackbits(bits, count=column.offset + len(column), bitorder="little")[column.offset :]
        values = np.where(valid.astype(bool), values, np.nan).astype(dtype, copy=False)
    return values


def plain_column(frame, col: str) -> np.ndarray | None:
    """A frame's column as a numpy array when it holds plain numbers (see `plain_dtype`), else None; for
    a pandas DataFrame and an `ArrowFrame` alike."""
    if isinstance(frame, ArrowFrame):
        return frame.plain(col)
    column = frame[col]
    return column.to_numpy() if plain_dtype(column.dtype) else None


BAD_ROWS_SHOWN = 5


def missing_values(column: pandas.Series) -> np.ndarray:
    """NaN/None, or a blank string (CSVs read with keep_default_na = false; pandas 3 text is not `object`)."""
    missing = column.isna().to_numpy()
    if pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column):
        missing = missing | (column.astype(str).str.strip() == "").to_numpy(dtype=bool, na_value=False)
    return missing


def bad_rows(column: pandas.Series, bad: np.ndarray) -> str:
    """The end of an error message: the first bad rows of a column with their values, and how many."""
    positions = np.flatnonzero(bad)
    shown = ", ".join(f"{column.index[i]} ({show_value(column.iloc[i])})" for i in positions[:BAD_ROWS_SHOWN])
    more = ", …" if len(positions) > BAD_ROWS_SHOWN else ""
    return (
        f" Bad rows (counted from 0 = the first data row of the file): {shown}{more}; "
        f"{len(positions)} of the {len(bad)} rows read."
    )


def show_value(value) -> str:
    """A cell's value as an error message shows it ("empty" for a missing one)."""
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)) or value is pd.NA:
        return "empty"
    return repr(plain_value(value))


def plain_value(value):
    """numpy scalars to Python ones, so vocabularies serialise (checkpoints, JSON)."""
    return value.item() if isinstance(value, np.generic) else value
