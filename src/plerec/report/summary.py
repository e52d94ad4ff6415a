"""Comparison summaries: mean ± std over seeds, MTL gains (Eq. 11) against single-task, seesaw flags."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plerec.metrics import METRICS_BY_KIND, mtl_gain
from plerec.report.tables import PRIMARY


@dataclass(frozen=True, slots=True)
class Stat:
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        arr = np.asarray(values, dtype=np.float64)
        std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
        return cls(float(arr.mean()) if arr.size else math.nan, std, int(arr.size))

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}"


@dataclass(slots=True)
class Summary:
    """Test-split statistics per (model, task, metric) and MTL gains per (model, task) on the primary metric."""

    task_kinds: dict[str, str]
    models: list[str]
    metrics: dict[tuple[str, str, str], Stat]
    gains: dict[tuple[str, str], Stat]

    def seesaw(self, model: str) -> str:
        """'' when every task gains; otherwise which tasks lose (DESIGN.md §4: some task's gain < 0)."""
        losing = [t for t in self.task_kinds if (model, t) in self.gains and self.gains[model, t].mean < 0]
        if not losing:
            return ""
        noise = all(abs(self.gains[model, t].mean) <= self.gains[model, t].std for t in losing)
        note = " (within one std over seeds)" if noise else ""
        if len(losing) == len(self.task_kinds):
            return "negative transfer on every task" + note
        return "seesaw: loses on " + ", ".join(losing) + note


def summarize(runs, task_kinds: dict[str, str], baseline: str = "single", split: str = "test") -> Summary:
    """Aggregate runs (objects with .model, .seed, .metrics) over seeds."""
    models = list(dict.fromkeys(r.model for r in runs))
    values: dict[tuple[str, str, str], list[float]] = {}
    by_seed = {(r.model, r.seed): r.metrics.get(split, {}) for r in runs}
    for (model, _seed), tasks in by_seed.items():
        for task, kind in task_kinds.items():
            for metric in METRICS_BY_KIND[kind]:
                if metric in tasks.get(task, {}):
                    values.setdefault((model, task, metric), []).append(tasks[task][metric])
    gains: dict[tuple[str, str], list[float]] = {}
    for (model, seed), tasks in by_seed.items():
        base = by_seed.get((baseline, seed))
        if model == baseline or base is None:
            continue
        for task, kind in task_kinds.items():
            metric = PRIMARY[kind]
            if metric in tasks.get(task, {}) and metric in base.get(task, {}):
                gain = mtl_gain(metric, tasks[task][metric], base[task][metric])
                gains.setdefault((model, task), []).append(gain)
    return Summary(
        task_kinds=task_kinds,
        models=models,
        metrics={k: Stat.of(v) for k, v in values.items()},
        gains={k: Stat.of(v) for k, v in gains.items()},
    )


def summary_markdown(summary: Summary, title: str = "Comparison") -> str:
    seeds = max((s.n for s in summary.metrics.values()), default=0)
    lines = [
        f"# {title}",
        "",
        f"Test split; mean ± standard deviation over {seeds} seed(s). "
        "MTL gain (Eq. 11) against the single-task model of the same seed, on AUC (binary, higher is "
        "better) or MSE (regression, lower is better): positive means the model helps the task.",
        "",
    ]
    for task, kind in summary.task_kinds.items():
        metrics = METRICS_BY_KIND[kind]
        lines += [f"## {task} ({kind})", ""]
        header = ["model", *metrics, f"MTL gain ({PRIMARY[kind]})"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in summary.models:
            cells = [model]
            cells += [
                str(summary.metrics[model, task, m]) if (model, task, m) in summary.metrics else "—" for m in metrics
            ]
            gain = summary.gains.get((model, task))
            cells.append("—" if gain is None else f"{gain.mean:+.4f} ± {gain.std:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Seesaw",
        "",
        "| model | " + " | ".join(f"gain {t}" for t in summary.task_kinds) + " | verdict |",
        "|" + "---|" * (len(summary.task_kinds) + 2),
    ]
    for model in summary.models:
        if not any((model, t) in summary.gains for t in summary.task_kinds):
            continue
        cells = [
            f"{summary.gains[model, t].mean:+.4f}" if (model, t) in summary.gains else "—" for t in summary.task_kinds
        ]
        verdict = summary.seesaw(model) or "gains on every task"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"
