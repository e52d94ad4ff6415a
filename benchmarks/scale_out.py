"""Scale-out benchmark: streaming Parquet training at 1x, 4x and 16x a base size, and 1 vs 2 processes.

    python benchmarks/scale_out.py --out runs/scale_out [--base-rows 100000]

Each measurement is its own `plerec train` process (or `torchrun` with its workers); peak RSS is the
largest resident set of any process of the run (getrusage of the waited-for descendants). Writes
DIR/scale_out.json and DIR/scale_out.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NUM_SPARSE, NUM_DENSE = 8, 4
VOCAB = [10, 100, 1_000, 5_000, 20, 200, 2_000, 50_000]
ROW_GROUP = 25_000

EXPERIMENT = """
seed = 0
[data]
train = "{train}"
valid = "{valid}"
streaming = true
[features]
categorical = ["c*"]
numeric = ["d*"]
[[tasks]]
name = "click"
kind = "binary"
label = "click"
[[tasks]]
name = "buy"
kind = "binary"
label = "buy"
space = "click == 1"
[model]
name = "ple"
embedding_dim = 16
expert_dims = [128, 64]
tower_dims = [32]
[train]
batch_size = 1024
epochs = 1
patience = 0
progress = false
threads = {threads}
"""


def write_rows(path: Path, rows: int, seed: int) -> None:
    """Synthetic impressions written row group by row group, so writing needs no more memory than reading."""
    rng = np.random.default_rng(seed)
    hidden = [rng.normal(size=v) for v in VOCAB]
    writer = None
    for start in range(0, rows, ROW_GROUP):
        n = min(ROW_GROUP, rows - start)
        ids = [np.minimum(rng.zipf(1.3, n) - 1, v - 1) for v in VOCAB]
        dense = rng.normal(size=(n, NUM_DENSE)).astype(np.float32)
        score = sum(h[i] for h, i in zip(hidden, ids, strict=True)) * 0.3 + dense[:, 0] - 1.8
        click = (rng.random(n) < 1 / (1 + np.exp(-score))).astype(np.int8)
        buy = np.where(click == 1, (rng.random(n) < 1 / (1 + np.exp(-(score - 1.5)))).astype(np.float32), np.nan)
        columns = {f"c{j}": ids[j].astype(np.int32) for j in range(NUM_SPARSE)}
        columns.update({f"d{j}": dense[:, j] for j in range(NUM_DENSE)})
        columns.update(click=click, buy=buy)
        table = pa.table(columns)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=ROW_GROUP)
    writer.close()


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and the peak RSS (bytes) of the largest process the command started."""
    probe = (
        "import resource, subprocess, sys, json; "
        "rc = subprocess.run(json.loads(sys.argv[1])).returncode; "
        "print(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(cmd)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    rc, maxrss_kib = json.loads(done.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"{cmd} failed with exit status {rc}")
    return seconds, maxrss_kib * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base-rows", type=int, default=100_000)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    valid = out / "valid.parquet"
    if not valid.exists():
        write_rows(valid, 20_000, seed=99)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    records = []
    for factor in (1, 4, 16):
        rows = args.base_rows * factor
        train = out / f"train_{factor}x.parquet"
        if not train.exists():
            write_rows(train, rows, seed=factor)
        exp = out / f"exp_{factor}x.toml"
        for procs in (1, 2) if factor == 4 else (1,):
            threads = 2 // procs
            exp.write_text(EXPERIMENT.format(train=train, valid=valid, threads=threads))
            run_dir = out / f"run_{factor}x_{procs}p"
            plerec = ["-m", "plerec", "train", str(exp), "--out", str(run_dir), "--quiet"]
            if procs == 1:
                cmd = [sys.executable, *plerec]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *plerec]
            seconds, peak = measure(cmd, env)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            record = {
                "rows": rows,
                "file_bytes": train.stat().st_size,
                "processes": procs,
                "threads_per_process": threads,
                "peak_rss_bytes": peak,
                "train_seconds": metrics["train_seconds"],
                "train_samples_per_s": rows / metrics["train_seconds"],
                "wall_seconds": seconds,
                "test_auc_click": metrics["tasks"]["click"].get("auc"),
            }
            records.append(record)
            print(json.dumps(record), flush=True)
    (out / "scale_out.json").write_text(json.dumps(records, indent=2) + "\n")
    lines = [
        "| rows | Parquet MB | processes x threads | peak RSS MB | train s | train samples/s | click AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['rows']:,} | {r['file_bytes'] / 2**20:.0f} | {r['processes']} x {r['threads_per_process']} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['train_seconds']:.1f} | {r['train_samples_per_s']:,.0f} | "
            f"{r['test_auc_click']:.4f} |"
        )
    (out / "scale_out.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
