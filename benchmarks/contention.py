"""A short `plerec train` under CPU contention: torch's OpenMP settings, before and after plerec's defaults.

    python benchmarks/contention.py                  # 1-4 min on 2 cores; prints a Markdown table
    python benchmarks/contention.py --rows 20000 --dim 64 --epochs 2 --busy 2 --limit 60 --out /tmp/contention
    python benchmarks/contention.py --settings "plerec default"                  # one setting only

It writes `plerec synth` data (--rows rows), then trains the demo's PLE on it for --epochs epochs with
`--quiet`, each run in a fresh process, under three settings, each first without and then next to
--busy competitor processes (`while True: pass`, one per core by default, started and killed here and
ending by themselves after --limit seconds in any case):

- `libgomp default`: torch imported before plerec, so that plerec's default (GOMP_SPINCOUNT=1000,
  set when plerec is imported) comes too late and libgomp's own default applies: threads that finish
  their part of a parallel region spin for a while before they sleep (what plerec did before);
- `plerec default`: `python -m plerec train`, as a user runs it;
- `threads = 1`: `--set train.threads=1`.

For each run: wall seconds, CPU seconds (user + system of the training process) and the training steps'
own seconds (`train_seconds` of metrics.json); a run still going after --limit seconds is stopped and shown
as such (the wall time is then a lower bound). On a machine shared with other work the numbers move
from run to run; the ratios between the settings are what the script is for. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPERIMENT = """\
seed = 0

[data]
path = "{data}"
split = [0.7, 0.15, 0.15]

[features]
numeric = ["x*"]

[[tasks]]
name = "y1"
kind = "regression"
label = "y1"

[[tasks]]
name = "y2"
kind = "regression"
label = "y2"

[model]
name = "ple"
expert_dims = [64]
tower_dims = [32]

[train]
lr = 1e-3
batch_size = 256
epochs = {epochs}
"""

# torch (and with it libgomp, which reads OMP_* once, when it is loaded) before plerec's defaults.
TORCH_FIRST = "import sys, torch; from plerec.cli import main; sys.exit(main(sys.argv[1:]))"
SETTINGS = {
    "libgomp default": (["-c", TORCH_FIRST], []),
    "plerec default": (["-m", "plerec"], []),
    "threads = 1": (["-m", "plerec"], ["--set", "train.threads=1"]),
}


def run_train(prefix: list[str], extra: list[str], exp: Path, out: Path, limit: float) -> dict:
    """One training process: its wall and CPU seconds (from wait4) and its train_seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    args = [sys.executable, *prefix, "train", str(exp), "--out", str(out), "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = start + limit
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    cpu = usage.ru_utime + usage.ru_stime
    if wall > limit:  # killed: the time it had run is a lower bound
        return {"wall": wall, "cpu": cpu, "train": math.nan, "killed": True}
    if code != 0:
        raise SystemExit(f"{' '.join(args)} failed ({code}): {proc.stderr.read().decode()[-2000:]}")
    train_seconds = json.loads((out / "metrics.json").read_text())["train_seconds"]
    return {"wall": wall, "cpu": cpu, "train": train_seconds, "killed": False}


def competitors(count: int, limit: float) -> list[subprocess.Popen]:
    spin = f"import time\nend = time.time() + {limit}\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="competitor processes")
    parser.add_argument("--dim", type=int, default=64, help="input dimension of the synthetic data")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a training may run before it is killed")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    root = args.out or Path(tempfile.mkdtemp(prefix="plerec-contention-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "synth.parquet"
    synth = ["synth", "--out", str(data), "--rows", str(args.rows), "--dim", str(args.dim)]
    subprocess.run([sys.executable, "-m", "plerec", *synth], check=True, stdout=subprocess.DEVNULL)
    exp = root / "exp.toml"
    exp.write_text(EXPERIMENT.format(data=data, epochs=args.epochs))

    rows = []
    for load in ("no competitor", f"{args.busy} competitors"):
        for name in args.settings.split(","):
            prefix, extra = SETTINGS[name]
            out = root / f"run-{len(rows)}"
            busy = competitors(args.busy, args.limit) if load != "no competitor" else []
            try:
                time.sleep(0.3 if busy else 0)  # the competitors running before training starts
                result = run_train(prefix, extra, exp, out, args.limit)
            finally:
                for proc in busy:
                    proc.kill()
                    proc.wait()
            rows.append((load, name, result))
            print(f"{load:>14} | {name:<15} | {_row(result)}", file=sys.stderr, flush=True)

    print(
        f"\n{args.rows} rows (d={args.dim}), {args.epochs} epochs, {os.cpu_count()} CPUs, load average at the start: "
        f"{' '.join(load_before)}\n"
    )
    print("| machine | setting | wall s | CPU s | train_seconds |")
    print("|---|---|---:|---:|---:|")
    for load, name, r in rows:
        print(f"| {load} | {name} | {_row(r).replace(' s', '')} |")
    return 0


def _row(r: dict) -> str:
    if r["killed"]:
        return f"> {r['wall']:.1f} s (killed) | {r['cpu']:.1f} s | -"
    return f"{r['wall']:.1f} s | {r['cpu']:.1f} s | {r['train']:.1f} s"


if __name__ == "__main__":
    raise SystemExit(main())
