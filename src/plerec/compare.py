"""`plerec compare`: every model for every seed on identical splits, single-task baselines included.

Each run writes its own folder (runs/MODEL/seedS) and a `run.json` when it finishes, so an
interrupted comparison resumes where it stopped and a rerun trains nothing new, as long as the run's
experiment and data are unchanged (plerec.fingerprint); a run of another experiment or other data is set
aside and trained again.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from plerec.balancing import check_balancing
from plerec.checkpoint import differences
from plerec.config import BALANCING_METHODS, Experiment, carried_model_keys, key_defaults
from plerec.distributed import SINGLE_PROCESS
from plerec.errors import did_you_mean
from plerec.fingerprint import data_changes, data_fingerprint, run_fingerprint
from plerec.models import MODELS, MultiTaskModel
from plerec.report.summary import PREDICTIONS_FILE
from plerec.safe_io import atomic_write, atomic_write_text
from plerec.train import PreparedData, fit, predict, prepare_data, write_json

BASELINE = "single"
FINGERPRINT_FILE = "fingerprint.json"  # written when a run starts; run.json holds it too once the run is done
RESULT_COLUMNS = ("model", "seed", "task", "metric", "split", "value")


@dataclass(slots=True)
class Run:
    """One finished training run: its metrics per split and its gates' expert utilisation."""

    model: str
    seed: int
    metrics: dict[str, dict[str, dict[str, float]]]  # split -> task -> metric -> value
    history: list[dict]
    experts: list[dict]  # {"gate", "expert", "mean", "std"} over the test split


def parse_models(text: str | Sequence[str]) -> list[str]:
    """Model names from `a,b,c`, validated against the registry; the single-task baseline comes first."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    for name in names:
        if name not in MODELS:
            raise ValueError(
                f"Unknown model `{name}` in --models.{did_you_mean(name, MODELS)} Expected any of: {', '.join(MODELS)}"
            )
    ordered = [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]
    return ordered


def parse_balancing(text: str | Sequence[str]) -> list[str]:
    """Balancing methods from `a,b,c` (--balancing), validated against [train] balancing's methods."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ValueError(f"Expected --balancing to name methods such as fixed,uncertainty, but got {text!r}")
    for name in names:
        if name not in BALANCING_METHODS:
            raise ValueError(
                f"Unknown balancing method `{name}` in --balancing.{did_you_mean(name, BALANCING_METHODS)} "
                f"Expected any of: {', '.join(BALANCING_METHODS)}"
            )
    return list(dict.fromkeys(names))


def run_name(model: str, balancing: str) -> str:
    """How a comparison names a run (its folder runs/NAME/seedS and its rows): the model, and `+METHOD` when
    it is trained with a balancing method other than `fixed` (`ple+pcgrad`)."""
    return model if balancing == "fixed" else f"{model}+{balancing}"


def model_params(exp: Experiment, name: str, overrides: dict[str, dict] | None = None) -> dict:
    """The hyperparameters of `name` in a comparison: the experiment's [model] keys that apply to it,
    `bottom_dims` equal to the experts' widths (so baselines get the same layer widths), then any
    per-model overrides."""
    source = asdict(exp.model)
    valid = {f.name for f in fields(MODELS[name].config)}
    params = carried_model_keys(source, name, exp.model_name)
    widths = source.get("expert_dims")
    if source.get("levels"):
        widths = source["levels"][0]["expert_dims"]
    if "bottom_dims" in valid and "bottom_dims" not in source and widths:
        params["bottom_dims"] = tuple(widths) * (2 if name in ("cross_stitch", "sluice") else 1)
    if name == BASELINE:  # [baseline] sets the single-task structure where it says so
        params.update({k: v for k, v in asdict(exp.baseline).items() if v is not None})
    params.update((overrides or {}).get(name, {}))
    return params


