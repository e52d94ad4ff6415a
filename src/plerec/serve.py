"""An HTTP JSON service over a trained model (FastAPI on uvicorn): /score, /rank, /health and /metrics.

POST /score  {"rows": [{FEATURE: value, …}, …]}
             -> {"tasks": [...], "predictions": [{TASK: p, …, "score": s, "log_score": l}, …]}
             {"columns": {FEATURE: [value, …], …}}
             -> {"tasks": [...], "columns": {TASK: [p, …], …, "score": […], "log_score": […]}}
POST /rank   {"candidates": [{…}, …], "user": {FEATURE: value, …}, "top_k": k}
             {"columns": {FEATURE: [value, …], …}, "user": {FEATURE: value, …}, "top_k": k}
             -> {"user": id or null, "items": [{"rank": 1, "index": i, ITEM: id, TASK: p, …, "score": s, …}, …]}
GET  /health -> {"status": "ok", "model": …, "tasks": […], "features": {…}, "rank": {…}, "reloads": n}
GET  /metrics -> Prometheus text: requests by path and status, latency histogram, rows scored, passes, reloads

The columnar form carries the same values as the row form, one array per field (all of one length, one
value per row); it answers the same predictions, computed from the same tensors. Both forms are checked and
encoded one whole column at a time (rows are transposed into columns first): a column whose values are all
fine costs a few C-level passes, and only a column with a problem is gone through value by value, for the
message naming its first bad row.

Every row must carry every feature column (null marks a missing value), of the JSON type its training
values had: a number for a numeric column; for a categorical column the type of its vocabulary (a string
for text categories, a number for numeric ids, a boolean); for a list column ([features.lists]) an array,
oldest element first (null: an empty list), of the type its training elements had: integers (a whole
float such as 7.0 is the integer 7, as in a file; 1.5, true or "7" are not) or strings. A list longer than
the field's max_length keeps its last max_length elements, as training did. Fields other than the features
and the [rank] group, item and length columns are rejected. A bad request gets a 4xx answer whose `error`
names the row, the field (and a list's element) and what was expected; nothing is coerced. Requests run in
the server's thread pool, each on its own rows; the model is only read. With micro-batching on
(`batch_window`), requests that arrive within the window are scored in one forward pass, each answered with
its own rows only. A reload (SIGHUP under `serve`) swaps in a new model for new requests while those in
flight finish on the old one.

What one client may take is bounded (`Limits`): the body's size (checked against Content-Length before it
is read, counted while reading a chunked one), the time to send the headers and the body, idle keep-alive
time, open connections, and /score and /rank requests in flight (/health is not counted). A token, when
set, is required on every endpoint but /health; without one the service only listens on loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from operator import itemgetter
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException

from plerec import jsonio, train
from plerec.data.lists import Elements, padded
from plerec.data.tables import EncodedTable
from plerec.data.vocab import category_key
from plerec.errors import did_you_mean
from plerec.rank import Scorer, fused_log_score, task_outputs
from plerec.serve_ops import Batcher, Metrics

TOKEN_ENV = "PLEREC_SERVE_TOKEN"
BACKENDS = ("torch", "onnx")  # what runs the forward pass
FLOAT32_MAX = float(np.finfo(np.float32).max)
SHOWN = 100  # characters of a bad value or name an error message shows at most
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """What one client may take of the service. A client past a limit gets a 4xx or 503 answer (or its
    connection closed); the others are served as before."""

    max_rows: int = 10_000  # rows in one request (413 beyond)
    max_body_bytes: int = 8 * 2**20  # request body (413 beyond, before it is parsed)
    max_header_bytes: int = 16 * 2**10  # request line and headers (h11 answers 400 beyond)
    header_timeout: float = 10.0  # seconds from a connection opening, or its last response, to a request's headers
    body_timeout: float = 10.0  # seconds from the headers to the body's last byte (408 beyond)
    keep_alive_timeout: float = 5.0  # seconds an idle connection stays open
    max_connections: int = 512  # open connections; one more is answered 503 and closed at once
    max_in_flight: int = 64  # /score and /rank requests being read or computed (503 beyond); /health is free

    def __post_init__(self) -> None:
        for field in fields(self):
            value, kind = getattr(self, field.name), type(field.default)  # int counts, float seconds
            if type(value) not in (int, kind) or not 0 < value < math.inf:
                what = "an integer" if kind is int else "a finite number"
                raise ValueError(f"Expected the limit `{field.name}` to be {what} > 0, but got {value!r}")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[dict[str, Any]]


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: list[dict[str, Any]]
    user: dict[str, Any] = Field(default_factory=dict)
    top_k: StrictInt | None = None


class ColumnsScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    columns: dict[str, list[Any]]


class ColumnsRankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    columns: dict[str, list[Any]]
    user: dict[str, Any] = Field(default_factory=dict)
    top_k: StrictInt | None = None


class RequestError(Exception):
    """A request the service cannot answer: an HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return {list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A client's value as an error message shows it: its repr (lone surrogates escaped), at most ~SHOWN characters."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer past the int-to-str digit limit; a deep nest
        return "a value too large to show"
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}… ({len(text)} characters)"


def _got(value: Any) -> str:
    """What follows "but got" in a message: the value's JSON kind and the value, as `_show` shows it."""
    return "null" if value is None else f"{_json_kind(value)} {_show(value)}"


def _name(key: Any) -> str:
    """A field name as an error message shows it: as is when it is short, valid text, else as `_show` does."""
    return key if isinstance(key, str) and len(key) <= SHOWN and _text(key) else _show(key)


