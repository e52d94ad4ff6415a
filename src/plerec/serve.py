"""An HTTP JSON service over a trained model (FastAPI on uvicorn): /score, /rank and /health.

POST /score  {"rows": [{FEATURE: value, …}, …]}
             -> {"tasks": [...], "predictions": [{TASK: p, …, "score": s, "log_score": l}, …]}
POST /rank   {"candidates": [{…}, …], "user": {FEATURE: value, …}, "top_k": k}
             -> {"user": id or null, "items": [{"rank": 1, "index": i, ITEM: id, TASK: p, …, "score": s, …}, …]}
GET  /health -> {"status": "ok", "model": …, "tasks": […], "features": {…}, "rank": {…}}

Every row must carry every feature column (null marks a missing value), of the JSON type its training
values had: a number for a numeric column; for a categorical column the type of its vocabulary (a string
for text categories, a number for numeric ids, a boolean). Fields other than the features and the [rank]
group, item and length columns are rejected. A bad request gets a 4xx answer whose `error` names the row,
the field and what was expected; nothing is coerced. Requests run in the server's thread pool, each on its
own rows; the model is only read.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from plerec.data.encode import EncodedTable
from plerec.errors import did_you_mean
from plerec.rank import Scorer, rank_within_groups


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
        # The JSON types a categorical column accepts: those of its training values.
        self.kinds = {
            c: {_json_kind(v) for v in encoder.vocabs[c]} or {"string", "number", "boolean"} for c in self.categorical
        }
        self.types = {c: tuple(t for k in sorted(self.kinds[c]) for t in _TYPES[k]) for c in self.categorical}
        # Where a column holds booleans next to numbers, keys say which is which: Python's True == 1, and
        # true must not find the id of 1 (the Encoder keeps them apart).
        self.tagged = {c: "boolean" in self.kinds[c] and len(self.kinds[c]) > 1 for c in self.categorical}
        self.ids_of = {
            c: {((type(v) is bool, v) if self.tagged[c] else v): i + 1 for i, v in enumerate(encoder.vocabs[c])}
            for c in self.categorical
        }
        self.length = rank.length
        self.ids = [c for c in (rank.group, rank.item) if c]
        self.required = list(dict.fromkeys(self.categorical + self.numeric + ([self.length] if self.length else [])))
        self.allowed = set(self.required) | set(self.ids)

    def check(self, rows: list[dict[str, Any]], what: str) -> None:
        if not rows:
            raise RequestError(422, f"Expected at least one row in `{what}`, but got none")
        if len(rows) > self.max_rows:
            raise RequestError(413, f"Expected at most {self.max_rows} rows in `{what}`, but got {len(rows)}")
        for i, row in enumerate(rows):
            self._check(row, what, i)

    def encode(self, rows: list[dict[str, Any]], what: str) -> EncodedTable:
        """The checked rows as the model's inputs: what `Encoder.transform` gives for the same values."""
        n, encoder = len(rows), self.encoder
        sparse = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, column in enumerate(self.categorical):
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
            dense[:, j] = (np.where(missing, encoder.means[column], values) - encoder.means[column]) / encoder.stds[
                column
            ]
            if column in encoder.indicators:
                dense[:, len(self.numeric) + encoder.indicators.index(column)] = missing
        tasks = len(encoder.tasks)
        return EncodedTable(
            sparse=torch.from_numpy(sparse),
            dense=torch.from_numpy(dense),
            labels=torch.zeros(n, tasks),
            label_mask=torch.zeros(n, tasks, dtype=torch.bool),
            source=f"the request's `{what}`",
        )

    def lengths(self, rows: list[dict[str, Any]]) -> np.ndarray | None:
        if not self.length:
            return None
        return np.array([row[self.length] for row in rows], dtype=np.float64)

    def _check(self, row: dict[str, Any], what: str, i: int) -> None:
        for key in row:
            if key not in self.allowed:
                raise RequestError(
                    422,
                    f"{what}[{i}]: unknown field `{key}`.{did_you_mean(key, self.allowed)} "
                    f"Expected the fields {', '.join(sorted(self.allowed))}",
                )
        for column in self.categorical:
            if column not in row:
                self._missing(what, i, column)
            value = row[column]
            if value is not None and type(value) not in self.types[column]:
                expected = " or ".join(sorted(self.kinds[column]))
                raise RequestError(
                    422,
                    f"{what}[{i}]: expected `{column}` to be a {expected} (the type of its training values) or null, "
                    f"but got {_json_kind(value)} {value!r}",
                )
        for column in self.numeric:
            if column not in row:
                self._missing(what, i, column)
            value = row[column]
            if value is not None and (type(value) not in (int, float) or not _finite(value)):
                raise RequestError(
                    422,
                    f"{what}[{i}]: expected `{column}` to be a finite number or null, but got {_json_kind(value)} "
                    f"{value!r}",
                )
        if self.length:
            value = row.get(self.length)
            if type(value) not in (int, float) or not _finite(value):
                raise RequestError(
                    422, f"{what}[{i}]: expected the length `{self.length}` to be a finite number, but got {value!r}"
                )
        for column in self.ids:
            if column in row and type(row[column]) not in (str, int, float, bool):
                raise RequestError(
                    422, f"{what}[{i}]: expected the id `{column}` to be a string or number, but got {row[column]!r}"
                )

    def _missing(self, what: str, i: int, column: str) -> None:
        raise RequestError(
            422, f"{what}[{i}]: missing field `{column}` (every feature must be present; null marks a missing value)"
        )


