"""An HTTP JSON service over a trained model (FastAPI on uvicorn): /score, /rank and /health.

POST /score  {"rows": [{FEATURE: value, …}, …]}
             -> {"tasks": [...], "predictions": [{TASK: p, …, "score": s, "log_score": l}, …]}
POST /rank   {"candidates": [{…}, …], "user": {FEATURE: value, …}, "top_k": k}
             -> {"user": id or null, "items": [{"rank": 1, "index": i, ITEM: id, TASK: p, …, "score": s, …}, …]}
GET  /health -> {"status": "ok", "model": …, "tasks": […], "features": {…}, "rank": {…}}

Every row must carry every feature column (null marks a missing value), of the JSON type its training
values had: a number for a numeric column; for a categorical column the type of its vocabulary (a string
for text categories, a number for numeric ids, a boolean); for a list column ([features.lists]) an array,
oldest element first (null: an empty list), of the type its training elements had: integers (a whole
float such as 7.0 is the integer 7, as in a file; 1.5, true or "7" are not) or strings. A list longer than
the field's max_length keeps its last max_length elements, as training did. Fields other than the features
and the [rank] group, item and length columns are rejected. A bad request gets a 4xx answer whose `error`
names the row, the field (and a list's element) and what was expected; nothing is coerced. Requests run in
the server's thread pool, each on its own rows; the model is only read.

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
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException

from plerec import jsonio
from plerec.data.lists import Elements, padded
from plerec.data.tables import EncodedTable
from plerec.data.vocab import category_key
from plerec.errors import did_you_mean
from plerec.rank import Scorer, rank_within_groups

TOKEN_ENV = "PLEREC_SERVE_TOKEN"
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

    Vocabulary lookups are dicts built once, so a request costs a dict lookup per value instead of the
    DataFrame and index building of `Encoder.transform` (which the tests check it matches exactly).
    """

    def __init__(self, scorer: Scorer, max_rows: int):
        encoder, rank = scorer.encoder, scorer.rank
        self.encoder = encoder
        self.max_rows = max_rows
        self.numeric = list(encoder.numeric)
        self.categorical = list(encoder.categorical)
        self.hashed = {c for c in self.categorical if c in encoder.hash_buckets}
        # The JSON types a categorical column accepts: those of its training values (any, for a hashed
        # column, which keeps no vocabulary: the encoder hashes every value's text).
        self.kinds = {
            c: {_json_kind(v) for v in encoder.vocabs.get(c, ())} or {"string", "number", "boolean"}
            for c in self.categorical
        }
        self.types = {c: tuple(t for k in sorted(self.kinds[c]) for t in _TYPES[k]) for c in self.categorical}
        # Where a column holds booleans next to numbers, keys say which is which: Python's True == 1, and
        # true must not find the id of 1 (the Encoder keeps them apart).
        self.tagged = {c: "boolean" in self.kinds[c] and len(self.kinds[c]) > 1 for c in self.categorical}
        self.ids_of = {
            c: {((type(v) is bool, v) if self.tagged[c] else v): i + 1 for i, v in enumerate(encoder.vocabs[c])}
            for c in self.categorical
            if c not in self.hashed
        }
        self.lists = dict(encoder.lists)  # list column -> its settings (`elements`: "integer" or "text")
        for column, spec in self.lists.items():
            # The encoder builds its lookups on first use: built here, before threads share them.
            encoder.element_ids(column, _elements(spec, [[]]), range(1), "the model")
        self.length = rank.length
        self.ids = [c for c in (rank.group, rank.item) if c]
        features = self.categorical + self.numeric + list(self.lists)
        self.required = list(dict.fromkeys(features + ([self.length] if self.length else [])))
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

    def encode(self, rows: list[dict[str, Any]], what: str) -> EncodedTable:
        """The checked rows as the model's inputs: what `Encoder.transform` gives for the same values."""
        n, encoder = len(rows), self.encoder
        sparse = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, column in enumerate(self.categorical):
            if column in self.hashed:
                sparse[:, j] = self._hashed_ids(column, [row[column] for row in rows])
                continue
            ids = self.ids_of[column]
            if self.tagged[column]:
                sparse[:, j] = [ids.get((type(row[column]) is bool, row[column]), 0) for row in rows]
            else:
                sparse[:, j] = [ids.get(row[column], 0) for row in rows]
        dense = np.zeros((n, len(encoder.dense_names)), dtype=np.float32)
        for j, column in enumerate(self.numeric):
            values = np.array([np.nan if row[column] is None else row[column] for row in rows], dtype=np.float64)
            missing = np.isnan(values)
            if missing.any() and encoder.missing_numeric == "error":
                raise RequestError(
                    422,
                    f"{what}[{int(missing.argmax())}]: `{column}` is null, but the model was trained with "
                    "[data] missing_numeric = 'error'",
                )
            mean, std = encoder.means[column], encoder.stds[column]
            with np.errstate(over="ignore", invalid="ignore"):
                standard = (np.where(missing, mean, values) - mean) / std  # float64: checked before float32 takes it
            out = ~(np.abs(standard) <= FLOAT32_MAX)
            if out.any():
                i = int(out.argmax())
                raise RequestError(
                    422,
                    f"{what}[{i}]: expected `{column}` to be a number whose standardised value (x - {mean:.6g}) / "
                    f"{std:.6g} is within float32's ±{FLOAT32_MAX:.3g}, but got {_show(rows[i][column])}",
                )
            dense[:, j] = standard
            if column in encoder.indicators:
                dense[:, len(self.numeric) + encoder.indicators.index(column)] = missing
        lists, lengths = self._encode_lists(rows, what)
        tasks = len(encoder.tasks)
        return EncodedTable(
            sparse=torch.from_numpy(sparse),
            dense=torch.from_numpy(dense),
            labels=torch.zeros(n, tasks),
            label_mask=torch.zeros(n, tasks, dtype=torch.bool),
            lists=torch.from_numpy(lists),
            lengths=torch.from_numpy(lengths),
            source=f"the request's `{what}`",
        )

    def _hashed_ids(self, column: str, values: list) -> list[int]:
        """A hashed column's ids by the Encoder's own lookup of category keys (1 + the bucket of the value's
        text), 0 for null or blank text; one key per distinct value (true and 1 kept apart)."""
        distinct: dict[tuple[bool, Any], Any] = {}
        for value in values:
            distinct.setdefault((type(value) is bool, value), value)
        present = [k for k, v in distinct.items() if not (v is None or (type(v) is str and not v.strip()))]
        found = self.encoder.key_ids(column, [category_key(distinct[k]) for k in present]).tolist()
        ids = dict(zip(present, found, strict=True))
        return [ids.get((type(value) is bool, value), 0) for value in values]

    def _encode_lists(self, rows: list[dict[str, Any]], what: str) -> tuple[np.ndarray, np.ndarray]:
        """The list fields of checked rows as `Encoder.transform` gives them: (N, L) padded ids, (N, F) lengths.
        Each field's elements become one flat array with offsets, looked up by the encoder at once."""
        n, encoder = len(rows), self.encoder
        lists = np.zeros((n, encoder.list_width), dtype=encoder.list_dtype)
        lengths = np.zeros((n, len(self.lists)), dtype=np.int16)
        start = 0
        for f, (column, spec) in enumerate(self.lists.items()):
            elements = _elements(spec, [row[column] or () for row in rows])  # null: an empty list
            if not elements.integer:
                blank = np.flatnonzero(elements.values.to_numpy() == "")
                if len(blank):  # `_check_list` strips as Python does; Arrow may strip more
                    i = elements.row_of(int(blank[0]))
                    raise RequestError(
                        422,
                        f"{what}[{i}]: expected `{column}` element {int(blank[0] - elements.offsets[i])} to be an "
                        "id, but got blank text",
                    )
            try:
                ids = encoder.element_ids(column, elements, range(n), f"the request's `{what}`")
            except ValueError as err:  # checked rows should never get here; a 422 rather than a 500 if they do
                raise RequestError(422, _clip(" ".join(str(err).split()), 400)) from None
            stop = start + spec["max_length"]
            lists[:, start:stop], lengths[:, f] = padded(ids, elements.offsets, spec["max_length"])
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


