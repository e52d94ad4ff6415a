#!/usr/bin/env python3
"""Speed, memory and accuracy of plerec against torch-rechub and DeepCTR-Torch on one synthetic data set.

    python benchmarks/run.py --out DIR [--rows N]          # the comparison: DIR/results.json, DIR/results.md
    python benchmarks/run.py --out DIR --scaling           # plerec's training time at 250k, 1M and 4M rows
    python benchmarks/run.py --out DIR --sequence          # the sequence case: one 50-element history field

Runs with any Python >= 3.11: it creates benchmarks/.venv-peers (torch pinned by the repository's
constraints.txt, the PyPI releases of the peers, plerec installed editable) and runs every
measurement there, each in its own process. See benchmarks/README.md for the protocol.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv-peers"
REQUIREMENTS = HERE / "requirements-peers.txt"
CONSTRAINTS = ROOT / "constraints.txt"

sys.path.insert(0, str(HERE))  # report.py, beside this file, whichever folder the script is run from
from report import PEERS, PLEREC, PLEREC_VARIANTS  # noqa: E402  (the libraries' names: one definition)

PLEREC_OWN = tuple(PLEREC_VARIANTS)
OWN_TRAINERS = (*PLEREC_OWN, *PEERS)
ON_PLEREC_BATCHING = ("torch-rechub+plerec-batching", "deepctr-torch+plerec-batching", "plerec+plain-loop")
LIBRARIES = OWN_TRAINERS + ON_PLEREC_BATCHING
MODELS = ("ple", "mmoe")
BATCH_SIZES = (1024, 4096)
ARCH = {  # mirrored in worker.py, which builds every model from its own copy
    "embedding_dim": 16,
    "expert_dims": [256, 128],
    "tower_dims": [64],
    "ple": {"num_levels": 2, "num_task_experts": 1, "num_shared_experts": 1},
    "mmoe": {"num_experts": 3},
}
SCALING_ROWS = (250_000, 1_000_000, 4_000_000)
# The sequence case: the data set gets the history column hist_item_ids (datagen.py --history) and every
# library its own sequence feature, mean-pooled over the item field's table; only the libraries' own trainers.
SEQUENCE_LIBRARIES = OWN_TRAINERS
SEQUENCE_DEFAULT_LIBRARIES = (PLEREC, "torch-rechub", "deepctr-torch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and work files")
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows (test: rows / 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration: one full epoch + short ones")
    parser.add_argument(
        "--short-rows", type=int, default=None, help="training rows of the repeat runs (default: rows / 10, >= 1000)"
    )
    parser.add_argument(
        "--libraries", default=None, help="default: all (with --sequence: plerec and the peers; with --scaling: plerec)"
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument(
        "--full-epoch",
        default=",".join(OWN_TRAINERS),
        help="libraries whose first run trains one epoch on all rows (the others: short runs only)",
    )
    parser.add_argument(
        "--auc-seeds",
        type=int,
        default=1,
        help="full-epoch runs per configuration, seeds --seed, --seed + 1, ...: AUC as mean ± sd over them",
    )
    parser.add_argument("--scaling", action="store_true", help="time plerec's training at 250k, 1M and 4M rows instead")
    parser.add_argument("--scaling-rows", default=",".join(map(str, SCALING_ROWS)))
    parser.add_argument(
        "--sequence",
        action="store_true",
        help="the sequence case: a 50-element history field beside the others, mean-pooled by every library",
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds before one measurement is abandoned")
    parser.add_argument("--report-only", action="store_true", help="rebuild DIR/results.* from DIR/work, run nothing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep what DIR/work already holds (plerec snapshot, encoder, ceiling, finished measurements)",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    python = ensure_env()
    if args.report_only:
        report_only(args.out, python)
        return 0
    if args.scaling:
        run_scaling(args, python)
    else:
        run_comparison(args, python, started)
    print(f"wall time: {(time.perf_counter() - started) / 60:.1f} min")
    return 0


# ---------------------------------------------------------------------------------------------
# The peers' environment


def ensure_env() -> Path:
    """benchmarks/.venv-peers with the peers, plerec (editable) and torch pinned; reinstalled when the
    requirements, the constraints or plerec's pyproject change."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in (REQUIREMENTS, CONSTRAINTS, ROOT / "pyproject.toml"))
    ).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    if not python.exists():
        log(f"creating {VENV.relative_to(ROOT)}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    log("installing torch-rechub, deepctr-torch and plerec (torch pinned by constraints.txt)")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), "-r", str(REQUIREMENTS), "-e", str(ROOT)],
        check=True,
    )
    stamp.write_text(digest)
    return python