def _text(value: str) -> bool:
    """Whether a JSON string is valid Unicode text: JSON's \\ud800 escapes can make lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        return False


_TYPES = {"string": (str,), "number": (int, float), "boolean": (bool,)}  # what JSON parses into


class RowReader:
    """Checks request rows against the model's columns and encodes them as the Encoder does.

    Rows and columns share one path: rows are checked, transposed into columns, and each column is encoded
    whole by the Encoder's own lookups (`Encoder.key_ids` once per distinct value, `Encoder.element_ids` for
    list fields) without the DataFrame and index building of `Encoder.transform` (which the tests check it
    matches exactly).
    """

    def __init__(self, scorer: Scorer, max_rows: int):
        encoder, rank = scorer.encoder, scorer.rank
        self.encoder = encoder
        self.max_rows = max_rows
        self.numeric = list(encoder.numeric)
        self.categorical = list(encoder.categorical)
        # The JSON types a categorical column accepts: those of its training values (any, for a hashed
        # column, which keeps no vocabulary: the encoder hashes every value's text).
        self.kinds = {
            c: {_json_kind(v) for v in encoder.vocabs.get(c, ())} or {"string", "number", "boolean"}
            for c in self.categorical
        }
        self.types = {c: tuple(t for k in sorted(self.kinds[c]) for t in _TYPES[k]) for c in self.categorical}
        for column in self.categorical:  # the encoder builds its lookups on first use: built here, before threads
            encoder.key_ids(column, [])
        self.lists = dict(encoder.lists)  # list column -> its settings (`elements`: "integer" or "text")
        for column, spec in self.lists.items():
            encoder.element_ids(column, _elements(spec, [[]]), range(1), "the model")
        self.length = rank.length
        self.ids = [c for c in (rank.group, rank.item) if c]
        features = self.categorical + self.numeric + list(self.lists)
        self.required = list(dict.fromkeys(features + ([self.length] if self.length else [])))
        self.required_set = set(self.required)
        self.means = np.array([encoder.means[c] for c in self.numeric], dtype=np.float64)[:, None]  # (D, 1)
        self.stds = np.array([encoder.stds[c] for c in self.numeric], dtype=np.float64)[:, None]  # (D, 1)
        self.list_width, self.list_dtype = encoder.list_width, encoder.list_dtype
        none = type(None)
        self.value_kinds = {c: {*self.types[c], none} for c in self.categorical}  # the JSON types each field takes
        self.value_kinds |= {c: {int, float, none} for c in self.numeric}
        self.value_kinds |= {c: {str, int, float, bool, none} for c in self.ids}
        self.value_kinds |= {self.length: {int, float}} if self.length else {}
        self.id_cache: dict[tuple[str, type], dict] = {}  # (column, value type) -> {value: id}, see `_category_ids`
        self.allowed = set(self.required) | set(self.ids)

    def check(self, rows: list[dict[str, Any]], what: str) -> None:
        if not rows:
            raise RequestError(422, f"Expected at least one row in `{what}`, but got none")
        if len(rows) > self.max_rows:
            raise RequestError(413, f"Expected at most {self.max_rows} rows in `{what}`, but got {len(rows)}")
        for i, row in enumerate(rows):
            self._check(row, f"{what}[{i}]")

    def check_fields(self, fields: dict[str, Any], where: str) -> None:
        """Names and values of some of a row's fields (the /rank `user`): what `check` asks of each."""
        for key, value in fields.items():
            self._check_name(key, where)
            self._check_value(key, value, where)

    def check_columns(
        self, columns: dict[str, list], what: str, where: Callable[[int], str], given: Collection[str] = ()
    ) -> int:
        """A columnar request's columns (`what` names them; `where(i)` names row i): known names, every field
        the model reads present (but those in `given`, the /rank user's), one length for all, each value what
        `check` asks of it. Returns the number of rows."""
        for key in columns:
            self._check_name(key, f"`{what}`")
            if key in given:
                raise RequestError(422, f"`{what}`: `{key}` is already given in `user`")
        for column in self.required:
            if column not in columns and column not in given:
                raise RequestError(
                    422,
                    f"`{what}`: missing field `{column}` (every feature must be present; null marks a missing value)",
                )
        if not columns:
            raise RequestError(422, f"Expected at least one column in `{what}`, but got none")
        first, n = next((k, len(v)) for k, v in columns.items())
        for key, values in columns.items():
            if len(values) != n:
                raise RequestError(
                    422,
                    f"`{what}`: expected every column to have one value per row, {n} as `{first}` has, but `{key}` "
                    f"has {len(values)}",
                )
        self.check_count(n, what)
        for key, values in columns.items():
            self.check_column(key, values, where)
        return n

    def check_count(self, n: int, what: str) -> None:
        if not n:
            raise RequestError(422, f"Expected at least one row in `{what}`, but got none")
        if n > self.max_rows:
            raise RequestError(413, f"Expected at most {self.max_rows} rows in `{what}`, but got {n}")

    def check_column(self, column: str, values: list, where: Callable[[int], str]) -> None:
        """One known field's values, row i named by `where(i)`: what `_check_value` asks of each, at C speed
        where every value is fine (the common case); otherwise the per-value check finds the first bad one."""
        if column in self.lists:
            for i, value in enumerate(values):
                self._check_list(column, value, where(i))
            return
        if self._column_fine(column, values):
            return
        for i, value in enumerate(values):  # the first bad value, if any (the sum may overflow from good ones)
            self._check_value(column, value, where(i))

    def _column_fine(self, column: str, values: list) -> bool:
        """Whether every value passes `_check_value` (False: some may not), without Python per value."""
        kinds = set(map(type, values))
        if not kinds <= self.value_kinds[column]:
            return False
        if str in kinds:
            if kinds - {str, type(None)}:
                return False  # text next to numbers (an id column): left to the per-value check
            return _text("".join(filter(None, values)))
        if kinds & {int, float}:
            try:  # NaN and ±Infinity make the sum so; filter(None) drops nulls (and zeros, which are finite)
                return math.isfinite(math.fsum(filter(None, values)))
            except OverflowError:  # an integer beyond float range, or finite values whose sum is not
                return False
        return True

    def encode(self, rows: list[dict[str, Any]], what: str) -> EncodedTable:
        """The checked rows as the model's inputs: what `Encoder.transform` gives for the same values."""
        return self.encode_columns(self.columns_of(rows), len(rows), lambda i: f"{what}[{i}]", f"`{what}`")

    def columns_of(self, rows: list[dict[str, Any]], given: Collection[str] = ()) -> dict[str, list]:
        """Checked rows as columns, one list per field (a C-level transpose); the fields in `given` (the /rank
        user's) are left out, the [rank] ids are None where a row has none."""
        names = [c for c in self.required if c not in given]
        if len(names) > 1:
            values = zip(*map(itemgetter(*names), rows), strict=True)  # (F, N)
        else:
            values = [[row[name] for row in rows] for name in names]  # itemgetter of one name gives no tuples
        columns = dict(zip(names, map(list, values), strict=True))
        for column in self.ids:
            if column not in given:
                columns[column] = [row.get(column) for row in rows]
        return columns

    def encode_columns(
        self, columns: dict[str, list], n: int, where: Callable[[int], str], what: str, shared: Collection[str] = ()
    ) -> EncodedTable:
        """Checked columns as the model's inputs, each a list of n values, or of one value for the columns in
        `shared` (the /rank user's fields, encoded once and broadcast to every row). `where(i)` names row i in
        a message ("user" for a shared column); `what` names the request's rows."""
        encoder = self.encoder

        def at(column: str, i: int) -> str:
            return "user" if column in shared else where(i)

        sparse = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, column in enumerate(self.categorical):
            sparse[:, j] = self._category_ids(column, columns[column])
        numeric, dense = self.numeric, np.zeros((n, len(encoder.dense_names)), dtype=np.float32)
        values = np.empty((len(numeric), n))  # (D, N) float64: checked before float32 takes it
        for j, column in enumerate(numeric):
            values[j] = columns[column]  # null: NaN (checked values are finite numbers); one value: broadcast
        missing = np.isnan(values)
        if missing.any() and encoder.missing_numeric == "error":
            j, i = (int(k) for k in np.argwhere(missing)[0])
            raise RequestError(
                422,
                f"{at(numeric[j], i)}: `{numeric[j]}` is null, but the model was trained with "
                "[data] missing_numeric = 'error'",
            )
        with np.errstate(over="ignore", invalid="ignore"):
            standard = (np.where(missing, self.means, values) - self.means) / self.stds  # (D, N)
        out = ~(np.abs(standard) <= FLOAT32_MAX)
        if out.any():
            j, i = (int(k) for k in np.argwhere(out)[0])  # the first column's first bad row, as one by one
            mean, std = self.means[j, 0], self.stds[j, 0]
            raise RequestError(
                422,
                f"{at(numeric[j], i)}: expected `{numeric[j]}` to be a number whose standardised value (x - "
                f"{mean:.6g}) / {std:.6g} is within float32's ±{FLOAT32_MAX:.3g}, but got "
                f"{_show(columns[numeric[j]][i if len(columns[numeric[j]]) > 1 else 0])}",
            )
        dense[:, : len(numeric)] = standard.T
        for k, column in enumerate(encoder.indicators):
            dense[:, len(numeric) + k] = missing[numeric.index(column)]
        lists, lengths = self._encode_lists(columns, n, at, what)
        tasks = len(encoder.tasks)
        return EncodedTable(
            sparse=torch.from_numpy(sparse),
            dense=torch.from_numpy(dense),
            labels=torch.zeros(n, tasks),
            label_mask=torch.zeros(n, tasks, dtype=torch.bool),
            lists=torch.from_numpy(lists),
            lengths=torch.from_numpy(lengths),
            source=f"the request's {what}",
        )

    def _category_ids(self, column: str, values: list) -> np.ndarray:
        """A categorical column's ids by the Encoder's own lookup of category keys (`Encoder.key_ids`: 1 + the
        vocabulary index, 0 if unseen, or 1 + the bucket of a hashed column), 0 for null or blank text.

        The ids found are kept, per column and JSON type, so that a value seen before costs one dict lookup
        (C-level, no Python per value) instead of its key's text; the vocabulary never changes under them (a
        reload builds a new reader). Values of several types are looked up with their type (true is not 1)."""
        kinds = set(map(type, values)) - {type(None)}
        typed = len(kinds) > 1
        if typed:
            keys, cache = list(zip(map(type, values), values, strict=True)), self._cache(column, tuple)
        else:
            keys, cache = values, self._cache(column, next(iter(kinds), type(None)))
        found = list(map(cache.get, keys))
        if None in found:
            missing = [k for k, f in zip(keys, found, strict=True) if f is None]
            new = list(dict.fromkeys(missing))
            plain = [k[1] for k in new] if typed else new
            present = [i for i, v in enumerate(plain) if not (v is None or (type(v) is str and not v.strip()))]
            ids = self.encoder.key_ids(column, [category_key(plain[i]) for i in present]).tolist()
            looked = dict.fromkeys(new, 0) | {new[i]: id_ for i, id_ in zip(present, ids, strict=True)}
            if len(cache) + len(looked) > 100_000:  # bounded: a client sending new values cannot grow it for ever
                cache.clear()
            cache.update(looked)
            found = [looked[k] if f is None else f for k, f in zip(keys, found, strict=True)]
        return np.array(found, dtype=np.int64)

    def _cache(self, column: str, kind: type) -> dict:
        return self.id_cache.setdefault((column, kind), {})

    def _encode_lists(
        self, columns: dict[str, list], n: int, at: Callable[[str, int], str], what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The list fields of checked columns as `Encoder.transform` gives them: (N, L) padded ids, (N, F)
        lengths. Each field's elements become one flat array with offsets, looked up by the encoder at once."""
        encoder = self.encoder
        lists = np.zeros((n, self.list_width), dtype=self.list_dtype)
        lengths = np.zeros((n, len(self.lists)), dtype=np.int16)
        start = 0
        for f, (column, spec) in enumerate(self.lists.items()):
            values = columns[column]
            elements = _elements(spec, [value or () for value in values])  # null: an empty list
            if not elements.integer:
                blank = np.flatnonzero(elements.values.to_numpy() == "")
                if len(blank):  # `_check_list` strips as Python does; Arrow may strip more
                    i = elements.row_of(int(blank[0]))
                    raise RequestError(
                        422,
                        f"{at(column, i)}: expected `{column}` element {int(blank[0] - elements.offsets[i])} to be "
                        "an id, but got blank text",
                    )
            try:
                ids = encoder.element_ids(column, elements, range(len(values)), f"the request's {what}")
            except ValueError as err:  # checked rows should never get here; a 422 rather than a 500 if they do
                raise RequestError(422, _clip(" ".join(str(err).split()), 400)) from None
            stop = start + spec["max_length"]
            lists[:, start:stop], lengths[:, f] = padded(ids, elements.offsets, spec["max_length"])  # broadcast
            start = stop
        return lists, lengths

    def lengths(self, rows: list[dict[str, Any]]) -> np.ndarray | None:
        if not self.length:
            return None
        return np.array([row[self.length] for row in rows], dtype=np.float64)

    def _check(self, row: dict[str, Any], where: str) -> None:
        for key in row:
            self._check_name(key, where)
        for column in self.required:
            if column not in row:
                raise RequestError(
                    422,
                    f"{where}: missing field `{column}` (every feature must be present; null marks a missing value)",
                )
        for key, value in row.items():
            self._check_value(key, value, where)

    def _check_name(self, key: str, where: str) -> None:
        if not _text(key):
            raise RequestError(
                422, f"{where}: expected field names to be valid Unicode text, but got {_show(key)} (a lone surrogate)"
            )
        if key not in self.allowed:
            hint = did_you_mean(key, self.allowed) if len(key) <= SHOWN else ""
            raise RequestError(
                422,
                f"{where}: unknown field `{_name(key)}`.{hint} Expected the fields {', '.join(sorted(self.allowed))}",
            )

    def _check_value(self, column: str, value: Any, where: str) -> None:
        """One value of a known field: of the JSON type the model takes there, finite, valid text."""
        if column in self.lists:
            return self._check_list(column, value, where)
        if isinstance(value, str) and not _text(value):
            raise RequestError(
                422, f"{where}: expected `{column}` to be valid Unicode text, but got {_show(value)} (a lone surrogate)"
            )
        if column in self.types:
            if value is not None and type(value) not in self.types[column]:
                expected = " or ".join(sorted(self.kinds[column]))
                raise RequestError(
                    422,
                    f"{where}: expected `{column}` to be a {expected} (the type of its training values) or null, "
                    f"but got {_got(value)}",
                )
            if type(value) in (int, float) and not _finite(value):
                raise RequestError(
                    422, f"{where}: expected `{column}` to be a finite number or null, but got {_got(value)}"
                )
        elif column == self.length:
            if type(value) not in (int, float) or not _finite(value):
                raise RequestError(
                    422,
                    f"{where}: expected the length `{column}` to be a finite number, but got {_got(value)}",
                )
        elif column in self.ids:
            if value is not None and (
                type(value) not in (str, int, float, bool) or (type(value) in (int, float) and not _finite(value))
            ):
                raise RequestError(
                    422,
                    f"{where}: expected the id `{column}` to be a string, a finite number or a boolean, but got "
                    f"{_got(value)}",
                )
        elif value is not None and (type(value) not in (int, float) or not _finite(value)):  # a numeric feature
            raise RequestError(
                422,
                f"{where}: expected `{column}` to be a finite number or null, but got {_got(value)}",
            )

    def _check_list(self, column: str, value: Any, where: str) -> None:
        """A list field's value: null, or an array of the training elements' type. The common case (every
        element of the right type) costs a few C-level passes over the array, no Python per element."""
        integer = self.lists[column]["elements"] == "integer"
        kind = "integers" if integer else "strings"
        if value is None:
            return
        if type(value) is not list:
            raise RequestError(
                422,
                f"{where}: expected `{column}` to be an array of {kind} (a list field) or null, but got {_got(value)}",
            )
        kinds = set(map(type, value))
        if integer and kinds <= {int} and (not value or (min(value) >= INT64_MIN and max(value) <= INT64_MAX)):
            return
        if not integer and kinds <= {str} and all(map(str.strip, value)) and _text("".join(value)):
            return
        for j, element in enumerate(value):  # only for a list with a problem, or with floats: find the element
            problem = _element_problem(element, integer)
            if problem:
                raise RequestError(422, f"{where}: expected `{column}` element {j} to be {problem}")


def _element_problem(element: Any, integer: bool) -> str:
    """What is wrong with one element of a list field ("" if nothing): the rest of an error message."""
    if type(element) in (list, dict):
        nested = "array" if type(element) is list else "object"
        return f"{'an integer' if integer else 'a string'}, but got a nested {nested} {_show(element)}"
    if integer:
        if type(element) is int and INT64_MIN <= element <= INT64_MAX:
            return ""
        if type(element) is float and element.is_integer() and abs(element) < 2**53:
            return ""  # a whole float is the integer, as a file's 7.0 is
        if type(element) is int:
            return f"an integer within int64, but got {_show(element)}"
        return f"an integer (the type of the training list's elements; 7.0 counts as 7), but got {_got(element)}"
    if type(element) is not str:
        return f"a string (the type of the training list's elements), but got {_got(element)}"
    if not _text(element):
        return f"valid Unicode text, but got {_show(element)} (a lone surrogate)"
    if not element.strip():
        return f"an id, but got blank text {_show(element)}"
    return ""


def _elements(spec: dict, values: list) -> Elements:
    """Checked JSON arrays (one per row) as one flat array of elements with offsets, as `read_elements` gives
    for a file's column: integers as int64 (a whole float taken as its integer), text trimmed as Arrow trims it."""
    counts = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = itertools.chain.from_iterable(values)
    if spec["elements"] == "integer":
        return Elements(np.fromiter(flat, dtype=np.int64, count=int(offsets[-1])), offsets, True)
    texts = pc.utf8_trim_whitespace(pa.array(list(flat), type=pa.string())).to_numpy(zero_copy_only=False)
    return Elements(pd.Series(texts, dtype=object), offsets, False)


try:  # a fast JSON parser and writer where installed (the `serve` extra); the standard library's otherwise
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None


def loads(body: bytes) -> Any:
    """A request body as Python values: orjson's parse where it takes the body, else the standard library's,
    which also takes NaN, Infinity, lone surrogates and integers beyond 64 bits (then refused with a 422
    naming the field, as before) and says where invalid JSON goes wrong."""
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise RequestError(
            400, f"The request body is not valid JSON (at character {err.pos}): {_clip(err.msg)}"
        ) from None
    except (UnicodeDecodeError, RecursionError, ValueError):
        raise RequestError(
            400, "The request body is not valid JSON: not UTF-8, nested too deeply, or a number of 1000s of digits"
        ) from None


def dumps(answer: dict) -> bytes:
    """An answer as JSON bytes (every number in it is finite: outputs are checked before)."""
    if orjson is not None:
        try:
            return orjson.dumps(answer)
        except TypeError:  # an echoed id beyond 64 bits
            pass
    return jsonio.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()


def _validated(model: type[BaseModel], body: Any) -> Any:
    """The body's top level checked by its pydantic model; a 422 naming the fields otherwise."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        parts = []
        for e in err.errors()[:3]:
            where = ".".join(_name(p) for p in e.get("loc", ())) or "the request body"
            parts.append(f"`{where}`: {_clip(str(e.get('msg')))}")
        raise RequestError(422, "; ".join(parts)) from None


@dataclass(slots=True)
class Job:
    """One request, checked and encoded: the rows the model scores, and how its answer is built from them."""

    served: Served
    path: str
    table: EncodedTable
    length: np.ndarray | None  # the [rank] length column, (N,)
    where: Callable[[int], str]  # names row i in a message
    answer: Callable[[np.ndarray], dict]  # outputs (N, T + 2): tasks, score, log score -> the JSON answer

    def finish(self, logits: torch.Tensor) -> dict:
        return self.answer(self.served.outputs(logits, self.length, self.where))


class Served:
    """One loaded model as the service answers with it. A reload builds a new one; a request keeps the one it
    started with to its end."""

    def __init__(self, scorer: Scorer, max_rows: int, generation: int = 0, backend: str = "torch"):
        self.scorer, self.rank, self.generation = scorer, scorer.rank, generation
        self.reader = RowReader(scorer, max_rows)
        self.names = [*scorer.task_names, "score", "log_score"]  # the columns of `outputs`
        if backend not in BACKENDS:
            raise ValueError(f"Expected backend to be one of {', '.join(BACKENDS)}, but got {backend!r}")
        scorer.model.eval()  # for good: nothing trains a served model
        self.onnx = None
        if backend == "onnx":
            from plerec.serve_onnx import OnnxForward

            self.onnx = OnnxForward(scorer, threads=torch.get_num_threads())

    def forward(self, table: EncodedTable) -> torch.Tensor:
        """The logits (N, T) of encoded rows: the model in inference mode (train.predict's batches for more rows
        than one batch), or ONNX Runtime on the exported graph (`backend="onnx"`)."""
        if self.onnx is not None:
            return self.onnx(table)
        if len(table) > self.scorer.batch_size:
            return train.predict(self.scorer.model, table, self.scorer.batch_size)
        with torch.inference_mode():  # eval mode is set once, at load: walking the modules costs ~0.5 ms
            return self.scorer.model(*table.batch(slice(0, len(table))).inputs)

    def job(self, path: str, body: Any) -> Job:
        if not isinstance(body, dict):  # pydantic says so, naming the model
            return self._score(_validated(ScoreRequest, body)) if path == "/score" else self._rank(body)
        if path == "/score":
            if "columns" in body:
                return self._score_columns(_validated(ColumnsScoreRequest, body))
            return self._score(_validated(ScoreRequest, body))
        return self._rank(body)

    def outputs(self, logits: torch.Tensor, length: np.ndarray | None, where: Callable[[int], str]) -> np.ndarray:
        """(N, T + 2) float64: each task's probability or value, the fused score and its log (Eq. 1)."""
        scorer = self.scorer
        try:
            log_score = fused_log_score(logits, scorer.tasks, scorer.rank, length)
        except ValueError as err:  # e.g. a regression value Eq. 1 cannot take the log of
            raise RequestError(422, _clip(" ".join(str(err).split()), 400)) from None
        with np.errstate(over="ignore"):
            out = np.column_stack([task_outputs(logits, scorer.tasks), np.exp(log_score), log_score])
        bad = ~np.isfinite(out)
        if bad.any():
            i, j = (int(k) for k in np.argwhere(bad)[0])
            raise RequestError(
                422,
                f"{where(i)}: expected the model's `{self.names[j]}` to be a finite number, but it is "
                f"{float(out[i, j])!r}: the row's values are beyond what the model can score",
            )
        return out

    def _score(self, body: ScoreRequest) -> Job:
        rows = body.rows
        columns = self._row_columns(rows, "rows", {}, lambda: self.reader.check(rows, "rows"))
        return self._job("/score", columns, len(rows), lambda i: f"rows[{i}]", "`rows`", (), self._predictions)

    def _score_columns(self, body: ColumnsScoreRequest) -> Job:
        where = _row_in("columns")
        n = self.reader.check_columns(body.columns, "columns", where)
        return self._job("/score", body.columns, n, where, "`columns`", (), self._prediction_columns)

    def _predictions(self, out: np.ndarray) -> dict:
        names = self.names
        return {
            "tasks": self.scorer.task_names,
            "predictions": [dict(zip(names, row, strict=True)) for row in out.tolist()],
        }

    def _prediction_columns(self, out: np.ndarray) -> dict:
        return {"tasks": self.scorer.task_names, "columns": dict(zip(self.names, out.T.tolist(), strict=True))}

    def _rank(self, body: Any) -> Job:
        reader, rank = self.reader, self.rank
        columnar = isinstance(body, dict) and "columns" in body
        request = _validated(ColumnsRankRequest if columnar else RankRequest, body)
        if columnar:
            what, where = "columns", _row_in("columns")
        else:
            what, where = "candidates", (lambda i: f"candidates[{i}]")
            reader.check_count(len(request.candidates), "candidates")
        if request.top_k is not None and request.top_k < 1:
            raise RequestError(422, f"Expected `top_k` >= 1, but got {_show(request.top_k)}")
        top_k = rank.top_k if request.top_k is None else request.top_k
        user = request.user
        reader.check_fields(user, "user")
        if columnar:
            n = reader.check_columns(request.columns, "columns", where, given=user.keys())
            columns = dict(request.columns)
        else:
            candidates = request.candidates
            n = len(candidates)
            columns = self._row_columns(candidates, "candidates", user, lambda: self._check_merged(user, candidates))
        shared = {key: [value] for key, value in user.items()}  # given once, broadcast to every candidate
        columns.update(shared)
        if rank.item:
            items = columns.get(rank.item, [None])
            missing = next((i for i, item in enumerate(items) if item is None), None)
            if missing is not None:
                at = "user" if rank.item in shared else where(missing)
                raise RequestError(422, f"{at}: missing the item id `{rank.item}`")
        group = None
        if rank.group:
            users = set(columns.get(rank.group, [None]))  # hashable: the checks took scalars only
            if len(users) > 1:
                raise RequestError(
                    422, f"Expected the candidates of one user, but `{rank.group}` takes {len(users)} values"
                )
            group = users.pop()

        def answer(out: np.ndarray) -> dict:
            # One user: `rank_within_groups`'s order for one group, best log score first, ties in input order.
            order = np.argsort(-out[:, -1], kind="stable")
            keep = (order if not top_k else order[:top_k]).tolist()
            ids = columns[rank.item] if rank.item else []
            items = []
            for position, (i, values) in enumerate(zip(keep, out[keep].tolist(), strict=True), start=1):
                item = {"rank": position, "index": i}
                if rank.item:
                    item[rank.item] = ids[i] if len(ids) == n else ids[0]
                item.update(zip(self.names, values, strict=True))
                items.append(item)
            return {"user": group, "items": items}

        return self._job("/rank", columns, n, where, f"`{what}`", shared, answer)

    def _check_merged(self, user: dict, candidates: list[dict]) -> None:
        """The row-by-row checks of /rank candidates with the user's fields merged in: they name the first bad
        candidate (run when the column checks found a problem)."""
        rows = []
        for i, candidate in enumerate(candidates):
            repeated = sorted(set(candidate) & set(user))
            if repeated:
                raise RequestError(422, f"candidates[{i}]: repeats {_show(repeated)}, already given in `user`")
            rows.append({**user, **candidate})
        self.reader.check(rows, "candidates")

    def _row_columns(self, rows: list[dict], what: str, given: dict, check_rows: Callable[[], None]) -> dict:
        """Request rows as checked columns (the fields in `given` left out). The column checks run at C speed
        where every value is fine; where one is not, `check_rows` names the first bad row as the row-by-row
        checks always have."""
        reader = self.reader
        reader.check_count(len(rows), what)
        required, allowed = reader.required_set - given.keys(), reader.allowed - given.keys()
        try:
            if not all(required <= row.keys() <= allowed for row in rows):
                raise RequestError(422, f"Expected the rows of `{what}` to have the fields {sorted(required)}")
            columns = reader.columns_of(rows, given)
            for key, values in columns.items():
                reader.check_column(key, values, lambda i: f"{what}[{i}]")
        except RequestError:
            check_rows()  # raises the row-by-row message
            raise
        return columns

    def _job(
        self,
        path: str,
        columns: dict,
        n: int,
        where: Callable[[int], str],
        what: str,
        shared: Collection[str],
        answer: Callable[[np.ndarray], dict],
    ) -> Job:
        table = self.reader.encode_columns(columns, n, where, what, shared)
        length = None
        if self.rank.length:
            length = np.array(columns[self.rank.length], dtype=np.float64)
            length = np.repeat(length, n) if len(length) != n else length  # a length given once, in `user`
        return Job(self, path, table, length, where, answer)


def _row_in(what: str) -> Callable[[int], str]:
    return lambda i: f"`{what}` row {i}"


class Model:
    """The model a service answers with, replaced whole by `reload` (requests in flight keep theirs)."""

    def __init__(self, scorer: Scorer, max_rows: int, load: Callable[[], Scorer] | None = None, backend: str = "torch"):
        self.max_rows, self.load, self.backend = max_rows, load, backend
        self.current = Served(scorer, max_rows, backend=backend)
        self.lock = threading.Lock()  # one reload at a time

    def reload(self) -> Served:
        """Load the checkpoint again (`load()`), then answer every new request with it. A failed load leaves
        the current model serving and raises."""
        if self.load is None:
            raise ValueError("Expected a loader to reload the model with, but the service was started without one")
        with self.lock:
            served = Served(self.load(), self.max_rows, self.current.generation + 1, self.backend)
            self.current = served
            return served


def check_batching(batch_window: float, max_batch_rows: int) -> None:
    if not (type(batch_window) in (int, float) and 0 <= batch_window <= 1):
        raise ValueError(f"Expected batch_window in [0, 1] seconds, but got {batch_window!r}")
    if type(max_batch_rows) is not int or max_batch_rows < 1:
        raise ValueError(f"Expected max_batch_rows to be an integer >= 1, but got {max_batch_rows!r}")


def create_app(
    scorer: Scorer,
    limits: Limits | None = None,
    *,
    token: str | None = None,
    docs: bool = False,
    load: Callable[[], Scorer] | None = None,
    batch_window: float = 0.0,
    max_batch_rows: int = 4096,
    backend: str = "torch",
) -> FastAPI:
    """The service over one scorer. `token`: required as `Authorization: Bearer TOKEN` on every endpoint but
    /health. `docs`: serve the OpenAPI schema at /openapi.json (no HTML pages, which would load scripts from a
    CDN). `load`: what `app.state.model.reload()` calls for a new scorer (SIGHUP under `serve`).
    `batch_window` > 0 (seconds): requests arriving within it are scored in one forward pass (up to about
    `max_batch_rows` rows); 0 scores each request on its own, in the thread pool. `backend`: "torch" (eager),
    or "onnx" (ONNX Runtime on the model exported at start, as `plerec export` does)."""
    limits = limits or Limits()
    if token is not None:
        check_token(token, "the token")
    check_batching(batch_window, max_batch_rows)
    model = Model(scorer, limits.max_rows, load, backend)
    metrics = Metrics()
    batcher = Batcher(batch_window, max_batch_rows, metrics) if batch_window > 0 else None
    app = FastAPI(
        title="plerec",
        description="Multi-task ranking: per-task predictions and the fused score of Eq. 1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.model, app.state.metrics = model, metrics

    @app.exception_handler(HTTPException)
    def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": _clip(str(err.detail))}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": _internal(err)}, status_code=500)

    def whole(served: Served, path: str, body: bytes) -> bytes:
        """A request from its body to its answer's bytes, in one thread: parse, check, encode, score."""
        job = served.job(path, loads(body))
        logits = served.forward(job.table)
        metrics.forward(1)
        answer = dumps(job.finish(logits))
        metrics.scored(path, len(job.table))
        return answer

    async def answer(path: str, body: bytes) -> bytes:
        """A POST to /score or /rank, body to answer bytes (`Guard` calls it, in front of the routes)."""
        served = model.current
        if batcher is None:
            content = await anyio.to_thread.run_sync(whole, served, path, body)
        else:
            batcher.arriving += 1
            try:
                job = await anyio.to_thread.run_sync(lambda: served.job(path, loads(body)))
            finally:
                batcher.arriving -= 1
            logits = await batcher.logits(served, served.forward, job.table)
            content = dumps(job.finish(logits))
            metrics.scored(path, len(job.table))
        return content

    @app.get("/health")
    def health() -> dict:
        served = model.current
        scorer, reader, rank = served.scorer, served.reader, served.rank
        return {
            "status": "ok",
            "model": scorer.model_name,
            "tasks": [{"name": t.name, "kind": t.kind, "rank_weight": t.rank_weight} for t in scorer.tasks],
            "features": {"categorical": reader.categorical, "numeric": reader.numeric}
            | ({"lists": {c: _list_health(s) for c, s in reader.lists.items()}} if reader.lists else {}),
            "rank": {"group": rank.group, "item": rank.item, "length": rank.length, "top_k": rank.top_k},
            "reloads": served.generation,
        }

    # POST /score and /rank are answered by `Guard` (`answer`) before any route is looked up: these two routes
    # only describe them in the OpenAPI schema (and make other methods a 405).
    @app.post("/score")
    def score() -> None:
        """{"rows": [{FEATURE: value, …}, …]} or {"columns": {FEATURE: [value, …], …}}"""
        raise RuntimeError("POST /score is answered by the Guard middleware, never by this route")

    @app.post("/rank")
    def rank_items() -> None:
        """{"user": {…}, "candidates": [{…}, …], "top_k": k} or {"user": {…}, "columns": {FEATURE: […]}, "top_k": k}"""
        raise RuntimeError("POST /rank is answered by the Guard middleware, never by this route")

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        served = model.current
        info = {"model": served.scorer.model_name, "reloads": str(served.generation), "pid": str(os.getpid())}
        text = metrics.text(info)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # In front of every route: the token and limits; a POST to /score or /rank is answered there too, by
    # `answer`, without FastAPI's routing and Request/Response objects (measured: p50 4.86 -> 4.31 ms, 100 rows).
    app.add_middleware(Guard, limits=limits, token=token, metrics=metrics, answer=answer)
    return app


