"""Throughput and latency of `plerec serve` under load from a client on the same machine. Not a test.

Trains the benchmark's PLE (embedding 16, experts [256, 128], towers [64]; datagen.py's 20 categorical and
8 numeric fields) for one epoch on a small generated table, then in one run measures, each server in its
own process on a free localhost port, driven by a closed-loop load generator (asyncio over raw sockets,
keep-alive connections, N requests in flight) with /rank requests of one user's C candidates (top 10):

- `baseline`: today's server, the plerec of `--baseline-rev` (git archive of that commit), row form; run
  first and again last (`baseline, again`), since the machine's speed drifts within a run;
- `rows`, `columns`: this plerec, one worker, the row form and the columnar form of the same requests;
- `columns, 2 workers`: this plerec with `workers=2` (one torch thread each);
- `columns, 2 threads`, `columns, onnx, 2 threads`: one worker whose forward pass takes two threads;
- `columns, onnx`: this plerec with `backend="onnx"` (ONNX Runtime on the model exported at start);
- `columns, batch W ms`: this plerec with micro-batching (`batch_window`), one worker;
- `forward (torch)`, `forward (onnx)`: the model's own cost, the forward pass alone (one thread) on the
  same rows already encoded: the limit a server could reach with that backend.

at 1, 4 and 16 requests in flight and 100 and 500 candidates: requests/s, candidates/s, latency percentiles,
errors, with the CPU (model, flags), the load average around every scenario, and a check that every server
ranks the first request alike.

    python benchmarks/serve_bench.py --out benchmarks/results/serve          # ~6 min on 2 cores
    python benchmarks/serve_bench.py --out /tmp/smoke --smoke               # a few seconds' check that it runs

Needs plerec with its serve extra and httpx (`pip install -c constraints.txt -e '.[dev]'`), and git for the
baseline (`--baseline-rev ''` skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datagen import CATEGORICAL, NUMERIC, generate  # noqa: E402
from run import cpu_identity  # noqa: E402  (the CPU as run.py's benchmark records it)

TOP_K = 10
BASELINE_REV = "16ecf685929e4a525ca29fa4d2c7433e2f57baa6"  # the server before issue 19 (row form only)
LAUNCHER = """
import functools, json, sys
from plerec.config import load_experiment
from plerec.rank import Scorer
from plerec.serve import serve
checkpoint, experiment, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
load = functools.partial(Scorer.from_checkpoint, checkpoint, load_experiment(experiment))
serve(load(), port=0, load=load, **options, on_ready=lambda h, p: print(f"serving on http://{h}:{p}", flush=True))
"""

EXPERIMENT = """\
seed = 0

[data]
train = "train.parquet"
valid = "valid.parquet"

[features]
categorical = {categorical}
numeric = {numeric}

[[tasks]]
name = "click"
kind = "binary"
label = "click"
rank_weight = 1.0

[[tasks]]
name = "conversion"
kind = "binary"
label = "conversion"
rank_weight = 0.5

[model]
name = "ple"
embedding_dim = 16
num_levels = 2
expert_dims = [256, 128]
tower_dims = [64]

[train]
epochs = 1
batch_size = 1024
progress = false
threads = 2

[rank]
group = "user"
item = "item"
length = "duration"
length_transform = "log"
"""


def prepare(work: Path, rows: int, baseline: Path | None = None) -> tuple[Path, Path, pd.DataFrame]:
    """A trained checkpoint, its experiment file, and a pool of candidate rows (from the test split). With a
    baseline, the baseline's plerec trains it: a checkpoint of older code is one both servers can read."""
    splits, _ = generate(rows, seed=0, test_rows=20_000)
    rng = np.random.default_rng(1)
    frames = {}
    for name, columns in splits.items():
        frame = pd.DataFrame(columns)
        frame["duration"] = rng.uniform(5, 600, len(frame)).round(1)
        frames[name] = frame
    work.mkdir(parents=True, exist_ok=True)
    frames["train"].to_parquet(work / "train.parquet")
    frames["valid"].to_parquet(work / "valid.parquet")
    quoted = lambda names: "[" + ", ".join(f'"{n}"' for n in names) + "]"  # noqa: E731
    experiment = work / "exp.toml"
    experiment.write_text(EXPERIMENT.format(categorical=quoted(CATEGORICAL), numeric=quoted(NUMERIC)))
    checkpoint = work / "run" / "best.pt"
    if not checkpoint.exists():
        subprocess.run(
            [sys.executable, "-m", "plerec", "train", str(experiment), "--out", str(work / "run"), "--quiet"],
            check=True,
            env={**os.environ, **({"PYTHONPATH": str(baseline)} if baseline is not None else {})},
        )
    return checkpoint, experiment, frames["test"]


