"""What `plerec serve` runs beside its handlers: Prometheus metrics and micro-batching.

`Metrics` counts one process's requests by path and status, their latency, the rows scored, the forward
passes and the reloads, and writes them in Prometheus' text format (version 0.0.4) by hand. `Batcher` holds
the requests that arrive within a short window and scores them in one forward pass: each request gets back
the logits of its own rows, in order, never another request's.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
from collections import Counter
from collections.abc import Callable, Sequence

import anyio
import torch

from plerec.data.tables import TABLE_FIELDS, EncodedTable

PATHS = ("/score", "/rank", "/health", "/metrics")  # the `path` label; any other path counts as "other"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """One process's counters. Requests are counted by the middleware on the event loop; rows, forward
    passes and reloads may be counted from other threads, so every update takes the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (path, status) -> answers
        self.buckets: dict[str, list[int]] = {}  # path -> answers per latency bucket (not cumulative), +Inf last
        self.seconds: Counter[str] = Counter()  # path -> total latency
        self.rows: Counter[str] = Counter()  # path -> rows scored
        self.forwards = 0
        self.forward_requests = 0  # requests those passes scored (more than `forwards` when batched)
        self.reloads: Counter[str] = Counter()  # "ok" / "failed" -> reloads
        self.in_flight = 0  # set by the middleware

    @staticmethod
    def path(path: str) -> str:
        return path if path in PATHS else "other"

    def observe(self, path: str, status: int, seconds: float) -> None:
        """One answered request: its status and its latency, from the request's arrival to its last byte."""
        path = self.path(path)
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # the first bucket whose bound is >= seconds; +Inf last
        with self.lock:
            self.requests[path, status] += 1
            self.buckets.setdefault(path, [0] * (len(LATENCY_BUCKETS) + 1))[slot] += 1
            self.seconds[path] += seconds

    def scored(self, path: str, rows: int) -> None:
        with self.lock:
            self.rows[self.path(path)] += rows

    def forward(self, requests: int) -> None:
        with self.lock:
            self.forwards += 1
            self.forward_requests += requests

    def reloaded(self, ok: bool) -> None:
        with self.lock:
            self.reloads["ok" if ok else "failed"] += 1

    def text(self, info: dict[str, str]) -> str:
        """The Prometheus exposition of every counter; `info` labels the `plerec_model_info` gauge."""
        with self.lock:
            lines = _family("plerec_requests_total", "counter", "HTTP requests answered, by path and status")
            lines += [
                _sample("plerec_requests_total", path=p, status=s, value=n) for (p, s), n in self.requests.items()
            ]
            lines += _family("plerec_request_errors_total", "counter", "Answers with a 4xx or 5xx status")
            lines += [
                _sample("plerec_request_errors_total", path=p, status=s, value=n)
                for (p, s), n in self.requests.items()
                if s >= 400
            ]
            lines += _family("plerec_request_duration_seconds", "histogram", "From a request's arrival to its answer")
            for path, counts in self.buckets.items():
                total = 0
                for bound, count in zip([*LATENCY_BUCKETS, "+Inf"], counts, strict=True):
                    total += count
                    le = bound if isinstance(bound, str) else f"{bound:g}"
                    lines.append(_sample("plerec_request_duration_seconds_bucket", path=path, le=le, value=total))
                lines.append(_sample("plerec_request_duration_seconds_sum", path=path, value=self.seconds[path]))
                lines.append(_sample("plerec_request_duration_seconds_count", path=path, value=total))
            lines += _family("plerec_rows_scored_total", "counter", "Rows (candidates) scored, by path")
            lines += [_sample("plerec_rows_scored_total", path=p, value=n) for p, n in self.rows.items()]
            lines += _family("plerec_forward_passes_total", "counter", "Forward passes of the model")
            lines.append(_sample("plerec_forward_passes_total", value=self.forwards))
            lines += _family("plerec_forward_requests_total", "counter", "Requests scored by those passes")
            lines.append(_sample("plerec_forward_requests_total", value=self.forward_requests))
            lines += _family("plerec_reloads_total", "counter", "Checkpoint reloads, by result")
            lines += [_sample("plerec_reloads_total", result=r, value=n) for r, n in self.reloads.items()]
        lines += _family("plerec_in_flight_requests", "gauge", "/score and /rank requests being read or computed")
        lines.append(_sample("plerec_in_flight_requests", value=self.in_flight))
        lines += _family("plerec_model_info", "gauge", "The model being served (value 1)")
        lines.append(_sample("plerec_model_info", **info, value=1))
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _sample(name: str, value: float, **labels: object) -> str:
    if not labels:
        return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
    text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return f"{name}{{{text}}} {value:g}" if isinstance(value, float) else f"{name}{{{text}}} {value}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def concat(tables: Sequence[EncodedTable]) -> EncodedTable:
    """Encoded tables one after the other (their rows in order)."""
    if len(tables) == 1:
        return tables[0]
    return EncodedTable(*(torch.cat([getattr(t, f) for t in tables]) for f in TABLE_FIELDS), source=tables[0].source)


class Batcher:
    """Requests that arrive within `window` seconds of the first one waiting (and while a pass is running)
    are scored in one forward pass, up to about `max_rows` rows; each request gets its own rows' logits.
    The window is only waited out while other requests are being parsed (`arriving`, counted by the
    handlers): a request alone is scored at once.

    `forward(key, tables)` runs in a worker thread and returns the logits of the concatenated tables;
    requests are only batched with others of the same `key` (the model they started with: a reload never
    scores a request with a model it did not start on)."""

    def __init__(self, window: float, max_rows: int, metrics: Metrics | None = None):
        self.window, self.max_rows, self.metrics = window, max_rows, metrics
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.arriving = 0  # requests being parsed and encoded, soon in the queue (counted on the event loop)

    async def logits(self, key: object, forward: Callable, table: EncodedTable) -> torch.Tensor:
        """The logits (N, T) of `table`'s rows, scored with the other requests waiting at the time."""
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.get_loop() is not loop:  # first use on this event loop
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run())
        future = loop.create_future()
        assert self.queue is not None
        self.queue.put_nowait((key, forward, table, future))
        return await future

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            rows, deadline = len(batch[0][2]), loop.time() + self.window
            while rows < self.max_rows:
                if self.queue.empty() and not self.arriving:
                    break  # nobody else on the way: no point waiting out the window
                try:
                    if self.queue.empty():
                        batch.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                    else:
                        batch.append(self.queue.get_nowait())
                except TimeoutError:
                    break
                rows += len(batch[-1][2])
            for key in dict.fromkeys(item[0] for item in batch):  # one pass per model, in arrival order
                await self._score([item for item in batch if item[0] is key])

    async def _score(self, group: list) -> None:
        forward, tables, futures = group[0][1], [item[2] for item in group], [item[3] for item in group]
        try:
            logits = await anyio.to_thread.run_sync(forward, concat(tables))
        except Exception as err:  # every request of the pass gets the error; the loop goes on
            for future in futures:
                if not future.done():
                    future.set_exception(err)
            return
        if self.metrics is not None:
            self.metrics.forward(len(group))
        parts = torch.split(logits, [len(t) for t in tables])  # (N_i, T) each, in the order they were queued
        for future, part in zip(futures, parts, strict=True):
            if not future.done():  # a client that went away
                future.set_result(part)