def _list_health(spec: dict) -> dict:
    return {k: spec[k] for k in ("elements", "max_length", "pooling", "share")}


def _clip(text: str, limit: int = 2 * SHOWN) -> str:
    """A message that may quote a client's input: at most `limit` characters, lone surrogates escaped."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


class Guard:
    """ASGI middleware in front of the app: the token, the in-flight cap and the body's size and time limits.

    The body is read here, whole, before the app sees the request (FastAPI would read it whole too): a
    declared Content-Length over the limit is refused before a byte is read, a chunked body as soon as
    it passes the limit, a body that takes longer than `body_timeout` is cut off with a 408. Refusals close
    the connection: the rest of the body is never read."""

    def __init__(
        self,
        app: Callable,
        limits: Limits,
        token: str | None,
        metrics: Metrics | None = None,
        answer: Callable[[str, bytes], Any] | None = None,
    ):
        self.app, self.limits, self.metrics, self.answer = app, limits, metrics, answer
        self.expected = token.encode() if token is not None else None
        self.in_flight = 0  # /score and /rank requests past the cap check; one event loop, so a plain int

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.metrics is None:
            return await self._guard(scope, receive, send)
        start, status = time.perf_counter(), 0

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guard(scope, receive, sending)
        finally:
            if status:  # 0: the client went away before an answer
                self.metrics.observe(scope["path"], status, time.perf_counter() - start)

    async def _guard(self, scope: dict, receive: Callable, send: Callable) -> None:
        free = scope["path"] in ("/health", "/metrics")  # never refused as busy (/metrics still needs the token)
        headers = dict(scope["headers"])  # h11 lowercases names; a repeated header keeps its last value
        if (
            self.expected is not None
            and scope["path"] != "/health"
            and not self._authorised(headers.get(b"authorization", b""))
        ):
            message = "Expected `Authorization: Bearer TOKEN` with the service's token, but got none or another"
            return await _refuse(send, 401, message, [(b"www-authenticate", b"Bearer")])
        if not free and self.in_flight >= self.limits.max_in_flight:
            message = f"The service is busy: {self.in_flight} requests in flight (at most {self.limits.max_in_flight})"
            return await _refuse(send, 503, message, [(b"retry-after", b"1")])
        self.in_flight += 0 if free else 1
        if self.metrics is not None:
            self.metrics.in_flight = self.in_flight
        try:
            await self._serve(scope, receive, send, headers)
        finally:
            self.in_flight -= 0 if free else 1
            if self.metrics is not None:
                self.metrics.in_flight = self.in_flight

    async def _serve(self, scope: dict, receive: Callable, send: Callable, headers: dict) -> None:
        most = self.limits.max_body_bytes
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > most:
            return await _refuse(send, 413, f"Expected a request body of at most {most} bytes, but got {int(declared)}")
        chunks, size, late = [], 0, True
        with anyio.move_on_after(self.limits.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > most:
                    break
                chunks.append(chunk)
                if not message.get("more_body", False):
                    late = False
                    break
        if size > most:
            return await _refuse(send, 413, f"Expected a request body of at most {most} bytes, but got more")
        if late:
            return await _refuse(
                send, 408, f"Expected the request body within {self.limits.body_timeout:g} s, but it took longer"
            )
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, when the client goes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if self.answer is not None and scope["method"] == "POST" and scope["path"] in SCORING:
            return await self._answered(scope["path"], body, send)
        await self.app(scope, replay, send)

    async def _answered(self, path: str, body: bytes, send: Callable) -> None:
        """A POST to /score or /rank answered here, without the app's routing: `answer(path, body)` gives the
        answer's bytes; its RequestError is the client's (the status it names), anything else a 500. The same
        answers the app's routes would give (they stay, for the OpenAPI schema and other methods)."""
        try:
            status, content = 200, await self.answer(path, body)
        except RequestError as err:
            status, content = err.status, _error_body(err.message)
        except Exception as err:
            status, content = 500, _error_body(_internal(err))
        await _send_json(send, status, content)

    def _authorised(self, value: bytes) -> bool:
        scheme, _, given = value.strip().partition(b" ")
        # compare_digest takes time independent of where the tokens differ (their lengths may show).
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected)