def create_app(scorer: Scorer, max_rows: int = 10_000) -> FastAPI:
    """The service over one scorer. Handlers are plain functions: FastAPI runs them in its thread pool."""
    if max_rows < 1:
        raise ValueError(f"Expected max_rows >= 1, but got {max_rows}")
    reader = RowReader(scorer, max_rows)
    rank = scorer.rank
    app = FastAPI(title="plerec", description="Multi-task ranking: per-task predictions and the fused score of Eq. 1")

    @app.exception_handler(RequestError)
    def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                detail = e.get("ctx", {}).get("error", "")
                at = e.get("loc", ("body", "?"))[-1]
                return JSONResponse({"error": f"The request body is not valid JSON (at character {at}): {detail}"}, 400)
        parts = []
        for e in errors[:3]:
            where = ".".join(str(p) for p in e.get("loc", ())[1:]) or "the request body"
            parts.append(f"`{where}`: {e.get('msg')}")
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)

    @app.exception_handler(Exception)
    def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": f"Internal error: {type(err).__name__}: {err}"}, status_code=500)

    def scored(rows: list[dict[str, Any]], what: str) -> pd.DataFrame:
        reader.check(rows, what)
        try:
            return scorer.score_table(reader.encode(rows, what), reader.lengths(rows))
        except ValueError as err:  # e.g. a regression value Eq. 1 cannot take the log of
            raise RequestError(422, " ".join(str(err).split())) from None

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": scorer.model_name,
            "tasks": [{"name": t.name, "kind": t.kind, "rank_weight": t.rank_weight} for t in scorer.tasks],
            "features": {"categorical": reader.categorical, "numeric": reader.numeric},
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
        if body.top_k is not None and body.top_k < 1:
            raise RequestError(422, f"Expected `top_k` >= 1, but got {body.top_k}")
        top_k = rank.top_k if body.top_k is None else body.top_k
        for key in body.user:
            if key not in reader.allowed:
                raise RequestError(422, f"user: unknown field `{key}`.{did_you_mean(key, reader.allowed)}")
        rows = []
        for i, candidate in enumerate(body.candidates):
            repeated = sorted(set(candidate) & set(body.user))
            if repeated:
                raise RequestError(422, f"candidates[{i}]: repeats {repeated}, already given in `user`")
            rows.append({**body.user, **candidate})
        if rank.item:
            for i, row in enumerate(rows):
                if row.get(rank.item) is None:
                    raise RequestError(422, f"candidates[{i}]: missing the item id `{rank.item}`")
        user = None
        if rank.group:
            users = {row.get(rank.group) for row in rows}
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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 takes a free one (read it back with getsockname)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"Cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(1024)
    return sock


def serve(
    scorer: Scorer,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    max_rows: int = 10_000,
    threads: int = 0,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve until interrupted (SIGINT or SIGTERM end it gracefully)."""
    import uvicorn

    if threads < 0:
        raise ValueError(f"Expected threads >= 0, but got {threads}")
    if threads:
        torch.set_num_threads(threads)
    app = create_app(scorer, max_rows)
    sock = bind(host, port)
    if on_ready is not None:
        on_ready(*sock.getsockname()[:2])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