def gate_sums(model: MultiTaskModel, tables: Sequence, batch_size: int = 16384) -> tuple[int, dict[str, dict]]:
    """Over every row of `tables` (EncodedTables, batched onto the model's device): the number of rows and, per
    gate, the float64 sums of its weights ("w", (E,)), of their squares ("w2", (E,)) and of each row's
    entropy −Σ w·log w in nats ("entropy", a scalar). Empty for a model without gates."""
    sums: dict[str, dict] = {}
    if not model.gate_experts():
        return 0, sums
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for table in tables:
            for start in range(0, len(table), batch_size):
                batch = table.batch(slice(start, start + batch_size)).to(device)
                for gate, w in model.gate_weights(*batch.inputs).items():
                    w = w.double()  # (B, E)
                    found = sums.setdefault(gate, {"w": 0, "w2": 0, "entropy": 0})
                    found["w"] = found["w"] + w.sum(0)
                    found["w2"] = found["w2"] + w.square().sum(0)
                    found["entropy"] = found["entropy"] + -(w * w.clamp_min(1e-300).log()).sum()
    return sum(len(table) for table in tables), sums


def task_renamer(task_names: Sequence[str] | None) -> Callable[[str], str]:
    """`task{k}` in a gate's or expert's name as task k's name (`L0.task1.0` -> `L0.marital.0`)."""
    if not task_names:
        return lambda text: text
    return lambda text: re.sub(r"task(\d+)", lambda m: task_names[int(m.group(1))], text)


def expert_utilisation(
    model: MultiTaskModel, data, batch_size: int = 16384, task_names: Sequence[str] | None = None
) -> list[dict]:
    """Paper §5.3: for every gate, the mean and standard deviation of the weight it gives each expert
    over all rows of `data` (an EncodedTable). With `task_names`, `task{k}` in gate and expert names
    becomes the task's name (`L0.task1.0` -> `L0.marital.0`)."""
    n, sums = gate_sums(model, [data], batch_size)
    rename = task_renamer(task_names)
    rows = []
    for gate, experts in model.gate_experts().items():
        mean = sums[gate]["w"] / n
        std = (sums[gate]["w2"] / n - mean.square()).clamp_min(0).sqrt()
        for i, expert in enumerate(experts):
            rows.append({"gate": rename(gate), "expert": rename(expert), "mean": float(mean[i]), "std": float(std[i])})
    return rows


