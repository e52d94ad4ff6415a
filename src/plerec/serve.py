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


class RowReader:
    """Checks request rows against the model's columns and turns them into a DataFrame."""

    def __init__(self, scorer: Scorer, max_rows: int):
        encoder, rank = scorer.encoder, scorer.rank
        self.max_rows = max_rows
        self.numeric = list(encoder.numeric)
        self.categorical = list(encoder.categorical)
        # The JSON types a categorical column accepts: those of its training values.
        self.kinds = {
            c: {_json_kind(v) for v in encoder.vocabs[c]} or {"string", "number", "boolean"} for c in self.categorical
        }
        self.length = rank.length
        self.ids = [c for c in (rank.group, rank.item) if c]
        self.required = list(dict.fromkeys(self.categorical + self.numeric + ([self.length] if self.length else [])))
        self.allowed = set(self.required) | set(self.ids)

    def frame(self, rows: list[dict[str, Any]], what: str) -> pd.DataFrame:
        if not rows:
            raise RequestError(422, f"Expected at least one row in `{what}`, but got none")
        if len(rows) > self.max_rows:
            raise RequestError(413, f"Expected at most {self.max_rows} rows in `{what}`, but got {len(rows)}")
        for i, row in enumerate(rows):
            self._check(row, f"{what}[{i}]")
        frame = pd.DataFrame(index=pd.RangeIndex(len(rows)))
        for column in self.required:
            values = [row[column] for row in rows]
            if column in self.categorical:
                frame[column] = pd.Series(values, dtype=object)
            else:
                frame[column] = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        for column in self.ids:
            frame[column] = pd.Series([row.get(column) for row in rows], dtype=object)
        frame.attrs["source"] = f"the request's `{what}`"
        return frame

    def _check(self, row: dict[str, Any], where: str) -> None:
        for key in row:
            if key not in self.allowed:
                raise RequestError(
                    422,
                    f"{where}: unknown field `{key}`.{did_you_mean(key, self.allowed)} "
                    f"Expected the fields {', '.join(sorted(self.allowed))}",
                )
        for column in self.required:
            if column not in row:
                raise RequestError(
                    422,
                    f"{where}: missing field `{column}` (every feature must be present; null marks a missing value)",
                )
            value = row[column]
            kind = _json_kind(value)
            if column == self.length:
                if kind != "number" or not _finite(value):
                    raise RequestError(
                        422, f"{where}: expected the length `{column}` to be a finite number, but got {value!r}"
                    )
            elif column in self.categorical:
                if kind != "null" and kind not in self.kinds[column]:
                    expected = " or ".join(sorted(self.kinds[column]))
                    raise RequestError(
                        422,
                        f"{where}: expected `{column}` to be a {expected} (the type of its training values) or null, "
                        f"but got {kind} {value!r}",
                    )
            elif kind == "null":
                continue
            elif kind != "number" or not _finite(value):
                raise RequestError(
                    422, f"{where}: expected `{column}` to be a finite number or null, but got {kind} {value!r}"
                )
        for column in self.ids:
            if column in row and _json_kind(row[column]) not in ("string", "number", "boolean"):
                raise RequestError(
                    422, f"{where}: expected the id `{column}` to be a string or number, but got {row[column]!r}"
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

    def scored(frame: pd.DataFrame) -> pd.DataFrame:
        try:
            return scorer.score(frame)
        except ValueError as err:  # e.g. a missing value the model was trained to refuse
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
        out = scored(reader.frame(body.rows, "rows"))
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
        frame = reader.frame(rows, "candidates")
        out = scored(frame)
        order, ranks = rank_within_groups(np.zeros(len(frame), dtype=np.int64), out["log_score"].to_numpy())
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