SNAPSHOT: Path | None = None  # a copy of src/plerec that every child process imports


def snapshot_plerec(work: Path, resume: bool = False) -> str:
    """Copy src/plerec into the work folder and make every child import that copy: plerec's source
    may change while a long run goes on, and all measurements of one run must use the same code.
    When resuming, the copy already there is kept."""
    global SNAPSHOT
    SNAPSHOT = work / "plerec_src"
    if not (resume and (SNAPSHOT / "plerec").is_dir()):
        shutil.rmtree(SNAPSHOT, ignore_errors=True)
        shutil.copytree(ROOT / "src" / "plerec", SNAPSHOT / "plerec", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((SNAPSHOT / "plerec").rglob("*.py")):
        digest.update(path.relative_to(SNAPSHOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if SNAPSHOT is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SNAPSHOT), env.get("PYTHONPATH", "")]))
    return env


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def make_data(
    python: Path,
    folder: Path,
    rows: int,
    seed: int,
    heads: dict[str, int],
    test_rows: int | None,
    history: bool = False,
) -> dict:
    """Generate the data set unless `folder` already holds the same one (same rows, seed, heads and
    history column or none)."""
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        wanted = {"train": rows, **heads}
        same = meta["seed"] == seed and bool(meta.get("lists")) == history
        if same and all(meta["rows"].get(k) == v for k, v in wanted.items()):
            if test_rows is None or meta["rows"]["test"] == test_rows:
                log(f"reusing the data set in {folder}")
                return meta
    log(f"generating {rows:,} training rows in {folder}")
    cmd = [str(python), str(HERE / "datagen.py"), "--out", str(folder), "--rows", str(rows), "--seed", str(seed)]
    cmd += [f"--head={name}={n}" for name, n in heads.items()]
    if test_rows is not None:
        cmd += ["--test-rows", str(test_rows)]
    if history:
        cmd.append("--history")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(meta_path.read_text())


# ---------------------------------------------------------------------------------------------
# Measurements


