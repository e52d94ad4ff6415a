"""Pictures: the seesaw chart (paper Fig. 1/3), expert utilisation (Fig. 8), training curves, the sweep (Fig. 7),
the reliability of binary tasks' probabilities. A `*_figure` returns the matplotlib Figure (what a page embeds
with `png_bytes`, and what the tests inspect); a `*_plot` writes it to a PNG file, atomically."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards): what a self-contained page embeds without a file."""
    try:
        handle = io.BytesIO()  # in memory: no file, nothing for safe_io to guard
        fig.savefig(handle, format="png", dpi=110)
        return handle.getvalue()
    finally:
        plt.close(fig)


def integer_epochs(ax) -> None:
    """Epochs are counted: ticks at whole numbers only (matplotlib would put 1.5 between two epochs)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


_LEVEL = re.compile(r"^L(\d+)\.(.*)$")


def expert_label(name: str) -> str:
    """`L0.click.1` -> `click expert 1`, `L0.shared0` -> `shared expert 0`, `cvr.tower` -> `cvr tower`:
    the expert without its level (the gate's row names it), numbered as in experts.csv."""
    match = _LEVEL.match(name)
    rest = match.group(2) if match else name
    rest = re.sub(r"^shared(\d+)$", r"shared expert \1", rest)
    rest = re.sub(r"^expert(\d+)$", r"expert \1", rest)
    rest = re.sub(r"^(.+)\.(\d+)$", r"\1 expert \2", rest)
    return rest.replace(".", " ")


def gate_label(name: str, levels: int = 1) -> str:
    """`L1.click` -> `level 2: click gate` (`click gate` in a one-level model), `L0.expert3` -> `expert 3
    gate` (ML-MMoE's second-level experts' gates), `cvr.ait` -> `cvr ait gate`."""
    match = _LEVEL.match(name)
    rest = match.group(2) if match else name
    rest = re.sub(r"^expert(\d+)$", r"expert \1", rest).replace(".", " ")
    label = "gate" if rest == "gate" else f"{rest} gate"
    return f"level {int(match.group(1)) + 1}: {label}" if match and levels > 1 else label


def _utilisation_grid(rows: Sequence[dict]) -> tuple[list[str], list[str], np.ndarray, np.ndarray, int]:
    """One model's rows (several seeds) as gate labels, expert labels, the mean weight (G, E) over seeds and
    its spread (G, E): the std over seeds, or with one seed the std over the rows scored; NaN where a gate
    does not weigh an expert. Returns the number of seeds last."""
    levels = len({m.group(1) for r in rows if (m := _LEVEL.match(r["gate"]))})
    gates = list(dict.fromkeys(r["gate"] for r in rows))
    experts = [expert_label(r["expert"]) for r in rows]
    experts = list(dict.fromkeys(sorted(experts, key=lambda e: e.startswith("shared"))))  # shared last
    seeds = sorted({r["seed"] for r in rows})
    cells: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        cells.setdefault((gates.index(r["gate"]), experts.index(expert_label(r["expert"]))), []).append(r)
    mean = np.full((len(gates), len(experts)), np.nan)
    spread = np.full_like(mean, np.nan)
    for (i, j), found in cells.items():
        values = np.array([r["mean"] for r in found])
        mean[i, j] = values.mean()
        spread[i, j] = values.std(ddof=1) if len(seeds) > 1 and len(values) > 1 else found[0]["std"]
    return [gate_label(g, levels) for g in gates], experts, mean, spread, len(seeds)


def experts_figure(rows: Sequence[dict], split: str = "test"):
    """One heat map per gated model: its gates (rows) by the experts they weigh (columns); each cell the mean
    weight the gate gives the expert over the `split` rows, averaged over the model's seeds, ± its std over
    seeds (with one seed: ± its std over the rows). `rows`: {"model", "seed", "gate", "expert", "mean",
    "std"} as plerec.compare.expert_utilisation gives them per run. Returns the matplotlib Figure."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no gated model", ha="center")
        return fig
    grids = {m: _utilisation_grid([r for r in rows if r["model"] == m]) for m in models}
    width = max(len(g[1]) for g in grids.values())
    heights = [len(g[0]) + 1.6 for g in grids.values()]
    fig, axes = plt.subplots(
        len(models),
        1,
        figsize=(min(max(6.0, 1.1 * width + 3.5), 20.0), 0.55 * sum(heights) + 0.6),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    for ax, model in zip(axes[:, 0], models, strict=True):
        gates, experts, mean, spread, seeds = grids[model]
        vmax = max(float(np.nanmax(mean)), 1e-9)
        im = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        ax.set_yticks(range(len(gates)), gates, fontsize=8)
        ax.set_xticks(range(len(experts)), experts, fontsize=8, rotation=30, ha="right")
        for (i, j), v in np.ndenumerate(mean):
            if not np.isnan(v):
                dark = v < 0.55 * vmax
                text = f"{v:.2f}\n±{spread[i, j]:.2f}"
                size = 7 if len(experts) <= 14 else 5  # the figure stops widening at 20 inches
                ax.text(j, i, text, ha="center", va="center", fontsize=size, color="white" if dark else "black")
        over = f"± std over {seeds} seeds" if seeds > 1 else f"± std over the {split} rows (one seed)"
        ax.set_title(f"{model}: mean gate weight per expert on the {split} split, {over}", fontsize=9)
        bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label("mean gate weight", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("expert (grey: not weighed by that gate)", fontsize=8)
    fig.tight_layout()
    return fig


def experts_plot(rows: Sequence[dict], path: str | Path) -> None:
    """`experts_figure` written to `path` as PNG."""
    _save(experts_figure(rows), path)


_SEED_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))


def curves_figure(runs, monitor: str = "validation monitor", task_monitors: Mapping[str, str] | None = None):
    """The validation monitor per epoch of every run (objects with .model, .seed, .history): colour tells the
    model, line style the seed. The multi-task models share one panel, its axis named by `monitor`
    (plerec.train.monitor_name); the single-task baseline, whose monitor is one number per task on its own
    scale, gets a panel per task, named by `task_monitors[task]` where given. Returns the Figure."""
    seeds = sorted({run.seed for run in runs})
    style = {seed: _SEED_STYLES[i % len(_SEED_STYLES)] for i, seed in enumerate(seeds)}
    colors: dict[str, str] = {}
    for run in runs:
        colors.setdefault(run.model, f"C{len(colors) % 10}")
    joint = [r for r in runs if r.history and not isinstance(r.history[0]["monitor"], dict)]
    single = [r for r in runs if r.history and isinstance(r.history[0]["monitor"], dict)]
    tasks = list(dict.fromkeys(t for r in single for h in r.history for t in h["monitor"]))
    panels = ([None] if joint or not tasks else []) + tasks
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 + 4.2 * (len(panels) - 1), 4.2), squeeze=False)
    for ax, task in zip(axes[0], panels, strict=True):
        shown = joint if task is None else single
        for run in shown:
            points = [
                (h["epoch"], h["monitor"] if task is None else h["monitor"][task])
                for h in run.history
                if task is None or task in h["monitor"]
            ]
            if points:
                epochs, values = zip(*points, strict=True)
                ax.plot(epochs, values, color=colors[run.model], linestyle=style[run.seed], marker=".", alpha=0.85)
        integer_epochs(ax)
        if task is None:
            ax.set_ylabel(monitor + _direction(monitor))
            ax.set_title("Multi-task models: the validation monitor that selects the best epoch", fontsize=9)
        else:
            label = (task_monitors or {}).get(task, f"valid {task} monitor")
            ax.set_ylabel(label + _direction(label))
            ax.set_title(f"Single-task baseline: task {task} on its own", fontsize=9)
        handles = [Line2D([], [], color=colors[m], marker=".", label=m) for m in dict.fromkeys(r.model for r in shown)]
        if len(seeds) > 1:
            handles += [Line2D([], [], color="grey", linestyle=style[s], label=f"seed {s}") for s in seeds]
        if handles:
            ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def curves_plot(runs, path: str | Path, monitor: str = "validation monitor", task_monitors=None) -> None:
    """`curves_figure` written to `path` as PNG."""
    _save(curves_figure(runs, monitor, task_monitors), path)


BETTER = {"auc": "↑", "gauc": "↑", "logloss": "↓", "mse": "↓", "ece": "↓", "pcoc": "best at 1", "loss": "↓"}


def _direction(label: str) -> str:
    """` (↑)` or ` (↓)` after a monitor's name: a skill (plerec.train.monitor_value) is higher-better."""
    better = "↑" if " skill " in f" {label} " else BETTER.get(label.split()[-1] if label else "")
    return f" ({better})" if better in ("↑", "↓") else ""


def _best(best_epoch: int | Mapping[str, int] | None, task: str) -> int | None:
    return best_epoch.get(task) if isinstance(best_epoch, Mapping) else best_epoch


def run_curves_figure(history: Sequence[dict], best_epoch: int | Mapping[str, int] | None = None):
    """One training run's curves: a row per task, its training loss and each validation metric by epoch, the
    best epoch (a number, or one per task for the single-task baseline) marked by a dashed line and a star.
    `history`: the records of history.json's `epochs`. Returns the Figure."""
    tasks = list(dict.fromkeys(t for h in history for t in h.get("train_loss", {})))
    metrics = {
        t: list(
            dict.fromkeys(
                k for h in history for k in h.get("valid", {}).get(t, {}) if k != "n" and not k.endswith("_n")
            )
        )
        for t in tasks
    }
    columns = 1 + max((len(m) for m in metrics.values()), default=0)
    fig, axes = plt.subplots(
        max(len(tasks), 1), columns, figsize=(3.2 * columns, 2.6 * max(len(tasks), 1)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for row, task in enumerate(tasks):
        best = _best(best_epoch, task)
        series = [("train loss", [(h["epoch"], h["train_loss"].get(task)) for h in history])]
        series += [
            (f"valid {m}", [(h["epoch"], h.get("valid", {}).get(task, {}).get(m)) for h in history])
            for m in metrics[task]
        ]
        for ax, (name, points) in zip(axes[row], series, strict=False):
            points = [(e, v) for e, v in points if isinstance(v, int | float) and math.isfinite(v)]
            ax.axis("on")
            better = BETTER.get(name.split()[-1].removeprefix("cvr_"))
            ax.set_title(f"{task}: {name}" + (f" ({better})" if better else ""), fontsize=9)
            integer_epochs(ax)
            ax.tick_params(labelsize=7)
            if not points:
                ax.text(0.5, 0.5, "no value", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                continue
            epochs, values = zip(*points, strict=True)
            ax.plot(epochs, values, marker=".", color="C0" if name == "train loss" else "C1")
            if best is not None:
                ax.axvline(best, color="grey", lw=0.8, ls="--")
                if best in epochs:
                    ax.plot(best, values[epochs.index(best)], marker="*", ms=10, color="C3", linestyle="none")
    if isinstance(best_epoch, Mapping):
        kept = "each task's best epoch (" + ", ".join(f"{t} {e}" for t, e in best_epoch.items()) + ")"
    else:
        kept = f"the best epoch ({best_epoch})"
    if best_epoch is not None:
        fig.suptitle(f"Dashed line and red star: {kept}, whose weights the run keeps", fontsize=10)
    fig.tight_layout()
    return fig


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
        records.append(
            {"model": run.model, "seed": run.seed, "reliability": {"test": task_reliability(*arrays, task_kinds, bins)}}
        )
    return records


def task_reliability(
    logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, task_kinds: Mapping[str, str], bins: int = 10
) -> dict[str, dict]:
    """Task -> reliability bins (plerec.metrics.calibration) of every binary task with a labelled row, over the
    rows its `mask` (N, T) keeps; `logits` and `labels` (N, T), columns in `task_kinds` order."""
    tasks = {}
    for t, (task, kind) in enumerate(task_kinds.items()):
        keep = mask[:, t]
        if kind == "binary" and keep.any():
            tasks[task] = calibration(labels[keep, t], logits[keep, t], bins)[1]
    return tasks


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


def reliability_figure(records: Sequence[dict], split: str = "test"):
    """Predicted probability against observed positive rate per calibration bin, one panel per binary task
    and one line per model (`pooled_reliability`): a calibrated model lies on the diagonal. `records` as
    `reliability_records` gives; None where none holds bins of `split`."""
    pooled = pooled_reliability(records, split)
    if not pooled:
        return None
    fig, axes = plt.subplots(1, len(pooled), figsize=(max(5.5, 4.5 * len(pooled)), 4.4), squeeze=False)
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
    fig.suptitle("Reliability: predicted against observed, per probability bin", fontsize=10)
    fig.tight_layout()
    return fig


def reliability_plot(records: Sequence[dict], path: str | Path, split: str = "test") -> bool:
    """`reliability_figure` written to `path`; returns False, writing nothing, where none holds bins of `split`."""
    fig = reliability_figure(records, split)
    if fig is None:
        return False
    _save(fig, path)
    return True
