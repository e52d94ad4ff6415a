"""List-valued columns ([features.lists]): from a file's cells to padded ids and lengths.

A list column is a Parquet list of integers or text, a CSV cell whose elements are joined by the field's
`separator` ("12|7|93"), or, in memory, a column of Python lists or numpy arrays. Every read turns it into
one Arrow list array, so the elements of a whole chunk are one flat array with their offsets, and ids are
looked up for the flat array at once: no Python work per row. A missing cell and an empty cell are an
empty list. The encoded form is fixed-width: (N, max_length) ids, the kept elements first (oldest to
newest, the most recent `max_length` of a longer list), padded with id 0, and (N,) lengths; a model masks
the padding by the lengths, so what the padded positions hold never matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plerec.data.frames import ArrowFrame, pd

ELEMENTS_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Elements:
    """The elements of a list column's rows: a flat array (integers as numpy int64, or text as a pandas
    Series of str) and offsets (N + 1,), row i holding values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray | object
    offsets: np.ndarray
    integer: bool

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row_of(self, element: int) -> int:
        """The position (from 0 in the chunk) of the row holding flat element `element`."""
        return _row(self.offsets, element)


def read_elements(frame, col: str, separator: str, source: str) -> Elements:
    """The column's elements; an error names the file, column and row of a cell that is not a flat list."""
    array = _list_array(frame, col, separator, source)
    offsets = np.asarray(array.offsets, dtype=np.int64)
    if array.offset or offsets[0]:
        offsets = offsets - offsets[0]
    values = array.flatten()
    kind = values.type
    index = frame.index
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_struct(kind) or pa.types.is_map(kind):
        at = _first_nested(array)
        raise ValueError(
            f"List column `{col}` of {source}, row {index[at]}: expected a flat list of ids, but got a nested "
            f"{kind} element"
        )
    if values.null_count:
        element = int(np.flatnonzero(np.asarray(values.is_null()))[0])
        row = _row(offsets, element)
        raise ValueError(
            f"List column `{col}` of {source}, row {index[row]}: expected every element to be "
            f"an id, but element {element - offsets[row]} is null"
        )
    if pa.types.is_null(kind):  # every list empty: Arrow cannot tell their type
        return Elements(np.zeros(0, dtype=np.int64), offsets, True)
    if pa.types.is_integer(kind):
        return Elements(np.asarray(values.cast(pa.int64()), dtype=np.int64), offsets, True)
    if pa.types.is_boolean(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        texts = values.cast(pa.string())  # 7.0 and 7 are one category, as in a categorical column
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        texts = pc.utf8_trim_whitespace(values)
    else:
        raise ValueError(
            f"List column `{col}` of {source}: expected lists of integers or text, but got lists of {kind}"
        )
    texts = texts.to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(texts == "")
    if len(empty):
        row = _row(offsets, int(empty[0]))
        raise ValueError(
            f"List column `{col}` of {source}, row {index[row]}: expected every element to be an id, but element "
            f"{int(empty[0]) - offsets[row]} is empty (two separators {separator!r} in a row, or one at an end?)"
        )
    return Elements(pd.Series(texts, dtype=object), offsets, False)


def padded(ids: np.ndarray, offsets: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, max_length) int64 ids, each row's last `max_length` elements first and 0 after them, and the
    (N,) lengths kept."""
    lengths = np.minimum(np.diff(offsets), max_length)
    starts = offsets[1:] - lengths  # the most recent elements are the last ones
    positions = np.arange(max_length)
    keep = positions[None, :] < lengths[:, None]
    out = np.zeros((len(lengths), max_length), dtype=np.int64)
    if len(ids):
        out[keep] = ids[(starts[:, None] + positions[None, :])[keep]]
    return out, lengths


def bad_element(col: str, source: str, elements: Elements, bad: np.ndarray, index, expected: str) -> ValueError:
    """The error for elements that do not fit the column: the first rows and elements, and how many."""
    where = np.flatnonzero(bad)
    shown = []
    for element in where[:ELEMENTS_SHOWN]:
        row = _row(elements.offsets, int(element))
        shown.append(f"row {index[row]} element {int(element) - elements.offsets[row]} ({elements.values[element]!r})")
    more = ", …" if len(where) > ELEMENTS_SHOWN else ""
    return ValueError(
        f"List column `{col}` of {source}: expected {expected}, but got {', '.join(shown)}{more}; "
        f"{len(where)} of the {len(bad)} elements read (rows counted from 0 = the first data row of the file)."
    )


def _row(offsets: np.ndarray, element: int) -> int:
    return int(np.searchsorted(offsets, element, side="right") - 1)


def _first_nested(array: pa.Array) -> int:
    """The first row whose list holds a nested value."""
    lengths = np.asarray(pc.list_value_length(array).fill_null(0))
    return int(np.flatnonzero(lengths)[0]) if lengths.any() else 0


def _list_array(frame, col: str, separator: str, source: str) -> pa.ListArray:
    """The column as one Arrow list array (missing cells as empty lists)."""
    if isinstance(frame, ArrowFrame):
        column = frame.batch.column(col)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            return _no_nulls(column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            return _split(column, separator)
        if column.null_count == len(column):
            return _split(pa.array([None] * len(column), pa.string()), separator)
        raise ValueError(
            f"List column `{col}` of {source}: expected a list column or text cells of elements separated by "
            f"{separator!r}, but got a column of {column.type}"
        )
    column = frame[col]
    if pd.api.types.is_object_dtype(column):
        sample = column.dropna()
        listed = sample.map(lambda v: isinstance(v, list | tuple | np.ndarray)).to_numpy(dtype=bool)
        if listed.all() and len(sample):
            try:
                return _no_nulls(pa.array(column.to_numpy(), from_pandas=True))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as err:
                raise _mixed_error(column, col, source, err) from None
        if listed.any():
            row = sample.index[(~listed).argmax()] if not listed.all() else sample.index[0]
            raise ValueError(
                f"List column `{col}` of {source}, row {row}: expected every cell to be a list (or every cell text "
                f"separated by {separator!r}), but got {type(column.loc[row]).__name__} {column.loc[row]!r} "
                "next to lists"
            )
    missing = column.isna().to_numpy()
    if pd.api.types.is_float_dtype(column):  # one-element cells read as numbers: 7.0 is the id 7
        text = column.map(lambda v: str(int(v)) if float(v).is_integer() else repr(float(v)), na_action="ignore")
    else:
        text = column.astype(str)
    text = text.where(~missing, None).to_numpy(dtype=object)
    try:
        cells = pa.array(text, type=pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"List column `{col}` of {source}: expected text cells, but {err}") from None
    return _split(cells, separator)


def _split(cells: pa.Array, separator: str) -> pa.ListArray:
    """Text cells split at the separator; a missing or blank cell is an empty list."""
    blank = pc.or_kleene(pc.is_null(cells), pc.equal(pc.utf8_trim_whitespace(cells), ""))
    cells = pc.if_else(blank, pa.scalar(None, pa.string()), cells)
    return _no_nulls(pc.split_pattern(cells, separator))


def _no_nulls(array: pa.Array) -> pa.ListArray:
    """Missing lists as empty lists."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_large_list(array.type):
        array = array.cast(pa.list_(array.type.value_type))
    if array.null_count:
        array = pc.if_else(pc.is_null(array), pa.scalar([], array.type), array)
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
    return array


def _mixed_error(column, col: str, source: str, err: Exception) -> ValueError:
    """A column of Python lists Arrow could not read as one type: find the first odd element."""
    first_kind = None
    for row, cell in column.items():
        if cell is None or (isinstance(cell, float) and np.isnan(cell)):
            continue
        for j, element in enumerate(cell):
            if isinstance(element, list | tuple | dict | np.ndarray):
                return ValueError(
                    f"List column `{col}` of {source}, row {row}: expected a flat list of ids, but element {j} is "
                    f"{type(element).__name__} {element!r} (a nested list)"
                )
            kind = "integer" if isinstance(element, int | np.integer) and not isinstance(element, bool) else "text"
            if kind == "integer" and not -(2**63) <= int(element) < 2**63:
                return ValueError(
                    f"List column `{col}` of {source}, row {row}: expected integer ids that fit int64, but element "
                    f"{j} is {element}"
                )
            if isinstance(element, float | np.floating | bool):
                kind = type(element).__name__
            first_kind = first_kind or kind
            if kind != first_kind:
                return ValueError(
                    f"List column `{col}` of {source}, row {row}: expected every element to be of one type "
                    f"({first_kind}, as the first one), but element {j} is {type(element).__name__} {element!r}"
                )
    return ValueError(f"List column `{col}` of {source}: expected flat lists of integers or text, but {err}")