def compare(
    exp: Experiment,
    models: Sequence[str],
    seeds: int,
    out: str | Path,
    *,
    model_overrides: dict[str, dict] | None = None,
    data: PreparedData | None = None,
    log: Callable[[str], None] | None = None,
    balancing: str | Sequence[str] | None = None,
    finished_only: bool = False,
) -> list[Run]:
    """Train every model for `seeds` seeds (exp.seed, exp.seed+1, …) on one split; return every run.

    The split and the encoder are made once, so every model sees identical rows; seeds change only
    the initialisation and the shuffling. Finished runs found under `out` are loaded, not retrained, when
    their fingerprint (experiment and data) is this run's; other runs are moved to FOLDER.previous first.
    With `balancing` (methods of [train] balancing), every model but the single-task baseline is trained
    with each method, as runs named by `run_name`; without it, with the experiment's own method. The
    baseline has one task per network, nothing to balance: it is trained with `fixed`. With `finished_only`,
    nothing is trained: every run must be finished under `out` for this experiment and data, or it is an
    error naming the run (the tables of the seeds done so far, while a long run goes on).
    """
    say = log or (lambda _msg: None)
    if seeds < 1:
        raise ValueError(f"Expected --seeds >= 1, but got {seeds}")
    models = parse_models(models)
    methods = parse_balancing(balancing) if balancing is not None else [exp.train.balancing]
    plan = [
        (name, method, replace(exp.train, balancing=method))
        for name in models
        for method in (["fixed"] if name == BASELINE else methods)
    ]
    for _name, _method, train in plan:  # a method this experiment cannot run fails now, not after hours
        check_balancing(replace(exp, train=train), SINGLE_PROCESS)
    out = Path(out)
    files = data_fingerprint(exp.data)  # before reading: the data as the runs begin
    data = data or prepare_data(exp)
    runs = []
    for model, method, train in plan:
        params = model_params(exp, model, model_overrides)
        name = run_name(model, method)
        for seed in range(exp.seed, exp.seed + seeds):
            run_dir = out / "runs" / name / f"seed{seed}"
            record = run_dir / "run.json"
            run_exp = replace(exp.with_model(model, params), seed=seed, train=train)
            fingerprint = run_fingerprint(run_exp, files)
            changes = _changes_since(run_dir, fingerprint)
            if record.exists() and not changes:
                say(f"{name} seed {seed}: already done, skipped")
                stored = json.loads(record.read_text())
                stored.pop("fingerprint", None)
                runs.append(Run(**stored))
                continue
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            if finished_only:
                why = f"the experiment or data changed since it ran ({shown})" if changes else "it has no run.json"
                raise ValueError(
                    f"Expected a finished run of {name} seed {seed} in {run_dir} (--finished-only trains nothing), "
                    f"but {why}: run without --finished-only to train it, or ask for fewer seeds"
                )
            if changes:
                kept = _set_aside(run_dir)
                say(
                    f"{name} seed {seed}: the experiment or data changed since it ran ({shown}), training again "
                    f"(the earlier run is kept in {kept})"
                )
            else:
                say(f"{name} seed {seed}: training")
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / FINGERPRINT_FILE, fingerprint)
            watch = _compare_observers(run_exp, out, run_dir, f"{name}-seed{seed}")
            # an interrupted run continues
            result = fit(run_exp, data, out_dir=run_dir, log=say, resume=True, observers=watch)
            run = Run(
                model=name,
                seed=seed,
                metrics=result.metrics,
                history=result.history,
                experts=(
                    expert_utilisation(result.model, data.splits["test"], task_names=[t.name for t in exp.tasks])
                    if "test" in data.splits
                    else []
                ),
            )
            if data.has("test"):  # for the per-seed significance tests against the single-task model
                write_predictions(run_dir / PREDICTIONS_FILE, result.model, data, "test", exp.train.eval_batch_size)
            write_json(record, {**asdict(run), "fingerprint": fingerprint})
            runs.append(run)
    return runs


def _changes_since(run_dir: Path, fingerprint: dict) -> list[str]:
    """What differs between the experiment and data a run folder was trained on and `fingerprint`: empty for
    a folder that is absent or holds no run yet. A run without a fingerprint (an older plerec) differs."""
    record, started = run_dir / "run.json", run_dir / FINGERPRINT_FILE
    if record.exists():
        saved = json.loads(record.read_text()).get("fingerprint")
    elif started.exists():
        saved = json.loads(started.read_text())
    elif run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        saved = None
    else:
        return []
    if not isinstance(saved, dict):
        return ["it records no fingerprint of its experiment and data (written by an older plerec)"]
    changes = differences(saved.get("experiment") or {}, fingerprint["experiment"], defaults=key_defaults())
    changes += [f"data file {file}: {what}" for file, what in data_changes(saved.get("data"), fingerprint["data"])]
    return changes


def _set_aside(run_dir: Path) -> Path:
    """Move a run folder out of the way (to FOLDER.previous, replacing an older one there), so that its
    checkpoints are never resumed from and the run starts afresh."""
    kept = run_dir.with_name(run_dir.name + ".previous")
    if kept.is_dir() and not kept.is_symlink():
        shutil.rmtree(kept)
    run_dir.rename(kept)
    return kept