SCORING = ("/score", "/rank")  # the paths the middleware answers itself (POST)


def _error_body(message: str) -> bytes:
    return jsonio.dumps({"error": message}, ensure_ascii=False, separators=(",", ":")).encode()


def _internal(err: Exception) -> str:
    return f"Internal error: {type(err).__name__}: {_clip(str(err))}"


async def _send_json(send: Callable, status: int, body: bytes, headers: list | None = None) -> None:
    start = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send: Callable, status: int, message: str, headers: list | None = None) -> None:
    body = jsonio.dumps({"error": message}).encode()
    await _send_json(send, status, body, [(b"connection", b"close"), *(headers or [])])


_BUSY = jsonio.dumps({"error": "The service is busy: too many open connections"}).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


def _protocol(limits: Limits) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a cap on open connections and a deadline for each request's headers:
    uvicorn has only the keep-alive timeout, which a client that sends a header byte now and then never
    meets, holding a connection (and a file handle) for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(_BUSY_RESPONSE)
                transport.close()
                return
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._between_requests():
                self._stop_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._between_requests():
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _await_headers(self) -> None:
            self._stop_timer()
            self.header_timer = self.loop.call_later(limits.header_timeout, self._headers_late)

        def _stop_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_late(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing() and self._between_requests():
                self.transport.close()

    return Protocol


def check_token(token: str, source: str) -> str:
    """The token, if it can be one: 16 or more visible ASCII characters (it travels in a header)."""
    if len(token) < 16 or not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"Expected {source} to be at least 16 visible ASCII characters (no spaces), but got {len(token)} "
            "characters" + ("" if len(token) < 16 else " with others among them")
        )
    return token


