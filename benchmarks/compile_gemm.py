#!/usr/bin/env python3
"""Inductor's GEMM choices on the benchmark's model body: eager (oneDNN/MKL through ATen) against
`torch.compile` with the default mode and with max-autotune (Inductor times its CPU GEMM templates against
ATen's kernels for every matrix product and keeps the faster one).

    python benchmarks/compile_gemm.py --out DIR [--models ple,mmoe] [--batch-size 1024] [--steps 60]

For each model and variant, in its own process (so one compile does not warm another's caches), with an
empty Inductor cache: the seconds to the end of the first compiled step, then the median of `--steps`
training steps of the body alone (forward, the sum of its outputs, backward, no optimiser) after 5 warm-up
steps, and which GEMM implementation max-autotune chose (Inductor's "autotune" log). Writes DIR/compile_gemm.json
and DIR/compile_gemm.md. The body is the benchmark's (run.py ARCH) on a (batch, 328) input: the 20 fields'
16-wide embeddings and 8 numeric fields.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import SIMD_FLAGS
from run import ARCH, machine

VARIANTS = ("eager", "default", "max-autotune")
IN_DIM = 20 * ARCH["embedding_dim"] + 8


def body_of(model_name: str):
    """The benchmark's model (run.py ARCH) over 20 fields and 8 numeric ones; its dense body."""
    from plerec.models import build_model

    arch = {k: ARCH[k] for k in ("embedding_dim", "expert_dims", "tower_dims")} | ARCH[model_name]
    model = build_model(model_name, arch, [1000] * 20, 8, 2)
    assert model.input.out_dim == IN_DIM, model.input.out_dim
    return model.body


def measure(model_name: str, variant: str, batch: int, steps: int, threads: int) -> dict:
    """One variant in this process: compile seconds (first step) and the median step."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    body = body_of(model_name).train()
    run = body
    if variant != "eager":
        run = torch.compile(body, dynamic=False, mode=None if variant == "default" else "max-autotune-no-cudagraphs")
    x = torch.randn(batch, IN_DIM, requires_grad=True)

    def step() -> float:
        started = time.perf_counter()
        run(x).sum().backward()
        return time.perf_counter() - started

    first = step()
    for _ in range(5):
        step()
    times = [step() for _ in range(steps)]
    return {
        "model": model_name,
        "variant": variant,
        "batch_size": batch,
        "first_step_seconds": first,
        "step_ms": statistics.median(times) * 1e3,
        "step_ms_min": min(times) * 1e3,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def autotune_choices(log: str) -> list[dict]:
    """Each autotuned product with its choices [(kernel, ms)], fastest first, from Inductor's log."""
    found: list[dict] = []
    for line in log.splitlines():
        if line.startswith("AUTOTUNE "):
            found.append({"product": line.removeprefix("AUTOTUNE ").strip(), "choices": []})
        elif found and line.startswith("  ") and " ms " in line:
            name, ms = line.split()[:2]
            found[-1]["choices"].append([name, float(ms)])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="ple,mmoe")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.batch_size, args.steps, args.threads)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for model_name in args.models.split(","):
        for variant in args.variants.split(","):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(args.threads)}
                env.pop("TORCH_LOGS", None)
                if variant == "max-autotune":
                    env["TORCH_LOGS"] = "+autotuning"
                command = [sys.executable, __file__, "--out", str(args.out), "--one", model_name, variant]
                command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
                command += ["--threads", str(args.threads)]
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    results.append({"model": model_name, "variant": variant, "error": done.stderr[-2000:]})
                    print(f"{model_name} {variant}: FAILED\n{done.stderr[-2000:]}", flush=True)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["process_seconds"] = time.perf_counter() - started
                # What max-autotune picked: Inductor logs each product ("AUTOTUNE bmm(shapes)") and then its
                # choices, one indented line each ("  name time ms relative %"), the fastest first.
                result["autotune"] = autotune_choices(done.stderr)
                results.append(result)
                print(
                    f"{model_name} {variant}: first step {result['first_step_seconds']:.1f} s, "
                    f"step {result['step_ms']:.2f} ms (min {result['step_ms_min']:.2f})",
                    flush=True,
                )
    context = {**machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_end": os.getloadavg()}
    simd = [f for f in context["cpu_flags"] if f.startswith(SIMD_FLAGS)]
    (args.out / "compile_gemm.json").write_text(json.dumps({"context": context, "results": results}, indent=2) + "\n")
    lines = [
        "# Inductor GEMM choices on the benchmark's model body",
        "",
        f"{context['date']} · {context['cpu']} (flags: {' '.join(simd)}) · {args.threads} threads · "
        f"batch {args.batch_size} · body forward + backward, median of {args.steps} steps after 5 warm-up steps; "
        "compile: the first step, from an empty cache, in its own process.",
        "",
        "| model | variant | first step s (compile) | step ms (median) | step ms (min) | vs eager |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed |||")
            continue
        eagers = [e for e in results if (e["model"], e["variant"]) == (r["model"], "eager") and "error" not in e]
        eager = eagers[0] if eagers else None
        ratio = f"{eager['step_ms'] / r['step_ms']:.2f}×" if eager else "—"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['first_step_seconds']:.1f} | {r['step_ms']:.2f} "
            f"| {r['step_ms_min']:.2f} | {ratio} |"
        )
    for r in results:
        picks = [(a["product"], a["choices"][0][0]) for a in r.get("autotune", []) if a["choices"]]
        if picks:
            template = sum(1 for _, kernel in picks if kernel.startswith("cpp_"))
            lines += [
                "",
                f"{r['model']} max-autotune: {len(picks)} products autotuned, Inductor's C++ template fastest in "
                f"{template}, ATen's kernel in {len(picks) - template}: "
                + "; ".join(f"{product} → {kernel}" for product, kernel in picks),
            ]
    (args.out / "compile_gemm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