def write_predictions(path: Path, model: MultiTaskModel, data: PreparedData, split: str, batch_size: int) -> None:
    """The split's `predictions` (N, T) float64 (logits of binary tasks, values of regression tasks), `labels`
    (N, T) float64 and `mask` (N, T) bool, in row order: the same rows for every model and seed."""
    if split in data.splits:
        tables = [data.splits[split]]
    else:
        from plerec.data.stream import local_eval_chunks

        tables = list(local_eval_chunks(data.streams[split], data.encoder))
    arrays = {
        "predictions": torch.cat([predict(model, t, batch_size) for t in tables]).double().numpy(),
        "labels": torch.cat([t.labels for t in tables]).double().numpy(),
        "mask": torch.cat([t.label_mask for t in tables]).numpy(),
    }
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def write_results_csv(runs: Sequence[Run], path: str | Path, summary=None) -> None:
    """One row per measurement: model, seed, task, metric, split, value (test and validation splits).

    With a `summary` (report.summary.Summary), its split's MTL gains follow, on each task's primary
    metric M (auc or mse), for every model but the baseline:
      - per (model, seed, task): `gain_M` (Eq. 11 against the single-task model of that seed) and, where
        the per-seed test ran, `p_delong` (AUC) or `p_bootstrap` (MSE), its two-sided p-value;
      - per (model, task) with seed = "all": `gain_M_mean`, and with two or more seeds `gain_M_sd`,
        `gain_M_ci_low` and `gain_M_ci_high` (the confidence interval over seeds, 1 − alpha).
    """
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(RESULT_COLUMNS)
    for run in runs:
        for split in ("test", "valid"):
            for task, values in run.metrics.get(split, {}).items():
                for metric, value in values.items():
                    if metric != "n":
                        writer.writerow([run.model, run.seed, task, metric, split, repr(float(value))])
    if summary is not None:
        _write_gain_rows(writer, summary)
    atomic_write_text(path, f.getvalue())


def _write_gain_rows(writer, summary) -> None:
    split = summary.split
    for (model, task), test in summary.tests.items():
        gain = f"gain_{test.metric}"
        for seed, value, p in zip(test.seeds, test.gains, test.p_values, strict=True):
            writer.writerow([model, seed, task, gain, split, repr(float(value))])
            if p is not None:
                writer.writerow([model, seed, task, f"p_{test.test}", split, repr(float(p))])
        ci = test.interval
        aggregate = [("mean", ci.mean), ("sd", ci.sd), ("ci_low", ci.low), ("ci_high", ci.high)]
        for name, value in aggregate:
            if value is not None:
                writer.writerow([model, "all", task, f"{gain}_{name}", split, repr(float(value))])


def write_experts_csv(runs: Sequence[Run], path: str | Path) -> None:
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(["model", "seed", "gate", "expert", "mean", "std"])
    for run in runs:
        for row in run.experts:
            writer.writerow([run.model, run.seed, row["gate"], row["expert"], row["mean"], row["std"]])
    atomic_write_text(path, f.getvalue())


def check_seesaw_tasks(exp: Experiment, tasks: Sequence[str] | None) -> list[str]:
    """The two tasks of the seesaw chart (default: the first two), checked before anything trains."""
    names = [t.name for t in exp.tasks]
    chosen = list(tasks) if tasks else names[:2]
    for task in chosen:
        if task not in names:
            raise ValueError(
                f"Seesaw task `{task}` is not a task of the experiment.{did_you_mean(task, names)} "
                f"Tasks: {', '.join(names)}"
            )
    if tasks and len(chosen) != 2:
        raise ValueError(f"Expected two seesaw tasks (--seesaw A,B), but got {chosen}")
    return chosen


def _compare_observers(exp: Experiment, out: Path, run_dir: Path, name: str) -> list:
    """With [train] mlflow: every run of the comparison in one MLflow store and experiment (train.mlflow_uri,
    else a file store in OUT/mlruns; train.mlflow_experiment, else "compare OUT"), named MODEL-seedS (with
    balancing methods, MODEL+METHOD-seedS) and tagged with the comparison's folder."""
    if not exp.train.mlflow:
        return []
    from plerec.tracking import MLflowObserver

    uri = exp.train.mlflow_uri or (out / "mlruns").resolve().as_uri()
    experiment = exp.train.mlflow_experiment or f"compare {out.resolve().name}"
    watch = replace(exp, train=replace(exp.train, mlflow_uri=uri, mlflow_experiment=experiment))
    return [MLflowObserver.for_run(watch, run_dir, run_name=name, tags={"plerec.compare": str(out.resolve())})]


