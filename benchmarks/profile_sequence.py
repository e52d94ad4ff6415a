"""Where plerec's training time goes in the sequence case (not a test, not part of run.py's numbers).

    benchmarks/.venv-peers/bin/python benchmarks/profile_sequence.py --data DIR/data --out DIR/profile

On a data set of `run.py --sequence` (datagen.py --history), through plerec's `fit` as worker.py drives it
(the experiment is worker.py's), each variant in this one process:

1. fit without the profiler: the experiment as measured (the history mean-pooled over `c01`'s table), the
   same without the history field, and (last, as it is process-wide) with the history under
   `torch.set_flush_denormal(True)`; every one with its time per training step over the epoch;
2. torch.profiler over two windows of 20 training steps of a fit with the history (an early one and one
   near the end of the epoch; its test file is the small validation file), the step's parts marked by
   wrapping (in this process only) plerec's `MultiTaskModel.forward`, `FeatureInput.forward`, the loss,
   `Tensor.backward` and the optimisers' `step`: the time per part, the backward nodes and the operators
   by self time with their input shapes;
3. after that fit, where denormal floats sit: in the parameters and in every module's output on one batch.

Writes profile.md (and profile.json) to --out.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import worker  # noqa: E402  (the experiment exactly as the benchmark builds it)

PARTS = {
    "model forward (all)": ("plerec.models.family", "MultiTaskModel", "forward"),
    "input forward: embeddings + list pooling": ("plerec.models.layers", "FeatureInput", "forward"),
    "loss": ("plerec.train", None, "masked_task_losses"),
    "backward (all)": ("torch", "Tensor", "backward"),
    "optimiser step: Adam (dense parameters)": ("plerec.optim", "Adam", "step"),
    "optimiser step: RowSparseAdam (embedding rows)": ("plerec.optim", "RowSparseAdam", "step"),
}


def experiment(
    meta: dict, data_dir: Path, model: str, batch_size: int, train_file: str, threads: int, library: str = "plerec"
) -> dict:
    spec = {"library": library, "model": model, "batch_size": batch_size, "train_file": train_file}
    spec.update(seed=0, threads=threads)
    return worker.plerec_experiment(spec, meta, data_dir)


STEP_CLOCK: list[float] = []  # perf_counter at every training step's dense optimiser step
WINDOW = 20  # profiled steps per window


def clock_steps() -> None:
    """Record the time of each training step: plerec.optim.Adam.step of the first Adam seen (one per step)."""
    from plerec.optim import Adam

    original = Adam.step

    @functools.wraps(original)
    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not FIRST_ADAM:
            FIRST_ADAM.append(self)
        if self is FIRST_ADAM[0]:
            STEP_CLOCK.append(time.perf_counter())
            for hook in STEP_HOOKS:
                hook()
        return out

    Adam.step = step


STEP_HOOKS: list = []
FIRST_ADAM: list = []  # the dense optimiser of the fit going on


def fit_once(exp_dict: dict) -> dict:
    from plerec.config import experiment_from_dict
    from plerec.train import fit, prepare_data

    exp = experiment_from_dict(exp_dict)
    data = prepare_data(exp)
    rows = len(data.splits["train"])
    STEP_CLOCK.clear()
    FIRST_ADAM.clear()
    result = fit(exp, data)
    return {
        "train_rows": rows,
        "train_seconds": result.train_seconds,
        "samples_per_s": rows / result.train_seconds,
        "test_auc": {t: m["auc"] for t, m in result.metrics["test"].items()},
        "step_ms": step_windows(),
        "model": result.model,
    }


def step_windows(size: int = 25) -> list[tuple[int, float]]:
    """(first step, mean milliseconds per step) over consecutive windows of `size` steps."""
    gaps = [b - a for a, b in zip(STEP_CLOCK, STEP_CLOCK[1:], strict=False)]
    return [(i + 1, 1e3 * sum(gaps[i : i + size]) / len(gaps[i : i + size])) for i in range(0, len(gaps), size)]


def mark(label: str, owner, name: str) -> None:
    """Wrap owner.name in a profiler range called `label`."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def summarise_window(prof) -> dict:
    events = prof.key_averages()
    parts = {e.key: e.cpu_time_total / 1e6 / WINDOW for e in events if e.key in PARTS}
    ops = sorted(
        (e for e in prof.key_averages(group_by_input_shape=True) if not e.key.startswith("autograd::engine")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    ops = [e for e in ops if e.key not in PARTS and not e.key.startswith("ProfilerStep")]
    top = [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:100],
            "calls": e.count,
            "ms_per_step": e.self_cpu_time_total / 1e3 / WINDOW,
        }
        for e in ops[:25]
    ]
    nodes = sorted(
        (e for e in events if e.key.startswith("autograd::engine::evaluate_function")),
        key=lambda e: e.cpu_time_total,
        reverse=True,
    )
    nodes = [
        {"node": e.key.split(": ", 1)[-1], "calls": e.count, "ms_per_step": e.cpu_time_total / 1e3 / WINDOW}
        for e in nodes[:12]
    ]
    return {"parts_s_per_step": parts, "top_ops": top, "backward_nodes": nodes}