def read_token(path: str | Path | None = None, environ: dict | None = None) -> str | None:
    """The bearer token from `path` (surrounding whitespace dropped), else from $PLEREC_SERVE_TOKEN, else None."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"Cannot read the token file {path}: {getattr(err, 'strerror', None) or err}") from None
        return check_token(text.strip(), f"the token in {path}")
    value = (os.environ if environ is None else environ).get(TOKEN_ENV)
    return check_token(value.strip(), f"${TOKEN_ENV}") if value else None


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token: anyone who can reach the port could use the model."""
    if token is not None:
        return
    try:
        address = _address(host, 0)[4][0]
    except OSError:
        return  # `bind` says why the host does not resolve
    if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
        raise ValueError(
            f"Refusing to serve on {host} ({address}), beyond loopback, without a token: set --token-file or "
            f"${TOKEN_ENV}, or bind to 127.0.0.1"
        )


def _address(host: str, port: int) -> tuple:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 takes a free one (read it back with getsockname)."""
    family, kind, proto, _, address = _address(host, port)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"Cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(1024)
    return sock


def make_server(app: Callable, limits: Limits | None = None):
    """A uvicorn server for `app` under `limits` (run it with `.run(sockets=[bind(...)])`; `.should_exit = True`
    stops it)."""
    import uvicorn

    limits = limits or Limits()
    _check_open_files(limits.max_connections)
    config = uvicorn.Config(
        app,
        http=_protocol(limits),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # call_later takes a float
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
    return uvicorn.Server(config)


def _check_open_files(max_connections: int, spare: int = 64) -> None:
    """Each connection takes a file handle; past the process's limit, accept fails and /health goes silent."""
    try:
        import resource
    except ImportError:  # not on this platform: nothing to check
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections + spare > soft:
        raise ValueError(
            f"Expected max_connections <= {soft - spare} (the open-file limit, ulimit -n = {soft}, less {spare} "
            f"spare), but got {max_connections}"
        )