def write_comparison(
    runs: Sequence[Run],
    exp: Experiment,
    out: str | Path,
    seesaw_tasks: Sequence[str] | None = None,
    *,
    data: PreparedData | None = None,
):
    """Write results.csv, experts.csv, summary.md, seesaw.png, experts.png, curves.png, reliability.png (binary
    tasks, with [evaluate] calibration_bins) and report.html, which also records the data, its size (from
    `data` where given, else the rows the runs recorded), the experiment and the date.

    Per-seed significance tests read each run's out/runs/MODEL/seedS/test_predictions.npz; runs
    without one keep their gains and intervals, and their verdicts say they are untested.
    """
    from plerec.report.html import write_report
    from plerec.report.plots import curves_plot, experts_plot, reliability_plot, reliability_records, seesaw_plot
    from plerec.report.run import data_source, experiment_text, hyperparameter_details, rows_text, split_rows, utc_now
    from plerec.report.summary import load_predictions, predictions_loader, summarize, summary_markdown
    from plerec.single_task import one_task_experiment
    from plerec.train import monitor_name

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = check_seesaw_tasks(exp, seesaw_tasks)
    summary = summarize(runs, exp.task_kinds, predictions=predictions_loader(out))
    write_results_csv(runs, out / "results.csv", summary)
    write_experts_csv(runs, out / "experts.csv")
    markdown = summary_markdown(summary, title=f"Comparison: {Path(exp.source).name or 'experiment'}")
    atomic_write_text(out / "summary.md", markdown)
    images = []
    if len(tasks) == 2:
        seesaw_plot(summary, tasks[0], tasks[1], out / "seesaw.png")
        images.append(("Seesaw chart", out / "seesaw.png"))
    expert_rows = [{"model": r.model, "seed": r.seed, **row} for r in runs for row in r.experts]
    experts_plot(expert_rows, out / "experts.png")
    images.append(("Expert utilisation", out / "experts.png"))
    task_monitors = {t.name: monitor_name(one_task_experiment(exp, k)) for k, t in enumerate(exp.tasks)}
    curves_plot(runs, out / "curves.png", monitor_name(exp), task_monitors)
    images.append(("Training curves", out / "curves.png", "Colour: the model; line style: the seed."))
    if exp.evaluate.calibration_bins:
        records = reliability_records(out, runs, exp.task_kinds, exp.evaluate.calibration_bins)
        if reliability_plot(records, out / "reliability.png"):
            images.append(("Reliability of the predicted probabilities (test split)", out / "reliability.png"))
    if data is not None:
        rows = split_rows(data)
    else:  # what the runs recorded: the validation rows of an epoch, the test rows of the saved predictions
        valid = next((h.get("valid_rows") for r in runs for h in r.history if h.get("valid_rows")), None)
        saved = next((a for r in runs if (a := load_predictions(out / "runs" / r.model / f"seed{r.seed}"))), None)
        rows = {"train": None, "valid": valid, "test": None if saved is None else len(saved[0])}
    details = [
        ("written", utc_now()),
        ("data", data_source(exp)),
        ("data size", rows_text(rows)),
        ("tasks", ", ".join(f"{name} ({kind})" for name, kind in exp.task_kinds.items())),
        ("models", ", ".join(dict.fromkeys(r.model for r in runs))),
        ("seeds", ", ".join(str(s) for s in sorted({r.seed for r in runs}))),
        *hyperparameter_details(exp, model=False),  # each model's keys differ (model_params)
    ]
    appendix = [
        (
            "Hyperparameters (the comparison's experiment; each run's own, its model's keys included, "
            "is runs/MODEL/seedS/experiment.toml)",
            experiment_text(exp),
        )
    ]
    write_report(out / "report.html", "plerec comparison", markdown, images, details=details, appendix=appendix)
    return summary