def measure(python: Path, spec: dict, work: Path, name: str, timeout: int, resume: bool = False) -> dict:
    """Run one worker process; its result, or a record of its failure. With `resume`, a successful
    result of the same spec already in `work` is returned instead."""
    spec_path, result_path, log_path = work / f"{name}.spec.json", work / f"{name}.json", work / f"{name}.log"
    if resume and result_path.exists():
        done = json.loads(result_path.read_text())
        if "error" not in done and all(done.get(k) == v for k, v in spec.items()):
            done["resumed"] = True
            return done
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        with log_path.open("w") as out:
            proc = subprocess.run(
                [str(python), str(HERE / "worker.py"), str(spec_path), str(result_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(spec["threads"]),
                timeout=timeout,
                cwd=work,
            )
        error = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout} s"
    wall = time.perf_counter() - started
    if error is None and result_path.exists():
        result = json.loads(result_path.read_text())
        result["process_seconds"] = wall
        return result
    tail = log_path.read_text().strip().splitlines()[-5:] if log_path.exists() else []
    return {**spec, "error": error or "no result written", "log_tail": tail, "process_seconds": wall}


def run_comparison(args: argparse.Namespace, python: Path, started: float) -> None:
    if args.sequence:
        libraries = split(args.libraries or ",".join(SEQUENCE_DEFAULT_LIBRARIES), SEQUENCE_LIBRARIES)
    else:
        libraries = split(args.libraries or ",".join(LIBRARIES), LIBRARIES)
    models = split(args.models, MODELS)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    full_epoch = set(split(args.full_epoch, LIBRARIES)) & set(libraries)
    short_rows = args.short_rows or max(1_000, args.rows // 10)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    load_before = os.getloadavg()
    source_digest = snapshot_plerec(work, args.resume)

    meta = make_data(python, args.out / "data", args.rows, args.seed, {"train_head": short_rows}, None, args.sequence)
    fields = len(meta["categorical"]) + len(meta.get("lists", {}))  # a list field pools into one embedding
    in_dim = fields * ARCH["embedding_dim"] + len(meta["numeric"])

    ceiling_spec = {
        "threads": args.threads,
        "arch": ARCH,
        "in_dim": in_dim,
        "num_tasks": len(meta["tasks"]),
        "batch_size": 1024,
        "models": models,
    }
    (work / "ceiling.spec.json").write_text(json.dumps(ceiling_spec))
    before = work / "ceiling-before.json"
    if args.resume and before.exists():
        ceiling_runs = [{c["model"]: c for c in json.loads(before.read_text())}]
    else:
        ceiling_runs = [measure_ceiling(python, work, "before", args.threads)]

    base = {
        "data": str((args.out / "data").resolve()),
        "threads": args.threads,
        "seed": args.seed,
        "compile_cache": str((work / "inductor").resolve()),  # plerec-compile only: cold in round 0, then warm
    }
    encoder_path = work / "plerec_encoder.json"
    if any(lib in PLEREC_OWN or lib in ON_PLEREC_BATCHING for lib in libraries) and not (
        args.resume and encoder_path.exists()
    ):
        # Short runs read the head of the training file but keep the vocabularies of the whole file, so
        # the model (and its embedding tables) has the same size in every run of a configuration.
        log("fitting plerec's encoder on the whole training file (for the short runs)")
        spec = {**base, "library": PLEREC, "model": models[0], "batch_size": 1024, "train_file": "train.parquet"}
        (work / "encoder.spec.json").write_text(json.dumps(spec))
        command = [str(python), str(HERE / "worker.py"), "--save-encoder", str(work / "encoder.spec.json")]
        subprocess.run(
            [*command, str(encoder_path)],
            check=True,
            env=child_env(args.threads),
        )

    configs = [(lib, model, bs) for model in models for bs in batch_sizes for lib in libraries]
    runs: dict[tuple[str, str, int], list[dict]] = {c: [] for c in configs}
    # Round 0 trains every configuration on all rows; later rounds repeat on the head of the file.
    # Rounds rather than configurations outermost, so a slow spell of the machine hits every library.
    plan = [(r, c) for r in range(args.repeats) for c in configs if r > 0 or c[0] in full_epoch]
    plan += [(r, c) for r in range(args.repeats, args.repeats + 1) for c in configs if c[0] not in full_epoch]
    # More seeds (model initialisation and batch order; the data stay): full epochs only, for the AUC's spread.
    plan += [(-s, c) for s in range(1, args.auc_seeds) for c in configs if c[0] in full_epoch]
    for i, (r, (lib, model, bs)) in enumerate(plan, 1):
        full = r <= 0
        spec = {**base, "library": lib, "model": model, "batch_size": bs}
        spec["train_file"] = "train.parquet" if full else "train_head.parquet"
        if not full and (lib in PLEREC_OWN or lib in ON_PLEREC_BATCHING):
            spec["encoder"] = str(encoder_path.resolve())
        kind = "full" if full else "short"
        spec["seed"] = args.seed - min(r, 0)  # round -s: seed + s
        name = f"{lib}-{model}-{bs}-" + (f"s{-r}" if r < 0 else f"r{r}")
        result = measure(python, spec, work, name, args.timeout, args.resume)
        result["kind"] = kind
        runs[(lib, model, bs)].append(result)
        if "error" in result:
            log(f"[{i}/{len(plan)}] {name}: FAILED ({result['error']}) {' | '.join(result['log_tail'])}")
        elif result.get("resumed"):
            log(f"[{i}/{len(plan)}] {name}: kept from the interrupted run")
        else:
            log(
                f"[{i}/{len(plan)}] {name} ({kind}, {result['train_rows']:,} rows): "
                f"train {result['train_samples_per_s']:,.0f}/s, infer {result['infer_samples_per_s']:,.0f}/s, "
                f"RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB, AUC "
                + ", ".join(f"{t} {v:.4f}" for t, v in result["auc"].items())
                + f" ({result['process_seconds']:.0f} s)"
            )

        if r == 0 and i == sum(1 for p in plan if p[0] == 0) and all("error" in rs[0] for rs in runs.values() if rs):
            raise SystemExit(f"run.py: every full-epoch run failed; see the logs in {work}")

    # The ceiling again at the end: a busy spell of the machine can only make it lower, so the higher
    # of the two is kept (which makes plerec's fraction of it conservative).
    ceiling_runs.append(measure_ceiling(python, work, "after", args.threads))
    context = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(python),
        "plerec_source_sha256": source_digest,
        "data": meta,
        "rows": args.rows,
        "short_rows": short_rows,
        "repeats": args.repeats,
        "auc_seeds": args.auc_seeds,
        "threads": args.threads,
        "full_epoch_libraries": sorted(full_epoch),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started,
        "resumed": args.resume,
        "case": "sequence" if args.sequence else "main",
    }
    write_comparison(args.out, configs, runs, ceiling_runs, context)


def write_comparison(out: Path, configs: list, runs: dict, ceiling_runs: list[dict], context: dict) -> None:
    """results.json, context.json and results.md from the runs; the markdown is also printed."""
    from report import comparison_markdown, summarise

    ceilings = {}
    for model in sorted({c[1] for c in configs}, key=list(MODELS).index):
        candidates = [run[model] for run in ceiling_runs if model in run]
        # per precision, the higher of the measurements (a busy spell only lowers one): the fp32 figures of the
        # best fp32 measurement, the bf16 ones (keys ending in _bf16) of the best bf16 measurement where there is one
        for suffix in ("", "_bf16"):
            key = f"ceiling_samples_per_s{suffix}"
            measured = [c for c in candidates if key in c]
            if measured:
                best = max(measured, key=lambda c: c[key])
                ceilings.setdefault(model, {}).update(
                    {k: v for k, v in best.items() if k.endswith("_bf16") == bool(suffix)}
                )
                ceilings[model][f"{key}_measured"] = [c[key] for c in measured]
    records = [summarise(lib, model, bs, runs[(lib, model, bs)]) for (lib, model, bs) in configs]
    for record in records:
        record["case"] = context.get("case", "main")
    ple = ceilings.get("ple", {})
    ceiling_record = {
        "ceiling_samples_per_s": ple.get("ceiling_samples_per_s"),
        "batch_size": 1024,
        "model": "ple",
        "threads": context["threads"],
        "train_flops_per_sample": ple.get("train_flops_per_sample"),
        "achievable_gflops": ple.get("achievable_gflops"),
        "all_models": ceilings,
    }
    context = {
        **context,
        "plerec_train_config": next(
            (r["plerec_train_config"] for rs in runs.values() for r in rs if "plerec_train_config" in r), None
        ),
    }
    (out / "results.json").write_text(json.dumps([*records, ceiling_record], indent=2) + "\n")
    (out / "context.json").write_text(json.dumps(context, indent=2) + "\n")
    markdown = comparison_markdown(records, ceiling_record, context)
    (out / "results.md").write_text(markdown)
    print()
    print(markdown)


def report_only(out: Path, python: Path) -> None:
    """Rebuild results.* from the per-process results in OUT/work, e.g. after an interrupted run."""
    work = out / "work"
    meta = json.loads((out / "data" / "meta.json").read_text())
    runs: dict[tuple[str, str, int], list[dict]] = {}
    repeats: dict[tuple[str, str, int], int] = {}  # the -r runs only: the -s runs are the extra seeds
    for path in sorted([*work.glob("*-r[0-9]*.json"), *work.glob("*-s[0-9]*.json")]):
        if path.name.endswith(".spec.json"):
            continue
        result = json.loads(path.read_text())
        result["kind"] = "full" if result["train_file"] == "train.parquet" else "short"
        key = (result["library"], result["model"], result["batch_size"])
        runs.setdefault(key, []).append(result)
        repeats[key] = repeats.get(key, 0) + bool(re.search(r"-r\d+$", path.stem))
    configs = [
        (lib, model, bs)
        for model in MODELS
        for bs in sorted({k[2] for k in runs})
        for lib in LIBRARIES
        if (lib, model, bs) in runs
    ]
    ceiling_runs = [{c["model"]: c for c in json.loads(p.read_text())} for p in sorted(work.glob("ceiling-*.json"))]
    previous = json.loads((out / "context.json").read_text()) if (out / "context.json").exists() else {}
    any_run = next(iter(runs.values()))[0]
    context = {
        "date": previous.get("date") or dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": previous.get("machine") or machine(),
        "versions": previous.get("versions") or versions(python),
        "plerec_source_sha256": previous.get("plerec_source_sha256", "?"),
        "data": meta,
        "rows": meta["rows"]["train"],
        "short_rows": meta["rows"].get("train_head"),
        "repeats": max(repeats.values()),
        "auc_seeds": max(sum(r["kind"] == "full" for r in v) for v in runs.values()),
        "threads": any_run["threads"],
        "full_epoch_libraries": sorted({k[0] for k, v in runs.items() if any(r["kind"] == "full" for r in v)}),
        "load_average_before": previous.get("load_average_before"),
        "load_average_after": previous.get("load_average_after"),
        "wall_seconds": previous.get("wall_seconds"),
        "rebuilt_from_work_files": True,
        "case": previous.get("case") or ("sequence" if meta.get("lists") else "main"),
    }
    write_comparison(out, configs, runs, ceiling_runs, context)


def measure_ceiling(python: Path, work: Path, name: str, threads: int) -> dict[str, dict]:
    log(f"measuring the compute ceiling ({threads} threads, {name} the runs)")
    out = work / f"ceiling-{name}.json"
    subprocess.run(
        [str(python), str(HERE / "ceiling.py"), str(work / "ceiling.spec.json"), str(out)],
        check=True,
        env=child_env(threads),
    )
    return {c["model"]: c for c in json.loads(out.read_text())}


def run_scaling(args: argparse.Namespace, python: Path) -> None:
    """plerec PLE, batch 1024, one epoch, on the first 250k, 1M and 4M rows of one generated stream."""
    sizes = [int(n) for n in args.scaling_rows.split(",")]
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    source_digest = snapshot_plerec(work)
    heads = {f"train_{n}": n for n in sizes}
    meta = make_data(python, args.out / "scaling_data", max(sizes), args.seed, heads, 20_000)
    base = {"data": str((args.out / "scaling_data").resolve()), "threads": args.threads, "seed": args.seed}
    base["compile_cache"] = str((work / "inductor").resolve())  # plerec-compile: cold at the first size, then warm
    libraries = split(args.libraries or PLEREC, PLEREC_OWN)
    results = []
    for n in sizes:
        for lib in libraries:
            spec = {**base, "library": lib, "model": "ple", "batch_size": 1024, "train_file": f"train_{n}.parquet"}
            name = f"scaling-{n}" if lib == PLEREC else f"scaling-{lib}-{n}"
            result = measure(python, spec, work, name, args.timeout)
            results.append(result)
            if "error" in result:
                log(f"scaling {lib} {n:,} rows: FAILED ({result['error']})")
                continue
            compiled = result.get("plerec_compiled") or {}
            log(
                f"scaling {lib} {n:,} rows: {result['train_seconds']:.1f} s, {result['train_samples_per_s']:,.0f} "
                "samples/s" + (f", compile {compiled['compile_seconds']:.1f} s" if compiled.get("compiled") else "")
            )
    from report import scaling_markdown

    context = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(python),
        "threads": args.threads,
        "plerec_source_sha256": source_digest,
        "data": meta,
    }
    (args.out / "scaling.json").write_text(json.dumps({"context": context, "runs": results}, indent=2) + "\n")
    markdown = scaling_markdown(results, context)
    (args.out / "scaling.md").write_text(markdown)
    print()
    print(markdown)


