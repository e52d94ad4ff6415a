"""`plerec serve --workers N`: N processes answering on one listening socket.

Each worker is a fresh interpreter (multiprocessing's spawn: no torch state or threads inherited from the
parent) that loads the model itself, so the workers share nothing but the checkpoint file and the socket;
the kernel hands each new connection to one of them. The parent only supervises: SIGHUP, SIGINT and SIGTERM
are passed on to every worker (SIGINT and SIGTERM: each stops taking connections and finishes its requests
in flight), and a worker that dies stops the others, so that whatever runs the service sees it fail.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import wait


def run_workers(target: Callable, args: tuple, workers: int, on_started: Callable[[], object]) -> None:
    """Run `target(*args)` in `workers` spawned processes until they end; raises if one fails on its own."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=args, name=f"plerec-serve-{i}") for i in range(workers)]
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        # SIGINT goes on as SIGTERM: a worker also gets a terminal's SIGINT itself, and uvicorn takes a
        # second SIGINT as "exit now", dropping the requests in flight.
        passed = signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                _kill(process, passed)

    # Spawned with SIGHUP ignored (an ignored signal stays so across exec), until a worker listens for it:
    # the default would end a worker still starting up. One that starts loading after a SIGHUP loads the new file.
    previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_IGN)}
    try:
        for process in processes:
            process.start()
        previous |= {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGHUP, forward)
        on_started()
        while any(p.exitcode is None for p in processes):
            ended = wait([p.sentinel for p in processes if p.exitcode is None])
            failed = [p for p in processes if p.sentinel in ended and p.exitcode != 0]
            if failed and not stopping:
                stopping = True
                for process in processes:
                    if process.exitcode is None:
                        _kill(process, signal.SIGTERM)
                for process in processes:
                    process.join()
                raise RuntimeError(f"Worker {failed[0].name} exited with code {failed[0].exitcode}; stopped them all")
            for process in processes:
                if process.sentinel in ended:
                    process.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for process in processes:
            if process.exitcode is None and process.pid is not None:
                _kill(process, signal.SIGTERM)
                process.join(30)


def _kill(process, signum: int) -> None:
    try:
        os.kill(process.pid, signum)  # type: ignore[arg-type]
    except ProcessLookupError:
        pass