def sweep(
    exp: Experiment,
    correlations: Sequence[float],
    models: Sequence[str],
    seeds: int,
    out: str | Path,
    *,
    model_overrides: dict[str, dict] | None = None,
    log: Callable[[str], None] | None = None,
    finished_only: bool = False,
) -> list[dict]:
    """Paper Fig. 7: the same comparison on synthetic data regenerated at every task correlation.

    The experiment's data file must come from `plerec synth` (its generator settings are read from the
    file and only the correlation changes). Writes one comparison folder per correlation, sweep.csv,
    sweep.md and sweep.png; returns one row per (correlation, model, task) with the MTL gain. With
    `finished_only`, from the finished runs alone (see `compare`).
    """
    from plerec.data.synth import read_synth_metadata, write_parquet
    from plerec.report.plots import sweep_plot
    from plerec.report.summary import format_gain

    say = log or (lambda _msg: None)
    source = exp.data.path
    if not source:
        raise ValueError("A sweep needs [data] `path` to name one synthetic file from `plerec synth`")
    if exp.data.test:  # the file is regenerated at every correlation, a test file would not be
        raise ValueError(
            f"Expected a sweep's [data] `path` without a `test` file (its data is regenerated at every "
            f"correlation and split three ways), but got test={exp.data.test!r}"
        )
    synth = read_synth_metadata(source) if Path(source).suffix in (".parquet", ".pq") else None
    if synth is None:
        raise ValueError(
            f"{source} has no correlation parameter (no `plerec synth` metadata), so it cannot be regenerated "
            "at other correlations; write it with `plerec synth --out FILE` first"
        )
    models = parse_models(models)
    out = Path(out)
    rows = []
    cells: dict[tuple, str] = {}  # (correlation, model, task) -> sweep.md cell; (correlation, model) -> verdict
    for p in correlations:
        config = replace(synth, correlation=float(p))
        folder = out / f"corr{float(p):g}"
        data_path = out / "data" / f"corr{float(p):g}.parquet"
        if not data_path.exists():
            write_parquet(config, data_path)
        say(f"correlation {p:g}: {data_path}")
        exp_p = replace(exp, data=replace(exp.data, path=str(data_path)))
        runs = compare(
            exp_p, models, seeds, folder, model_overrides=model_overrides, log=say, finished_only=finished_only
        )
        summary = write_comparison(runs, exp_p, folder)  # tested on the runs' folder-local test predictions
        for (model, task), test in summary.tests.items():
            rows.append(
                {
                    "correlation": float(p),
                    "model": model,
                    "task": task,
                    "gain_mean": test.interval.mean,
                    "gain_std": summary.gains[model, task].std,
                    "gain_ci_low": test.interval.low,
                    "gain_ci_high": test.interval.high,
                    "seeds": test.interval.n,
                    "verdict": test.verdict,
                    "model_verdict": summary.verdict(model),
                }
            )
            cells[float(p), model, task] = f"{format_gain(test.interval)} {test.verdict}"
            cells[float(p), model] = summary.verdict(model)
    f = io.StringIO(newline="")
    columns = ["correlation", "model", "task", "gain_mean", "gain_std", "gain_ci_low", "gain_ci_high", "seeds"]
    writer = csv.DictWriter(f, fieldnames=[*columns, "verdict", "model_verdict"])  # ci empty with one seed
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep.csv", f.getvalue())
    sweep_plot(rows, list(exp.task_kinds), out / "sweep.png")
    lines = [
        "MTL gain per task: mean [95 % confidence interval over seeds] and the task's verdict; "
        "the rule is stated in each correlation folder's summary.md.",
        "",
        "| correlation | model | " + " | ".join(f"gain {t}" for t in exp.task_kinds) + " | verdict |",
        "|" + "---|" * (len(exp.task_kinds) + 3),
    ]
    for p in correlations:
        for model in models[1:]:
            shown = [cells.get((float(p), model, task), "—") for task in exp.task_kinds]
            verdict = cells.get((float(p), model), "—")
            lines.append(f"| {float(p):g} | {model} | " + " | ".join(shown) + f" | {verdict} |")
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    return rows