def split(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    for item in items:
        if item not in allowed:
            raise SystemExit(f"run.py: error: expected one of {', '.join(allowed)}, but got {item!r}")
    return items


def cpu_identity(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's name, family and model numbers (x86: "AMD EPYC" names Zen 4 and Zen 5 alike, the
    numbers tell them apart; "" where absent) and flags, from one read of `path`; the platform's processor
    name and no flags where it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {"name": platform.processor(), "family_model": "", "flags": []}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = (part.strip() for part in line.partition(":"))
        fields.setdefault(key, value)
    numbered = {"cpu family", "model"} <= set(fields)
    return {
        "name": fields.get("model name", ""),
        "family_model": f"family {fields['cpu family']}, model {fields['model']}" if numbered else "",
        "flags": (fields.get("flags") or fields.get("Features") or "").split(),
    }


def machine() -> dict:
    """The CPU (`cpu_identity`), cores, memory and platform."""
    cpu = cpu_identity()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {
        "cpu": cpu["name"],
        "cpu_family_model": cpu["family_model"],
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "platform": platform.platform(),
        "cpu_flags": cpu["flags"],
    }


def versions(python: Path) -> dict:
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({p: m.version(p) for p in ('plerec', 'torch', 'torch-rechub', 'deepctr-torch', 'numpy')}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, env=child_env(1))
    return {**json.loads(out.stdout), "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