def serve(
    scorer: Scorer,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    limits: Limits | None = None,
    token: str | None = None,
    docs: bool = False,
    threads: int = 0,
    workers: int = 1,
    load: Callable[[], Scorer] | None = None,
    batch_window: float = 0.0,
    max_batch_rows: int = 4096,
    backend: str = "torch",
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, which stop taking connections and finish the requests in flight.

    `load` (a picklable callable giving a Scorer, e.g. `functools.partial(Scorer.from_checkpoint, path, exp)`)
    makes SIGHUP reload the model: the new checkpoint is loaded beside the old, then answers every new request
    while the requests in flight finish on the old; a failed load keeps the old model and is logged.
    `workers` > 1 runs that many processes on one listening socket, each loading its own model with `load`
    (required then) and sharing nothing else; SIGHUP, SIGINT and SIGTERM reach them all. They are spawned
    (fresh interpreters), so a script that calls this must do so under `if __name__ == "__main__":`. `threads`: torch
    threads per process (0: torch's default with one worker, the cores shared out between several).
    `batch_window`, `max_batch_rows`: micro-batching within each process (see `create_app`)."""
    if type(threads) is not int or threads < 0:
        raise ValueError(f"Expected threads >= 0, but got {threads!r}")
    if type(workers) is not int or not 1 <= workers <= 256:
        raise ValueError(f"Expected workers in [1, 256], but got {workers!r}")
    if workers > 1 and load is None:
        raise ValueError("Expected a loader (`load`) with workers > 1: each worker loads the checkpoint itself")
    if backend not in BACKENDS:
        raise ValueError(f"Expected backend to be one of {', '.join(BACKENDS)}, but got {backend!r}")
    check_exposure(host, token)
    limits = limits or Limits()
    check_batching(batch_window, max_batch_rows)
    options = {"limits": limits, "token": token, "docs": docs, "backend": backend}
    options |= {"batch_window": batch_window, "max_batch_rows": max_batch_rows}
    sock = bind(host, port)
    if workers == 1:
        if on_ready is not None:
            on_ready(*sock.getsockname()[:2])
        return _serve_on(sock, scorer, load, threads, options)
    from plerec.serve_workers import run_workers

    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    run_workers(
        _worker, (sock, load, threads, options), workers, lambda: on_ready and on_ready(*sock.getsockname()[:2])
    )


def _worker(sock: socket.socket, load: Callable[[], Scorer], threads: int, options: dict) -> None:
    """One worker process: its own model from the checkpoint, served on the shared socket. A SIGHUP while
    it loads is kept, and reloads once it serves."""
    import signal

    pending: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: pending.append(signum))
    _serve_on(sock, load(), load, threads, options, pending)


def _serve_on(
    sock: socket.socket,
    scorer: Scorer,
    load: Callable[[], Scorer] | None,
    threads: int,
    options: dict,
    pending: list | None = None,
) -> None:
    import logging
    import signal

    if threads:
        torch.set_num_threads(threads)
    app = create_app(scorer, load=load, **options)
    server = make_server(app, options["limits"])
    log = logging.getLogger("plerec.serve")

    def reload() -> None:
        try:
            served = app.state.model.reload()
        except Exception as err:  # the old model keeps serving
            app.state.metrics.reloaded(False)
            log.error("reload failed, the current model keeps serving: %s: %s", type(err).__name__, err)
        else:
            app.state.metrics.reloaded(True)
            log.warning("reloaded the model (reload %d)", served.generation)

    if load is not None and hasattr(signal, "SIGHUP"):
        # The handler only starts the load: it runs between two bytecodes of the event loop's thread.
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=reload, daemon=True).start())
        if pending:
            threading.Thread(target=reload, daemon=True).start()
    server.run(sockets=[sock])
