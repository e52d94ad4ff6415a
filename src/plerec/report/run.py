"""One training run's page: its curves, metrics, calibration and expert utilisation, with what it was trained
on and how, as one self-contained report.html in the run folder (`plerec train` writes it at the end,
`plerec report RUN_DIR` for an older run)."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w
import torch

from plerec.config import Experiment, experiment_to_dict
from plerec.report.html import write_report
from plerec.report.plots import (
    experts_figure,
    png_bytes,
    reliability_figure,
    run_curves_figure,
    task_reliability,
)

if TYPE_CHECKING:
    from plerec.models import MultiTaskModel
    from plerec.train import PreparedData

REPORT_FILE = "report.html"
SPLITS = ("train", "valid", "test")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _file_time(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def experiment_text(exp: Experiment) -> str:
    """The resolved experiment as TOML: every key, as experiment.toml holds it."""
    return tomli_w.dumps(experiment_to_dict(exp))


def split_rows(data: PreparedData) -> dict[str, int]:
    """Rows per split of a plerec.train.PreparedData: counted in memory, or from a streamed Parquet file's
    footer (no row is read)."""
    rows = {split: len(table) for split, table in data.splits.items()}
    for split, path in data.streams.items():
        import pyarrow.parquet as pq

        rows[split] = pq.ParquetFile(path).metadata.num_rows
    return {s: rows[s] for s in SPLITS if s in rows}


def rows_text(rows: Mapping[str, int | None]) -> str:
    """`train 6,000 · valid 2,000 · test 2,000 rows`; a split whose size is unknown says so."""
    shown = [f"{s} {'not recorded' if n is None else f'{n:,}'}" for s, n in rows.items()]
    return " · ".join(shown) + " rows" if shown else "unknown"


TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "epochs", "patience", "balancing")


def _plain_value(value) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list | tuple) else str(value)


def hyperparameter_details(exp: Experiment, *, model: bool = True) -> list[tuple[str, str]]:
    """The keys that shape a run, one line each (the page's appendix holds every key): the model's, the
    training's, and how the best epoch is chosen."""
    from plerec.single_task import one_task_experiment
    from plerec.train import monitor_name

    plain = experiment_to_dict(exp)
    rows = []
    if model:
        keys = {k: v for k, v in plain["model"].items() if k != "name"}
        rows.append(("model keys", ", ".join(f"{k}={_plain_value(v)}" for k, v in keys.items())))
    rows.append(("training", ", ".join(f"{k}={_plain_value(plain['train'][k])}" for k in TRAIN_KEYS)))
    try:
        if exp.model_name == "single" and len(exp.tasks) > 1:
            monitors = [monitor_name(one_task_experiment(exp, k)) for k in range(len(exp.tasks))]
            rows.append(("selected by", "each task its own: " + ", ".join(monitors)))
        else:
            rows.append(("selected by", monitor_name(exp)))
    except ValueError:  # a monitor that does not apply: the run's own error said so
        pass
    return rows


def data_source(exp: Experiment) -> str:
    d = exp.data
    if d.train:
        files = [f"{s}={getattr(d, s)}" for s in SPLITS if getattr(d, s)]
        return ", ".join(files) + (" (streamed)" if d.streaming else "")
    fractions = "/".join(f"{f:g}" for f in d.split)
    return f"{d.path}, split {fractions}" + (f", test={d.test}" if d.test else "")


def read_run_json(path: Path, what: str, keys: Sequence[str]) -> dict:
    """A JSON object the run folder holds, with `keys`; a ValueError naming the file and what was expected."""
    if not path.is_file():
        raise ValueError(f"Expected {path} ({what}) in the run folder, but it does not exist")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Expected {path} to be JSON ({what}), but it cannot be read: {err}") from err
    missing = [k for k in keys if not isinstance(value, dict) or k not in value]
    if missing:
        raise ValueError(
            f"Expected {path} ({what}) to hold the keys {', '.join(keys)}, but {', '.join(missing)} missing"
        )
    return value


def read_history(run_dir: Path) -> dict:
    """history.json, checked: `best_epoch` (a number, or one per task) and `epochs`, records of one epoch each."""
    path = run_dir / "history.json"
    what = "the per-epoch history `plerec train` writes"
    history = read_run_json(path, what, ("best_epoch", "epochs"))
    epochs = history["epochs"]
    records = isinstance(epochs, list) and all(
        isinstance(r, dict) and {"epoch", "train_loss", "valid"} <= r.keys() for r in epochs
    )
    if not records or not epochs:
        raise ValueError(
            f"Expected `epochs` in {path} to be a non-empty list of records with epoch, train_loss and valid, "
            f"but got {str(epochs)[:80]}"
        )
    return history


def is_count(key: str) -> bool:
    """`n` (rows in a task's space) and `cvr_n` (the clicked rows a funnel's CVR is scored on) are counts."""
    return key == "n" or key.endswith("_n")


def _metrics_markdown(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """| task | metric | valid | test |: every metric of every held-out split, `n` (rows in the task's space) last."""
    splits = [s for s in ("valid", "test") if s in metrics]
    tasks = list(dict.fromkeys(t for s in splits for t in metrics[s]))
    lines = ["| task | metric | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for task in tasks:
        keys = list(dict.fromkeys(k for s in splits for k in metrics[s].get(task, {})))
        for key in sorted(keys, key=is_count):
            cells = [_number(metrics[s].get(task, {}).get(key), is_count(key)) for s in splits]
            shown = "rows" if key == "n" else key.removesuffix("_n") + " rows" if is_count(key) else key
            lines.append(f"| {task} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value, whole: bool) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return f"{int(value):,}" if whole else f"{value:.4f}"


def _scored_split(data) -> str | None:
    return next((s for s in ("test", "valid") if s in data.splits), None)


def _reliability(model, table, exp: Experiment, split: str) -> list[dict]:
    from plerec.train import predict

    logits = predict(model, table, exp.train.eval_batch_size).double().numpy()
    labels, mask = table.labels.double().numpy(), table.label_mask.numpy()
    tasks = task_reliability(logits, labels, mask, exp.task_kinds, exp.evaluate.calibration_bins)
    return [{"model": exp.model_name, "seed": exp.seed, "reliability": {split: tasks}}] if tasks else []


def _utilisation(model, table, exp: Experiment) -> list[dict]:
    from plerec.compare import expert_utilisation

    if not model.gate_experts():
        return []
    rows = expert_utilisation(model, table, exp.train.eval_batch_size, task_names=[t.name for t in exp.tasks])
    return [{"model": exp.model_name, "seed": exp.seed, **row} for row in rows]


def _best_text(best: int | Mapping[str, int], epochs: int) -> str:
    if isinstance(best, Mapping):
        return ", ".join(f"{task} {e}" for task, e in best.items()) + f" (each task its own) of {epochs} run"
    return f"{best} of {epochs} run"


def write_run_report(
    run_dir: str | Path,
    *,
    model: MultiTaskModel | None = None,
    data: PreparedData | None = None,
    exp: Experiment | None = None,
    out: str | Path | None = None,
) -> Path:
    """Write the page of the training run in `run_dir` (as `plerec train` leaves it) to `out` (default
    run_dir/report.html), atomically, and return its path.

    With the trained `model`, its `data` (plerec.train.PreparedData) and `exp`, as `train` has them at its end,
    nothing is read again; without them, the model and experiment come from run_dir/best.pt and the data is
    prepared again from the experiment's files. The calibration and the expert utilisation score the test
    split (else the valid split) in memory; with streamed data, or data that cannot be read any more, the page
    says what it leaves out rather than failing."""
    from plerec.train import load_checkpoint, prepare_data

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"Expected a run folder written by `plerec train`, but {run_dir} is not a folder")
    history = read_history(run_dir)
    notes: list[str] = []
    if model is None or exp is None:
        checkpoint = run_dir / "best.pt"
        if not checkpoint.is_file():
            raise ValueError(
                f"Expected {checkpoint} (the run's best checkpoint) in the run folder, but it does not exist"
            )
        loaded, encoder, saved_exp = load_checkpoint(checkpoint)
        model = model if model is not None else loaded
        exp = exp if exp is not None else saved_exp
        if data is None:
            try:
                data = prepare_data(exp, encoder=encoder)
            except (OSError, ValueError) as err:
                notes.append(
                    f"The data could not be read again ({err}): its size, the calibration and the expert "
                    "utilisation are left out."
                )
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = read_run_json(metrics_path, "the held-out metrics `plerec train` writes", ("splits",))["splits"]
        trained = f"{_file_time(metrics_path)} (finished)"
    else:
        best = history["best_epoch"]
        epoch = best if isinstance(best, int) else max(best.values())
        record = next((r for r in history["epochs"] if r["epoch"] == epoch), history["epochs"][-1])
        metrics = {"valid": record["valid"]}
        trained = f"{_file_time(run_dir / 'history.json')} (last epoch written; not finished)"
        notes.append(
            "metrics.json is missing (the run has not finished): the table shows the validation metrics "
            f"of the best epoch so far ({record['epoch']})."
        )

    epochs = history["epochs"]
    details = [
        ("run folder", str(run_dir)),
        ("model", f"{exp.model_name}, {sum(p.numel() for p in model.parameters()):,} parameters"),
        ("seed", str(exp.seed)),
        ("trained", trained),
        ("report written", utc_now()),
        ("data", data_source(exp)),
        ("data size", rows_text(split_rows(data)) if data is not None else "not read"),
        ("tasks", ", ".join(f"{name} ({kind})" for name, kind in exp.task_kinds.items())),
        ("best epoch", _best_text(history["best_epoch"], len(epochs)) + f" ({exp.train.epochs} planned)"),
        *hyperparameter_details(exp),
    ]
    images: list = [("Training curves", png_bytes(run_curves_figure(epochs, history["best_epoch"])))]

    split = _scored_split(data) if data is not None else None
    if data is not None and split is None:
        notes.append(
            f"The data is streamed ({', '.join(data.streams)} read a row group at a time, nothing kept in "
            "memory): the calibration plot and the expert utilisation, which score a split in memory, "
            "are left out."
        )
    if split is not None:
        table = data.splits[split]
        with torch.inference_mode():
            records = _reliability(model, table, exp, split) if exp.evaluate.calibration_bins else []
            rows = _utilisation(model, table, exp)
        figure = reliability_figure(records, split) if records else None
        if figure is not None:
            caption = f"Reliability of the predicted probabilities ({split} split)"
            note = f"{exp.evaluate.calibration_bins} equal-width probability bins; the diagonal is a calibrated model."
            images.append((caption, png_bytes(figure), note))
        if rows:
            images.append((f"Expert utilisation ({split} split)", png_bytes(experts_figure(rows, split))))
    title = f"Training run: {exp.model_name}, seed {exp.seed}"
    markdown = f"# {title}\n## Metrics\n{_metrics_markdown(metrics)}"
    appendix = [("Hyperparameters (the resolved experiment)", experiment_text(exp))]
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    write_report(out, f"plerec run: {run_dir.name}", markdown, images, details=details, notes=notes, appendix=appendix)
    return out
