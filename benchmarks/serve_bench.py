"""Throughput and latency of `plerec serve` under load from a client on the same machine. Not a test.

Trains the benchmark's PLE (embedding 16, experts [256, 128], towers [64]; datagen.py's 20 categorical and
8 numeric fields) for one epoch on a small generated table, starts `plerec serve` on a free localhost port
in its own process, and drives it with a closed-loop load generator (asyncio + httpx, keep-alive
connections, N requests in flight): every request carries 100 candidates. For each scenario it reports
requests/s, candidates/s and latency percentiles over the measured window (after a warm-up).

    python benchmarks/serve_bench.py --out benchmarks/results/serve            # ~1 min on 2 cores
    python benchmarks/serve_bench.py --out DIR --seconds 20 --concurrency 1,4,16

Needs plerec with its serve extra and httpx (`pip install -c constraints.txt -e '.[dev]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datagen import CATEGORICAL, NUMERIC, generate  # noqa: E402

CANDIDATES = 100
TOP_K = 10

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


def prepare(work: Path, rows: int) -> tuple[Path, Path, pd.DataFrame]:
    """A trained checkpoint, its experiment file, and a pool of candidate rows (from the test split)."""
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
        )
    return checkpoint, experiment, frames["test"]


def request_bodies(pool: pd.DataFrame, count: int) -> tuple[list[bytes], list[bytes]]:
    """`count` /rank bodies (one user, 100 candidates, top 10) and as many /score bodies (100 rows)."""
    rng = np.random.default_rng(2)
    rank, score = [], []
    features = [*CATEGORICAL, *NUMERIC, "duration"]
    for i in range(count):
        rows = pool.iloc[rng.choice(len(pool), CANDIDATES, replace=False)]
        records = [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in rows[features].to_dict("records")
        ]
        candidates = [{**r, "item": j} for j, r in enumerate(records)]
        rank.append(json.dumps({"user": {"user": f"u{i}"}, "candidates": candidates, "top_k": TOP_K}).encode())
        score.append(json.dumps({"rows": records}).encode())
    return rank, score


async def load(url: str, bodies: list[bytes], concurrency: int, warmup: float, seconds: float) -> dict:
    """Closed loop: `concurrency` workers, each sending its next request as soon as the last is answered."""
    import httpx

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        start = time.perf_counter()
        measure_from, stop = start + warmup, start + warmup + seconds

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while True:
                sent = time.perf_counter()
                if sent >= stop:
                    return
                response = await client.post(url, content=bodies[i % len(bodies)], headers=headers)
                done = time.perf_counter()
                i += concurrency
                if sent >= measure_from and done <= stop:
                    if response.status_code == 200:
                        latencies.append(done - sent)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": len(latencies) / seconds,
        "candidates_per_s": len(latencies) * CANDIDATES / seconds,
        "latency_ms": {
            "mean": float(ms.mean()),
            "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()),
        },
    }


def start_server(checkpoint: Path, experiment: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "plerec", "serve", "--checkpoint", str(checkpoint)]
    command += ["--experiment", str(experiment), "--port", "0", "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    line = process.stdout.readline()
    if " on http://" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {log.read_text()}")
    url = line.split(" on ")[1].split()[0]
    import httpx

    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not answer /health")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=50_000, help="training rows of the served model")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,4", help="requests in flight, one /rank scenario each")
    parser.add_argument("--score-concurrency", type=int, default=4, help="requests in flight for /score; 0 skips")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()

    work = args.out / "work"
    began = time.time()
    load_before = os.getloadavg()
    checkpoint, experiment, pool = prepare(work, args.rows)
    rank_bodies, score_bodies = request_bodies(pool, 200)
    process, url = start_server(checkpoint, experiment, args.server_threads, work / "serve.log")
    try:
        import httpx

        answer = httpx.post(url + "/rank", content=rank_bodies[0], headers={"Content-Type": "application/json"})
        assert answer.status_code == 200 and len(answer.json()["items"]) == TOP_K, answer.text
        scenarios = []
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            result = asyncio.run(load(url + "/rank", rank_bodies, concurrency, args.warmup, args.seconds))
            scenarios.append({"endpoint": "/rank", **result, "load_avg_1min": os.getloadavg()[0]})
            print(_line(scenarios[-1]), flush=True)
        if args.score_concurrency:
            result = asyncio.run(load(url + "/score", score_bodies, args.score_concurrency, args.warmup, args.seconds))
            scenarios.append({"endpoint": "/score", **result, "load_avg_1min": os.getloadavg()[0]})
            print(_line(scenarios[-1]), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    import torch

    context = {
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "server_threads": args.server_threads,
        "model": "ple, embedding 16, experts [256, 128], towers [64], 20 categorical + 8 numeric fields",
        "training_rows": args.rows,
        "candidates_per_request": CANDIDATES,
        "top_k": TOP_K,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "wall_seconds": round(time.time() - began, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps({"context": context, "scenarios": scenarios}, indent=2) + "\n")
    (args.out / "serve.md").write_text(_markdown(context, scenarios))
    print(f"wrote {args.out / 'serve.json'} and {args.out / 'serve.md'}")


def _line(s: dict) -> str:
    lat = s["latency_ms"]
    return (
        f"{s['endpoint']} concurrency {s['concurrency']}: {s['requests_per_s']:.1f} req/s, "
        f"{s['candidates_per_s']:,.0f} candidates/s, p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
        f"{s['errors']} errors"
    )


def _markdown(context: dict, scenarios: list[dict]) -> str:
    lines = [
        f"# plerec serve: throughput and latency ({context['date']})",
        "",
        f"{context['model']}; {context['candidates_per_request']} candidates per request (/rank returns the top "
        f"{context['top_k']}); server with {context['server_threads']} torch thread(s); load generator "
        f"(asyncio + httpx, closed loop) on the same {context['machine']['cpus']}-core machine; torch "
        f"{context['torch']}, Python {context['python']}. Load average before {context['load_avg_before'][0]:.2f}, "
        f"after {context['load_avg_after'][0]:.2f}.",
        "",
        "| endpoint | in flight | requests/s | candidates/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scenarios:
        lat = s["latency_ms"]
        lines.append(
            f"| {s['endpoint']} | {s['concurrency']} | {s['requests_per_s']:.1f} | {s['candidates_per_s']:,.0f} | "
            f"{lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} | {s['errors']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
