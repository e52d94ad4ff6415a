"""Reading a chunk's feature columns, as the encoder and its fitter both do: numbers as float64 with NaN
where missing, categories as single values, plain integers without pandas.

A value that would not be finite, or not a single value, stops with an error naming the file, the column
and the first bad rows (counted from 0 at the first data row, in the file, whichever split or chunk they
were read in).
"""

from __future__ import annotations

import numpy as np

from plerec.data.frames import bad_rows, pd, plain_column
from plerec.data.frames import missing_values as _missing
from plerec.data.frames import plain_value as _plain
from plerec.errors import did_you_mean


def require_columns(frame: pd.DataFrame, columns: list[str], source: str, what: str) -> None:
    names = [str(c) for c in frame.columns]
    for col in columns:
        if col not in frame.columns:
            raise ValueError(
                f"Column `{col}` used by {what} is not in {source}.{did_you_mean(col, names)} "
                f"Columns: {', '.join(names)}"
            )


def numeric_column(frame: pd.DataFrame, col: str, source: str) -> np.ndarray:
    """The column as float64, NaN where missing; an error names the rows that are not finite numbers."""
    plain = plain_column(frame, col)
    if plain is not None:  # as below, without pandas: the same values, and any bad one goes below
        values = plain.astype(np.float64)
        if not np.isinf(values).any():  # NaN is a missing value; ±inf goes below, to be reported
            return values
    column = frame[col]
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64)
    missing = _missing(column)
    numeric = to_float(column, ~missing)
    # Text, and also ±inf: imputing it would hide a broken value, keeping it makes the standardised column NaN.
    bad = ~missing & ~np.isfinite(numeric)
    if bad.any():
        row = column.index[bad.argmax()]
        raise ValueError(
            f"Numeric column `{col}` of {source}, row {row}: expected a finite number, "
            f"but got {_plain(column.loc[row])!r} (list it under [features] categorical if it is a category; "
            "leave the cell empty if the value is missing)." + bad_rows(column, bad)
        )
    return numeric


def to_float(column: pd.Series, present: np.ndarray) -> np.ndarray:
    """The column as float64 where `present`, NaN elsewhere and where a value is not a number."""
    try:
        return pd.to_numeric(column.where(present), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError, OverflowError):  # e.g. Python ints beyond int64 or odd objects: one by one
        out = np.full(len(column), np.nan)
        for i in np.flatnonzero(present):
            try:
                out[i] = float(column.iloc[i])
            except (TypeError, ValueError, OverflowError):
                pass
        return out


def raise_missing(frame: pd.DataFrame, col: str, missing: np.ndarray, source: str) -> None:
    row = frame.index[missing.argmax()]
    raise ValueError(
        f"Numeric column `{col}` of {source}, row {row}: value is missing ({int(missing.sum())} rows of the "
        f"{len(missing)} read) and [data] missing_numeric = 'error'; fill in the values, or set it to 'impute' "
        "to use the training mean and an indicator." + bad_rows(frame[col], missing)
    )


def hashable(column: pd.Series, col: str, source: str) -> pd.Series:
    """The column, after checking that its values are single values, not lists or tables (Parquet nested types)."""
    if column.dtype == object:
        odd = column.map(lambda v: isinstance(v, list | tuple | dict | set | np.ndarray)).to_numpy(dtype=bool)
        if odd.any():
            row = column.index[odd.argmax()]
            raise ValueError(
                f"Categorical column `{col}` of {source}, row {row}: expected a single value (text or a number), "
                f"but got {type(column.loc[row]).__name__} {column.loc[row]!r}." + bad_rows(column, odd)
            )
    return column


def present_values(frame: pd.DataFrame, col: str, source: str) -> pd.Series:
    """A categorical column's values that are not missing (checked to be single values)."""
    column = frame[col]
    return hashable(column[~_missing(column)], col, source)


def plain_integers(frame: pd.DataFrame, col: str) -> np.ndarray | None:
    """The column as numpy integers that fit in int64 (no missing values possible), if it is one."""
    values = plain_column(frame, col)
    return values if values is not None and values.dtype.kind in "iu" else None