def request_bodies(pool: pd.DataFrame, count: int, candidates: int) -> dict[str, list[bytes]]:
    """`count` /rank bodies of one user's `candidates` (top 10), in the row form and the columnar form."""
    rng = np.random.default_rng(2)
    bodies: dict[str, list[bytes]] = {"rows": [], "columns": []}
    features = [*CATEGORICAL, *NUMERIC, "duration"]
    for i in range(count):
        rows = pool.iloc[rng.choice(len(pool), candidates, replace=False)]
        records = [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in rows[features].to_dict("records")
        ]
        cands = [{**r, "item": j} for j, r in enumerate(records)]
        user = {"user": f"u{i}"}
        bodies["rows"].append(json.dumps({"user": user, "candidates": cands, "top_k": TOP_K}).encode())
        columns = {k: [c[k] for c in cands] for k in cands[0]}
        bodies["columns"].append(json.dumps({"user": user, "columns": columns, "top_k": TOP_K}).encode())
    return bodies


async def load(url: str, bodies: list[bytes], concurrency: int, warmup: float, seconds: float, size: int) -> dict:
    """Closed loop: `concurrency` keep-alive connections, each sending its next request as soon as the last is
    answered. The client is a few lines of asyncio over raw sockets with every request's bytes built before
    the clock starts: it shares the machine's cores with the server, so the less it spends per request
    (httpx spends about a millisecond), the more of each measured request is the server's."""
    host, port, path = _split_url(url)
    requests = [_post(host, port, path, body) for body in bodies]
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop = start + warmup, start + warmup + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        i = w
        try:
            while True:
                sent = time.perf_counter()
                if sent >= stop:
                    return
                writer.write(requests[i % len(requests)])
                try:
                    ok = await _response(reader) == 200
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    ok = False
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                done = time.perf_counter()
                i += concurrency
                if sent >= measure_from and done <= stop:
                    if ok:
                        latencies.append(done - sent)
                    else:
                        errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return summary(latencies, seconds, size, concurrency, errors)


def _split_url(url: str) -> tuple[str, int, str]:
    rest = url.removeprefix("http://")
    address, _, path = rest.partition("/")
    host, _, port = address.rpartition(":")
    return host, int(port), "/" + path


