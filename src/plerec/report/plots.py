"""Pictures: the seesaw chart (paper Fig. 1/3), expert utilisation (Fig. 8), training curves, the sweep (Fig. 7)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from plerec.report.summary import Summary  # noqa: E402
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