def profiled_fit(exp_dict: dict, steps: int) -> tuple[list[dict], dict]:
    """Two profiled windows of WINDOW steps (early, and near the end of the epoch) of one fit; the fit."""
    from torch.profiler import ProfilerAction

    exp_dict = copy.deepcopy(exp_dict)
    exp_dict["data"]["test"] = exp_dict["data"]["valid"]  # the final evaluation hardly counts
    global WINDOW
    WINDOW = max(1, min(WINDOW, (steps - 6) // 2))  # two windows fit in a short epoch too
    starts = [3, max(3 + WINDOW + 2, steps - WINDOW - 2)]

    def schedule(step: int) -> ProfilerAction:
        for first in starts:
            if step == first - 1:
                return ProfilerAction.WARMUP
            if first <= step < first + WINDOW:
                return ProfilerAction.RECORD_AND_SAVE if step == first + WINDOW - 1 else ProfilerAction.RECORD
        return ProfilerAction.NONE

    windows: list[dict] = []
    for label, (module, cls, name) in PARTS.items():
        owner = importlib.import_module(module)
        mark(label, getattr(owner, cls) if cls else owner, name)
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        record_shapes=True,
        schedule=schedule,
        on_trace_ready=lambda p: windows.append(summarise_window(p)),
    )
    with prof:
        STEP_HOOKS.append(prof.step)
        try:
            run = fit_once(exp_dict)
        finally:
            STEP_HOOKS.clear()
    for first, window in zip(starts, windows, strict=False):
        window["steps"] = [first, first + WINDOW - 1]
    return windows, run


def denormals(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    a = t.detach().abs()
    return int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum())


def denormal_census(model, data_dir: Path, exp_dict: dict) -> dict:
    """Denormal counts in the parameters, and in every module's outputs on one test batch of 1024 rows."""
    from plerec.config import experiment_from_dict
    from plerec.train import prepare_data

    params = {n: (denormals(p), p.numel()) for n, p in model.named_parameters()}
    outputs: dict[str, list[int]] = {}

    def count(obj) -> tuple[int, int]:
        if isinstance(obj, torch.Tensor):
            return denormals(obj), obj.numel() if obj.is_floating_point() else 0
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
        pairs = [count(o) for o in items]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def hook(name):
        def record(module, inputs, output):
            outputs[name] = list(count(output))

        return record

    handles = [m.register_forward_hook(hook(n or "model")) for n, m in model.named_modules()]
    exp = experiment_from_dict(exp_dict)
    test = prepare_data(exp).splits["valid"]
    model.eval()
    with torch.no_grad():
        model(*test.batch(slice(0, 1024)).inputs)
    for h in handles:
        h.remove()
    return {
        "parameters": {n: v for n, v in params.items() if v[0]},
        "module_outputs": {n: v for n, v in outputs.items() if v[0]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the data folder of a run.py --sequence run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-file", default="train.parquet")
    parser.add_argument("--model", default="ple")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--library", default="plerec", help="plerec or one of its benchmark variants (plerec-bf16, plerec-bn-ge, ...)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = args.data.resolve()
    meta = json.loads((data_dir / "meta.json").read_text())
    if not meta.get("lists"):
        raise SystemExit(f"profile_sequence.py: {data_dir} has no list field; make it with run.py --sequence")
    args.out.mkdir(parents=True, exist_ok=True)
    base = experiment(meta, data_dir, args.model, args.batch_size, args.train_file, args.threads, args.library)
    no_history = copy.deepcopy(base)
    no_history["features"]["lists"] = {}
    clock_steps()
    load = [os.getloadavg()[0]]
    timings = {}

    def timed(name: str, exp: dict) -> dict:
        run = fit_once(exp)
        run.pop("model")
        timings[name] = run
        print(f"{name}: {run['samples_per_s']:,.0f} samples/s", flush=True)
        return run

    timed("history, mean pooling (as measured)", base)
    timed("no history field", no_history)
    steps = -(-timings["no history field"]["train_rows"] // args.batch_size)
    windows, run = profiled_fit(base, steps)
    census = denormal_census(run.pop("model"), data_dir, base)
    timings["history, under the profiler (two windows)"] = run
    torch.set_flush_denormal(True)
    timed("history, torch.set_flush_denormal(True)", base)
    load.append(os.getloadavg()[0])

    def ms(runs: dict) -> str:
        return " · ".join(f"{first}: {v:.0f}" for first, v in runs["step_ms"])

    lines = [
        f"# {args.library}'s training step in the sequence case ({args.model.upper()}, batch {args.batch_size}, "
        f"{args.threads} threads, {args.train_file})",
        "",
        f"torch {torch.__version__}; load average {load[0]:.2f} → {load[1]:.2f}.",
        "",
        "## Training throughput (fit's `train_seconds`)",
        "",
        "| variant | training rows | train seconds | samples/s | test AUC |",
        "|---|---:|---:|---:|---|",
        *(
            f"| {k} | {v['train_rows']:,} | {v['train_seconds']:.2f} | {v['samples_per_s']:,.0f} | "
            + ", ".join(f"{t} {a:.4f}" for t, a in v["test_auc"].items())
            + " |"
            for k, v in timings.items()
        ),
        "",
        "## Milliseconds per training step over the epoch (first step of each window of 25: mean ms)",
        "",
        *(f"- {k}: {ms(v)}" for k, v in timings.items()),
        "",
    ]
    for window in windows:
        first, last = window["steps"]
        lines += [
            f"## Profiled steps {first}–{last}: ms per step",
            "",
            "| part (inclusive) | ms per step |",
            "|---|---:|",
            *(f"| {k} | {v * 1e3:.1f} |" for k, v in window["parts_s_per_step"].items()),
            "",
            "| backward node (inclusive) | calls | ms per step |",
            "|---|---:|---:|",
            *(f"| {n['node']} | {n['calls']} | {n['ms_per_step']:.1f} |" for n in window["backward_nodes"]),
            "",
            "| op (self time) | input shapes | calls | ms per step |",
            "|---|---|---:|---:|",
            *(f"| {o['op']} | `{o['shapes']}` | {o['calls']} | {o['ms_per_step']:.2f} |" for o in window["top_ops"]),
            "",
        ]
    lines += [
        "## Denormal floats after the profiled fit (count, of elements)",
        "",
        "| where | denormals | elements |",
        "|---|---:|---:|",
        *(f"| parameter {n} | {v[0]:,} | {v[1]:,} |" for n, v in census["parameters"].items()),
        *(f"| output of {n} (one batch) | {v[0]:,} | {v[1]:,} |" for n, v in census["module_outputs"].items()),
        *(["| none: no parameter and no module output holds one | 0 | |"] if not any(census.values()) else []),
        "",
    ]
    (args.out / "profile.md").write_text("\n".join(lines))
    (args.out / "profile.json").write_text(
        json.dumps({"timings": timings, "windows": windows, "denormals": census, "load": load}, indent=2)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
