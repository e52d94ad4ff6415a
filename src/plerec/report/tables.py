"""Text tables of per-task metrics and MTL gains (Eq. 11) against the single-task models."""

from __future__ import annotations

from plerec.metrics import METRICS_BY_KIND, mtl_gain

PRIMARY = {"binary": "auc", "regression": "mse"}


def gains_against_single(
    results: dict[str, dict[str, dict[str, float]]], task_kinds: dict[str, str], single: str = "single"
) -> dict[str, dict[str, float]]:
    """model -> task -> MTL gain on the task's primary metric (AUC or MSE), against `results[single]`."""
    if single not in results:
        return {}
    base = results[single]
    gains: dict[str, dict[str, float]] = {}
    for model, tasks in results.items():
        if model == single:
            continue
        gains[model] = {}
        for task, kind in task_kinds.items():
            metric = PRIMARY[kind]
            if metric in tasks.get(task, {}) and metric in base.get(task, {}):
                gains[model][task] = mtl_gain(metric, tasks[task][metric], base[task][metric])
    return gains


def metrics_table(
    results: dict[str, dict[str, dict[str, float]]],
    task_kinds: dict[str, str],
    gains: dict[str, dict[str, float]] | None = None,
) -> str:
    """A Markdown table: one row per model, each task's metrics, and its MTL gain when a single-task
    result is among `results`."""
    gains = gains if gains is not None else gains_against_single(results, task_kinds)
    header = ["model"]
    for task, kind in task_kinds.items():
        header += [f"{task} {m}" for m in METRICS_BY_KIND[kind]]
        if gains:
            header.append(f"{task} gain ({PRIMARY[kind]})")
    rows = []
    for model, tasks in results.items():
        row = [model]
        for task, kind in task_kinds.items():
            row += [_fmt(tasks.get(task, {}).get(m)) for m in METRICS_BY_KIND[kind]]
            if gains:
                gain = gains.get(model, {}).get(task)
                row.append("—" if gain is None else f"{gain:+.4f}")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
