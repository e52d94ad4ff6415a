"""Pictures: the seesaw chart (paper Fig. 1/3), expert utilisation (Fig. 8), training curves, the sweep (Fig. 7),
the reliability of binary tasks' probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from plerec.metrics import calibration  # noqa: E402
from plerec.report.summary import Summary, load_predictions  # noqa: E402
from plerec.report.tables import PRIMARY  # noqa: E402
from plerec.safe_io import atomic_write  # noqa: E402


def _save(fig, path: str | Path) -> None:
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(fig)


def seesaw_plot(summary: Summary, task_a: str, task_b: str, path: str | Path) -> None:
    """One point per model at (task A metric, task B metric), error bars = std over seeds."""
    ma, mb = PRIMARY[summary.task_kinds[task_a]], PRIMARY[summary.task_kinds[task_b]]
    fig, ax = plt.subplots(figsize=(6, 5))
    for model in summary.models:
        a, b = summary.metrics.get((model, task_a, ma)), summary.metrics.get((model, task_b, mb))
        if a is None or b is None:
            continue
        ax.errorbar(a.mean, b.mean, xerr=a.std, yerr=b.std, fmt="o", capsize=3, label=model)
        ax.annotate(model, (a.mean, b.mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if ("single", task_a, ma) in summary.metrics and ("single", task_b, mb) in summary.metrics:
        ax.axvline(summary.metrics["single", task_a, ma].mean, color="grey", lw=0.8, ls="--")
        ax.axhline(summary.metrics["single", task_b, mb].mean, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"{task_a} {ma.upper()}" + (" (lower is better)" if ma == "mse" else ""))
    ax.set_ylabel(f"{task_b} {mb.upper()}" + (" (lower is better)" if mb == "mse" else ""))
    ax.set_title("Seesaw chart: dashed lines are the single-task models")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def experts_plot(rows: Sequence[dict], path: str | Path) -> None:
    """One heat map per gated model: gates (rows) by experts (columns), mean weight over test rows."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no gated model in this comparison", ha="center")
        _save(fig, path)
        return
    fig, axes = plt.subplots(
        len(models),
        1,
        figsize=(9, 2.6 * len(models)),
        squeeze=False,
    )
    for ax, model in zip(axes[:, 0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        seed = min(r["seed"] for r in mine)
        mine = [r for r in mine if r["seed"] == seed]
        gates = list(dict.fromkeys(r["gate"] for r in mine))
        experts = list(dict.fromkeys(r["expert"] for r in mine))
        grid = np.full((len(gates), len(experts)), np.nan)
        for r in mine:
            grid[gates.index(r["gate"]), experts.index(r["expert"])] = r["mean"]
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(gates)), gates, fontsize=7)
        ax.set_xticks(range(len(experts)), experts, fontsize=7, rotation=60, ha="right")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.5 else "black")
        ax.set_title(f"{model} (seed {seed}): mean gate weight per expert over the test set", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    _save(fig, path)


def curves_plot(runs, path: str | Path) -> None:
    """Validation monitor per epoch, one line per model and seed."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {}
    for run in runs:
        color = colors.setdefault(run.model, f"C{len(colors) % 10}")
        first_seed = run.seed == min(r.seed for r in runs if r.model == run.model)
        monitors = [h["monitor"] for h in run.history]
        if monitors and isinstance(monitors[0], dict):  # the single-task baseline: one monitor per task
            for i, task in enumerate(monitors[0]):
                points = [(h["epoch"], h["monitor"][task]) for h in run.history if task in h["monitor"]]
                epochs, values = zip(*points, strict=True)
                ax.plot(
                    epochs,
                    values,
                    color=color,
                    alpha=0.8,
                    marker=".",
                    linestyle=("-", "--", ":", "-.")[i % 4],
                    label=f"{run.model} ({task})" if first_seed else None,
                )
            continue
        epochs = [h["epoch"] for h in run.history]
        ax.plot(epochs, monitors, color=color, alpha=0.8, marker=".", label=run.model if first_seed else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation monitor")
    ax.set_title("Training curves (validation metric used for model selection)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def sweep_plot(rows: Sequence[dict], tasks: Sequence[str], path: str | Path) -> None:
    """MTL gain against task correlation, one panel per task, one line per model (paper Fig. 7). Error bars
    are the 95 % intervals over seeds (none with one seed); a filled marker is a significant gain or loss
    by the verdict rule, a hollow one no significant difference."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, model in enumerate(models):
            mine = sorted(
                (r for r in rows if r["model"] == model and r["task"] == task), key=lambda r: r["correlation"]
            )
            if not mine:
                continue
            color = f"C{i % 10}"
            x = [r["correlation"] for r in mine]
            y = [r["gain_mean"] for r in mine]
            has_ci = all(r.get("gain_ci_low") is not None for r in mine)
            yerr = (
                [
                    [m - r["gain_ci_low"] for m, r in zip(y, mine, strict=True)],
                    [r["gain_ci_high"] - m for m, r in zip(y, mine, strict=True)],
                ]
                if has_ci
                else None
            )
            ax.errorbar(x, y, yerr=yerr, capsize=3, label=model, color=color)
            significant = [r.get("verdict") in ("gain", "loss") for r in mine]
            ax.scatter(x, y, color=color, zorder=3, facecolors=[color if s_ else "white" for s_ in significant])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("task correlation p = cos(w1, w2)")
        ax.set_ylabel(f"MTL gain on {task} (95 % interval over seeds)")
        ax.set_title(f"{task} (filled: significant)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def reliability_records(out: str | Path, runs, task_kinds: dict[str, str], bins: int = 10) -> list[dict]:
    """The reliability bins (plerec.metrics.calibration, `bins` equal-width bins) of every binary task of
    every run (objects with .model and .seed) of a comparison folder `out`, from the test predictions each
    run saved (out/runs/MODEL/seedS/test_predictions.npz; a run without them is left out), over each task's
    own sample space: [{"model", "seed", "reliability": {"test": {task: bins}}}], what `reliability_plot`
    reads. The bins of one run's test split are those its metrics.json `ece` was computed from."""
    records = []
    for run in runs:
        arrays = load_predictions(Path(out) / "runs" / run.model / f"seed{run.seed}")
        if arrays is None:
            continue
        predictions, labels, mask = arrays
        tasks = {}
        for t, (task, kind) in enumerate(task_kinds.items()):
            keep = mask[:, t]
            if kind == "binary" and keep.any():
                tasks[task] = calibration(labels[keep, t], predictions[keep, t], bins)[1]
        records.append({"model": run.model, "seed": run.seed, "reliability": {"test": tasks}})
    return records


def pooled_reliability(records: Sequence[dict], split: str = "test") -> dict[str, dict[str, tuple]]:
    """Task -> model -> (mean predicted, observed rate, rows) per non-empty bin, the model's seeds pooled: each
    bin's means are weighted by the rows it holds in each seed. `records` as `reliability_records` gives."""
    sums: dict[tuple[str, str], np.ndarray] = {}  # (task, model) -> (3, bins): rows, Σ predicted, Σ observed
    for record in records:
        for task, bins in record["reliability"].get(split, {}).items():
            count = np.asarray(bins["count"], dtype=np.float64)
            means = [[np.nan if v is None else v for v in bins[k]] for k in ("mean_predicted", "observed_rate")]
            add = np.stack([count, *(np.nan_to_num(np.asarray(m, dtype=np.float64)) * count for m in means)])
            key = (task, record["model"])
            sums[key] = sums[key] + add if key in sums else add
    pooled: dict[str, dict[str, tuple]] = {}
    for (task, model), (count, predicted, observed) in sums.items():
        filled = count > 0
        pooled.setdefault(task, {})[model] = (
            predicted[filled] / count[filled],
            observed[filled] / count[filled],
            count[filled].astype(np.int64),
        )
    return pooled


def reliability_plot(records: Sequence[dict], path: str | Path, split: str = "test") -> bool:
    """Predicted probability against observed positive rate per calibration bin, one panel per binary task
    and one line per model (`pooled_reliability`): a calibrated model lies on the diagonal. `records` as
    `reliability_records` gives; returns False, writing nothing, where none holds bins of `split`."""
    pooled = pooled_reliability(records, split)
    if not pooled:
        return False
    fig, axes = plt.subplots(1, len(pooled), figsize=(4.5 * len(pooled), 4.2), squeeze=False)
    for ax, (task, models) in zip(axes[0], pooled.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
        for i, (model, (predicted, observed, _rows)) in enumerate(models.items()):
            ax.plot(predicted, observed, marker="o", ms=3, color=f"C{i % 10}", label=model)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("mean predicted probability (per bin)")
        ax.set_ylabel("observed positive rate")
        ax.set_title(f"{task} ({split} split)")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability: predicted against observed, per probability bin")
    fig.tight_layout()
    _save(fig, path)
    return True