def _post(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _response(reader: asyncio.StreamReader) -> int:
    """Read one whole response (Content-Length framed, as every plerec answer is); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next(
        (int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length"), None
    )
    if length is None:
        raise ValueError("a response without Content-Length")
    await reader.readexactly(length)
    return status


def summary(latencies: list[float], seconds: float, size: int, concurrency: int, errors: int = 0) -> dict:
    ms = np.array(latencies or [np.nan]) * 1000
    return {
        "concurrency": concurrency,
        "candidates": size,
        "seconds": seconds,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": len(latencies) / seconds,
        "candidates_per_s": len(latencies) * size / seconds,
        "latency_ms": {q: float(np.percentile(ms, p)) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"mean": float(ms.mean()), "max": float(ms.max())},
    }


def baseline_source(work: Path, rev: str) -> Path | None:
    """The plerec package of commit `rev` (`git archive`, read-only), or None without git or that commit."""
    target = work / f"baseline-{rev[:12]}"
    if (target / "plerec").exists():
        return target
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src/plerec"], capture_output=True)
    if archive.returncode != 0:
        print(f"no baseline: git archive {rev} failed: {archive.stderr.decode().strip()}", flush=True)
        return None
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (work / "baseline.tar").write_bytes(archive.stdout)
    with tarfile.open(work / "baseline.tar") as tar:
        tar.extractall(target, filter="data")
    shutil.move(str(target / "src" / "plerec"), str(target / "plerec"))
    return target


def start_server(command: list[str], env: dict, log: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    line = process.stdout.readline()
    if " on http://" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {log.read_text()}")
    url = line.split(" on ")[1].split()[0]
    import httpx

    pids: set[str] = set()
    for _ in range(1200):
        try:
            if httpx.get(url + "/health").status_code == 200 and workers == 1:
                return process, url
            if workers > 1:  # every worker started: each answers /metrics with its pid
                pids.update(re.findall(r'pid="(\d+)"', httpx.get(url + "/metrics").text))
                if len(pids) == workers:
                    return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not answer /health")


def servers(checkpoint: Path, experiment: Path, baseline: Path | None, window_ms: float) -> list[tuple]:
    """(name, form, command, extra env) of every server measured."""
    env = {"OMP_NUM_THREADS": "1"}
    out = []
    if baseline is not None:
        command = [sys.executable, "-m", "plerec", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
        command += ["--experiment", str(experiment), "--threads", "1"]
        out.append(("baseline", "rows", command, {**env, "PYTHONPATH": str(baseline)}))
    launch = [sys.executable, "-c", LAUNCHER, str(checkpoint), str(experiment)]
    out.append(("rows", "rows", [*launch, json.dumps({"threads": 1})], env))
    out.append(("columns", "columns", [*launch, json.dumps({"threads": 1})], env))
    out.append(("columns, 2 workers", "columns", [*launch, json.dumps({"threads": 1, "workers": 2})], env))
    out.append(("columns, onnx", "columns", [*launch, json.dumps({"threads": 1, "backend": "onnx"})], env))
    # Both cores on each request's forward pass: `plerec serve`'s default (torch's threads) on a 2-core machine.
    two = {"OMP_NUM_THREADS": "2"}
    out.append(("columns, 2 threads", "columns", [*launch, json.dumps({"threads": 2})], two))
    out.append(("columns, onnx, 2 threads", "columns", [*launch, json.dumps({"threads": 2, "backend": "onnx"})], two))
    if window_ms:
        options = {"threads": 1, "batch_window": window_ms / 1000}
        out.append((f"columns, batch {window_ms:g} ms", "columns", [*launch, json.dumps(options)], env))
    if baseline is not None:  # measured again last: the machine's speed drifts over a run, and ratios rest on it
        out.append(("baseline, again", *out[0][1:]))
    return out


def forward_limit(
    checkpoint: Path, experiment: Path, bodies: list[bytes], seconds: float, size: int, backend: str = "torch"
) -> dict:
    """The forward pass alone (one thread) on the rows of the requests, encoded before timing."""
    import torch

    from plerec.config import load_experiment
    from plerec.rank import Scorer
    from plerec.serve import Served, loads

    torch.set_num_threads(1)
    served = Served(Scorer.from_checkpoint(checkpoint, load_experiment(experiment)), 10_000, backend=backend)
    tables = [served.job("/rank", loads(body)).table for body in bodies[:50]]
    for table in tables[:10]:
        served.forward(table)
    latencies, stop, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < stop:
        start = time.perf_counter()
        served.forward(tables[i % len(tables)])
        latencies.append(time.perf_counter() - start)
        i += 1
    return summary(latencies, sum(latencies), size, 1)


def cpu() -> dict:
    """The CPU's name, family and model numbers, and the vector instruction sets torch can use."""
    info = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    identity = cpu_identity()
    if identity["name"]:
        info["model"] = identity["name"]
    if identity["family_model"]:
        info["cpu_family_model"] = identity["family_model"]
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    info["flags"] = [f for f in wanted if f in identity["flags"]]
    import torch

    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=50_000, help="training rows of the served model")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--concurrency", default="1,4,16", help="requests in flight")
    parser.add_argument("--candidates", default="100,500", help="candidates per /rank request")
    parser.add_argument("--batch-window-ms", type=float, default=2.0, help="micro-batching server; 0 skips it")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="commit of today's server; '' skips it")
    parser.add_argument("--servers", default="", help="server names to run, separated by ; (default: all)")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward-pass limits")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: small model data, short scenarios")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.seconds, args.warmup = 3_000, 0.5, 0.2
        args.concurrency, args.candidates = "1,4", "100"

    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    load_before = os.getloadavg()
    baseline = baseline_source(work, args.baseline_rev) if args.baseline_rev else None
    checkpoint, experiment, pool = prepare(work, args.rows, baseline)
    sizes = [int(c) for c in args.candidates.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    bodies = {size: request_bodies(pool, 100, size) for size in sizes}
    scenarios, first_answers = [], {}
    for size in sizes if not args.no_forward else ():
        for backend in ("torch", "onnx"):
            result = forward_limit(checkpoint, experiment, bodies[size]["columns"], args.seconds, size, backend)
            row = {"server": f"forward ({backend})", "form": "-", **result, "load_avg_1min": os.getloadavg()[0]}
            scenarios.append(row)
            print(_line(row), flush=True)
    chosen = {name.strip() for name in args.servers.split(";") if name.strip()}
    for name, form, command, env in servers(checkpoint, experiment, baseline, args.batch_window_ms):
        if chosen and name not in chosen:
            continue
        workers = json.loads(command[-1]).get("workers", 1) if not name.startswith("baseline") else 1
        log = work / f"serve-{name.replace(' ', '_').replace(',', '')}.log"
        process, url = start_server(command, {**os.environ, **env}, log, workers)
        try:
            import httpx

            for size in sizes:
                answer = httpx.post(
                    url + "/rank", content=bodies[size][form][0], headers={"Content-Type": "application/json"}
                )
                assert answer.status_code == 200 and len(answer.json()["items"]) == TOP_K, answer.text
                first_answers[name, size] = [(i["item"], i["log_score"]) for i in answer.json()["items"]]
                for concurrency in levels:
                    result = asyncio.run(
                        load(url + "/rank", bodies[size][form], concurrency, args.warmup, args.seconds, size)
                    )
                    scenarios.append({"server": name, "form": form, **result, "load_avg_1min": os.getloadavg()[0]})
                    print(_line(scenarios[-1]), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    agree = {size: _alike([v for (_, s), v in first_answers.items() if s == size]) for size in sizes}
    import torch

    context = {
        "date": date.today().isoformat(),
        "machine": cpu(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "server_threads": "1 (2 for the servers named '2 threads')",
        "model": "ple, embedding 16, experts [256, 128], towers [64], 20 categorical + 8 numeric fields",
        "training_rows": args.rows,
        "top_k": TOP_K,
        "baseline_rev": args.baseline_rev if baseline is not None else None,
        "servers_rank_alike": agree,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "wall_seconds": round(time.time() - began, 1),
        "smoke": args.smoke,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps({"context": context, "scenarios": scenarios}, indent=2) + "\n")
    (args.out / "serve.md").write_text(_markdown(context, scenarios))
    print(f"servers rank the first request alike: {agree}")
    print(f"wrote {args.out / 'serve.json'} and {args.out / 'serve.md'}")


def _alike(answers: list[list[tuple]]) -> bool:
    """The same items in the same order, log scores within float32 rounding (the onnx backend's)."""
    first = answers[0]
    return all(
        [i for i, _ in a] == [i for i, _ in first]
        and np.allclose([x for _, x in a], [x for _, x in first], rtol=1e-5, atol=1e-6)
        for a in answers
    )


def _line(s: dict) -> str:
    lat = s["latency_ms"]
    return (
        f"{s['server']} ({s['form']}) {s['candidates']} candidates, {s['concurrency']} in flight: "
        f"{s['requests_per_s']:.1f} req/s, {s['candidates_per_s']:,.0f} candidates/s, p50 {lat['p50']:.2f} ms, "
        f"p99 {lat['p99']:.2f} ms, {s['errors']} errors"
    )


def _markdown(context: dict, scenarios: list[dict]) -> str:
    machine = context["machine"]
    lines = [
        f"# plerec serve: throughput and latency ({context['date']})",
        "",
        f"{context['model']}; /rank of one user's candidates, top {context['top_k']}; every server with one torch "
        f"thread per process but those named '2 threads'; load generator (asyncio over raw sockets, requests "
        "built beforehand, closed loop) on the same machine: "
        f"{machine.get('model', machine['processor'])}"
        + (f" ({machine['cpu_family_model']})" if "cpu_family_model" in machine else "")
        + f", {machine['cpus']} CPUs, flags "
        f"{' '.join(machine.get('flags', []))}, torch {context['torch']} ({machine.get('torch_cpu_capability', '?')}), "
        f"Python {context['python']}. Load average before {context['load_avg_before'][0]:.2f}, after "
        f"{context['load_avg_after'][0]:.2f}. Baseline: {context['baseline_rev'] or 'not run'}. `forward` is the "
        "forward pass alone on the encoded rows (one thread, no HTTP): the limit. All servers rank the first "
        f"request alike: {context['servers_rank_alike']}."
        + (" SMOKE RUN: not a measurement." if context["smoke"] else ""),
        "",
        "| server | form | candidates | in flight | requests/s | candidates/s | p50 ms | p90 ms | p99 ms | errors "
        "| load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scenarios:
        lat = s["latency_ms"]
        lines.append(
            f"| {s['server']} | {s['form']} | {s['candidates']} | {s['concurrency']} | {s['requests_per_s']:.1f} | "
            f"{s['candidates_per_s']:,.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {s['errors']} | "
            f"{s['load_avg_1min']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