def create_app(
    scorer: Scorer, limits: Limits | None = None, *, token: str | None = None, docs: bool = False
) -> FastAPI:
    """The service over one scorer. Handlers are plain functions: FastAPI runs them in its thread pool.
    `token`: required as `Authorization: Bearer TOKEN` on every endpoint but /health. `docs`: serve the
    OpenAPI schema at /openapi.json (no HTML pages, which would load scripts from a CDN)."""
    limits = limits or Limits()
    if token is not None:
        check_token(token, "the token")
    reader = RowReader(scorer, limits.max_rows)
    rank = scorer.rank
    app = FastAPI(
        title="plerec",
        description="Multi-task ranking: per-task predictions and the fused score of Eq. 1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(Guard, limits=limits, token=token)

    @app.exception_handler(RequestError)
    def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, err: HTTPException) -> JSONResponse:
        detail = err.detail
        if err.status_code == 400:  # FastAPI's answer to a body json.loads fails on other than by syntax
            detail = "The request body is not valid JSON: not UTF-8, nested too deeply, or a number of 1000s of digits"
        return JSONResponse({"error": _clip(str(detail))}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                detail = _clip(str(e.get("ctx", {}).get("error", "")))
                at = e.get("loc", ("body", "?"))[-1]
                return JSONResponse({"error": f"The request body is not valid JSON (at character {at}): {detail}"}, 400)
        parts = []
        for e in errors[:3]:
            where = ".".join(_name(p) for p in e.get("loc", ())[1:]) or "the request body"
            parts.append(f"`{where}`: {_clip(str(e.get('msg')))}")
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)

    @app.exception_handler(Exception)
    def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": f"Internal error: {type(err).__name__}: {_clip(str(err))}"}, status_code=500)

    def scored(rows: list[dict[str, Any]], what: str) -> pd.DataFrame:
        reader.check(rows, what)
        try:
            out = scorer.score_table(reader.encode(rows, what), reader.lengths(rows))
        except ValueError as err:  # e.g. a regression value Eq. 1 cannot take the log of
            raise RequestError(422, _clip(" ".join(str(err).split()), 400)) from None
        with np.errstate(over="ignore"):
            bad = ~np.isfinite(out.to_numpy(dtype=np.float64))  # (N, T + 2): every prediction, score, log score
        if bad.any():
            i, j = (int(k) for k in np.argwhere(bad)[0])
            raise RequestError(
                422,
                f"{what}[{i}]: expected the model's `{out.columns[j]}` to be a finite number, but it is "
                f"{float(out.iat[i, j])!r}: the row's values are beyond what the model can score",
            )
        return out

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": scorer.model_name,
            "tasks": [{"name": t.name, "kind": t.kind, "rank_weight": t.rank_weight} for t in scorer.tasks],
            "features": {"categorical": reader.categorical, "numeric": reader.numeric}
            | ({"lists": {c: _list_health(s) for c, s in reader.lists.items()}} if reader.lists else {}),
            "rank": {"group": rank.group, "item": rank.item, "length": rank.length, "top_k": rank.top_k},
        }

    @app.post("/score")
    def score(body: ScoreRequest) -> dict:
        out = scored(body.rows, "rows")
        return {"tasks": scorer.task_names, "predictions": out.to_dict(orient="records")}

    @app.post("/rank")
    def rank_items(body: RankRequest) -> dict:
        if not body.candidates:
            raise RequestError(422, "Expected at least one row in `candidates`, but got none")
        if len(body.candidates) > reader.max_rows:
            raise RequestError(
                413, f"Expected at most {reader.max_rows} rows in `candidates`, but got {len(body.candidates)}"
            )
        if body.top_k is not None and body.top_k < 1:
            raise RequestError(422, f"Expected `top_k` >= 1, but got {_show(body.top_k)}")
        top_k = rank.top_k if body.top_k is None else body.top_k
        reader.check_fields(body.user, "user")
        rows = []
        for i, candidate in enumerate(body.candidates):
            repeated = sorted(set(candidate) & set(body.user))
            if repeated:
                raise RequestError(422, f"candidates[{i}]: repeats {_show(repeated)}, already given in `user`")
            rows.append({**body.user, **candidate})
        reader.check(rows, "candidates")
        if rank.item:
            for i, row in enumerate(rows):
                if row.get(rank.item) is None:
                    raise RequestError(422, f"candidates[{i}]: missing the item id `{rank.item}`")
        user = None
        if rank.group:
            users = {row.get(rank.group) for row in rows}  # hashable: `check` took scalars only
            if len(users) > 1:
                raise RequestError(
                    422, f"Expected the candidates of one user, but `{rank.group}` takes {len(users)} values"
                )
            user = users.pop()
        out = scored(rows, "candidates")
        order, ranks = rank_within_groups(np.zeros(len(rows), dtype=np.int64), out["log_score"].to_numpy())
        keep = order if not top_k else order[:top_k]
        predictions = out.to_dict(orient="records")
        items = []
        for position, i in enumerate(keep):
            item = {"rank": int(ranks[position]), "index": int(i)}
            if rank.item:
                item[rank.item] = rows[i][rank.item]
            items.append(item | predictions[i])
        return {"user": user, "items": items}

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

    def __init__(self, app: Callable, limits: Limits, token: str | None):
        self.app, self.limits = app, limits
        self.expected = token.encode() if token is not None else None
        self.in_flight = 0  # /score and /rank requests past the cap check; one event loop, so a plain int

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        free = scope["path"] == "/health"
        headers = dict(scope["headers"])  # h11 lowercases names; a repeated header keeps its last value
        if self.expected is not None and not free and not self._authorised(headers.get(b"authorization", b"")):
            message = "Expected `Authorization: Bearer TOKEN` with the service's token, but got none or another"
            return await _refuse(send, 401, message, [(b"www-authenticate", b"Bearer")])
        if not free and self.in_flight >= self.limits.max_in_flight:
            message = f"The service is busy: {self.in_flight} requests in flight (at most {self.limits.max_in_flight})"
            return await _refuse(send, 503, message, [(b"retry-after", b"1")])
        self.in_flight += 0 if free else 1
        try:
            await self._serve(scope, receive, send, headers)
        finally:
            self.in_flight -= 0 if free else 1

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

        await self.app(scope, replay, send)

    def _authorised(self, value: bytes) -> bool:
        scheme, _, given = value.strip().partition(b" ")
        # compare_digest takes time independent of where the tokens differ (their lengths may show).
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected)


async def _refuse(send: Callable, status: int, message: str, headers: list | None = None) -> None:
    body = jsonio.dumps({"error": message}).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start += [(b"connection", b"close"), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


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
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve until interrupted (SIGINT or SIGTERM end it gracefully)."""
    if threads < 0:
        raise ValueError(f"Expected threads >= 0, but got {threads}")
    check_exposure(host, token)
    limits = limits or Limits()
    server = make_server(create_app(scorer, limits, token=token, docs=docs), limits)
    if threads:
        torch.set_num_threads(threads)
    sock = bind(host, port)
    if on_ready is not None:
        on_ready(*sock.getsockname()[:2])
    server.run(sockets=[sock])
