"""Comparison summaries: mean ± std over seeds, MTL gains (Eq. 11) against single-task with their
confidence intervals and per-seed tests, and a verdict per task and per model (rule in plerec.stats)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plerec.metrics import METRICS_BY_KIND, mtl_gain
from plerec.report.tables import PRIMARY
from plerec.stats import ALPHA, SeedInterval, delong, model_verdict, paired_bootstrap, seed_interval, task_verdict

PREDICTIONS_FILE = "test_predictions.npz"
TEST_BY_KIND = {"binary": "delong", "regression": "bootstrap"}  # the per-seed test of each PRIMARY metric

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # predictions, labels, mask: (N, T) each
Predictions = Callable[[str, int], Arrays | None] | Mapping[tuple[str, int], Arrays]


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


@dataclass(frozen=True, slots=True)
class TaskGain:
    """The MTL gain of one model on one task, per seed and over seeds, with its per-seed tests."""

    metric: str  # the task's primary metric (PRIMARY)
    test: str  # "delong" or "bootstrap"
    seeds: tuple[int, ...]
    gains: tuple[float, ...]  # per seed, Eq. 11 against the single-task model of the same seed
    p_values: tuple[float | None, ...]  # per seed; None where no test could run
    interval: SeedInterval
    verdict: str  # "gain" | "loss" | "n.s." | "untested"


@dataclass(slots=True)
class Summary:
    """Test-split statistics per (model, task, metric), MTL gains per (model, task) on the primary
    metric (`gains`: mean ± std; `tests`: intervals, p-values, verdicts) and a verdict per model."""

    task_kinds: dict[str, str]
    models: list[str]
    metrics: dict[tuple[str, str, str], Stat]
    gains: dict[tuple[str, str], Stat]
    tests: dict[tuple[str, str], TaskGain] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)
    alpha: float = ALPHA
    resamples: int = 1000
    split: str = "test"

    def verdict(self, model: str) -> str:
        """The model's verdict over its tasks ('' for the baseline or an unknown model)."""
        return self.verdicts.get(model, "")


def load_predictions(run_dir: str | Path) -> Arrays | None:
    """The (predictions, labels, mask) a run saved in `run_dir/test_predictions.npz`; None if it has none."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as saved:
        missing = [k for k in ("predictions", "labels", "mask") if k not in saved.files]
        if missing:
            raise ValueError(f"Expected keys predictions, labels and mask in {path}, but {', '.join(missing)} missing")
        preds, labels, mask = saved["predictions"], saved["labels"], saved["mask"]
    if mask.dtype != np.bool_:
        raise ValueError(f"Expected `mask` in {path} to be boolean, but got {mask.dtype}")
    if preds.ndim != 2 or not preds.shape == labels.shape == mask.shape:
        raise ValueError(
            f"Expected predictions, labels and mask of one shape (N, T) in {path}, "
            f"but got {preds.shape}, {labels.shape} and {mask.shape}"
        )
    return preds.astype(np.float64), labels.astype(np.float64), mask


def predictions_loader(out: str | Path) -> Callable[[str, int], Arrays | None]:
    """(model, seed) -> the arrays saved in out/runs/MODEL/seedS/test_predictions.npz, or None."""
    root = Path(out) / "runs"
    return lambda model, seed: load_predictions(root / model / f"seed{seed}")


def _checked(
    arrays: Arrays | None, base: Arrays, model: str, baseline: str, seed: int, num_tasks: int
) -> Arrays | None:
    if arrays is None:
        return None
    preds, labels, mask = arrays
    if preds.shape != base[0].shape or preds.shape[1] != num_tasks:
        raise ValueError(
            f"Expected the test predictions of {model} seed {seed} to have the shape of {baseline}'s, "
            f"(N, {num_tasks}) = {base[0].shape}, but got {preds.shape}"
        )
    if not (np.array_equal(mask, base[2]) and np.array_equal(labels[mask], base[1][base[2]])):
        raise ValueError(
            f"Expected the test predictions of {model} seed {seed} to be on the same rows as {baseline} seed "
            f"{seed}, but their labels or masks differ"
        )
    return arrays


def _seed_test(kind: str, t: int, model: Arrays, base: Arrays, seed: int, resamples: int):
    """(p-value, the test's own gain estimate) of model vs baseline on task column t, or (None, None)."""
    mask = model[2][:, t]
    labels = model[1][mask, t]
    ours, theirs = model[0][mask, t], base[0][mask, t]
    if kind == "binary":
        positives = int((labels == 1.0).sum())
        if positives < 2 or labels.size - positives < 2:
            return None, None
        result = delong(labels, ours, theirs)  # difference = AUC_model - AUC_single = gain
        return result.p_value, result.difference
    if labels.size < 2:
        return None, None
    result = paired_bootstrap(labels, theirs, ours, "mse", resamples=resamples, seed=seed)
    return result.p_value, result.difference  # MSE_single - MSE_model = gain


def _lookup(predictions: Predictions | None) -> Callable[[str, int], Arrays | None]:
    if predictions is None:
        return lambda _model, _seed: None
    if isinstance(predictions, Mapping):
        return lambda model, seed: predictions.get((model, seed))
    return predictions


def summarize(
    runs,
    task_kinds: dict[str, str],
    baseline: str = "single",
    split: str = "test",
    predictions: Predictions | None = None,
    *,
    alpha: float = ALPHA,
    resamples: int = 1000,
) -> Summary:
    """Aggregate runs (objects with .model, .seed, .metrics) over seeds.

    `predictions` maps (model, seed) to that run's test (predictions, labels, mask), each (N, T) with
    the columns in `task_kinds` order: logits for binary tasks, values for regression tasks. With them
    each seed's gain gets a test against the baseline of the same seed (DeLong for AUC, a paired
    bootstrap with `resamples` for MSE); without them verdicts are "untested".
    """
    models = list(dict.fromkeys(r.model for r in runs))
    values: dict[tuple[str, str, str], list[float]] = {}
    by_seed = {(r.model, r.seed): r.metrics.get(split, {}) for r in runs}
    for (model, _seed), tasks in by_seed.items():
        for task, kind in task_kinds.items():
            for metric in METRICS_BY_KIND[kind]:
                if metric in tasks.get(task, {}):
                    values.setdefault((model, task, metric), []).append(tasks[task][metric])
    gains: dict[tuple[str, str], dict[int, float]] = {}
    for (model, seed), tasks in sorted(by_seed.items(), key=lambda item: item[0][1]):
        base = by_seed.get((baseline, seed))
        if model == baseline or base is None:
            continue
        for task, kind in task_kinds.items():
            metric = PRIMARY[kind]
            if metric in tasks.get(task, {}) and metric in base.get(task, {}):
                gains.setdefault((model, task), {})[seed] = mtl_gain(metric, tasks[task][metric], base[task][metric])

    tested: dict[tuple[str, str], dict[int, tuple[float | None, float | None]]] = {}
    lookup = _lookup(predictions)
    for seed in sorted({s for per_seed in gains.values() for s in per_seed}):
        base = lookup(baseline, seed)  # loaded once per seed, then every model of that seed
        if base is None:
            continue
        for model in models:
            keys = [
                (t, task, kind)
                for t, (task, kind) in enumerate(task_kinds.items())
                if seed in gains.get((model, task), {})
            ]
            if not keys:
                continue
            arrays = _checked(lookup(model, seed), base, model, baseline, seed, len(task_kinds))
            if arrays is None:
                continue
            for t, task, kind in keys:
                tested.setdefault((model, task), {})[seed] = _seed_test(kind, t, arrays, base, seed, resamples)

    tests: dict[tuple[str, str], TaskGain] = {}
    for (model, task), per_seed in gains.items():
        seeds = tuple(sorted(per_seed))
        found = tested.get((model, task), {})
        p_values = tuple(found.get(s, (None, None))[0] for s in seeds)
        directions = [found.get(s, (None, None))[1] for s in seeds]
        seed_gains = tuple(per_seed[s] for s in seeds)
        kind = task_kinds[task]
        tests[model, task] = TaskGain(
            metric=PRIMARY[kind],
            test=TEST_BY_KIND[kind],
            seeds=seeds,
            gains=seed_gains,
            p_values=p_values,
            interval=seed_interval(seed_gains, 1.0 - alpha),
            verdict=task_verdict(seed_gains, p_values, directions=directions, alpha=alpha),
        )
    verdicts = {
        model: model_verdict({t: tests[model, t].verdict for t in task_kinds if (model, t) in tests})
        for model in models
        if any((model, t) in tests for t in task_kinds)
    }
    return Summary(
        task_kinds=task_kinds,
        models=models,
        metrics={k: Stat.of(v) for k, v in values.items()},
        gains={k: Stat.of(list(v.values())) for k, v in gains.items()},
        tests=tests,
        verdicts=verdicts,
        alpha=alpha,
        resamples=resamples,
        split=split,
    )


def _signed(x: float) -> str:
    return f"{x:+.4f}".replace("-", "−")


def format_gain(interval: SeedInterval) -> str:
    """`+0.0012 [−0.0003, +0.0027]`: the mean gain and its confidence interval over seeds."""
    if interval.low is None or interval.high is None:
        return f"{_signed(interval.mean)} (1 seed, no interval)"
    return f"{_signed(interval.mean)} [{_signed(interval.low)}, {_signed(interval.high)}]"


def format_p(p_values: Sequence[float | None]) -> str:
    """Per-seed p-values (up to five), else their median and maximum; — where no test ran."""
    shown = lambda p: "—" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"  # noqa: E731
    if len(p_values) <= 5:
        return ", ".join(shown(p) for p in p_values)
    ran = [p for p in p_values if p is not None]
    if not ran:
        return "—"
    missing = len(p_values) - len(ran)
    text = f"median {shown(float(np.median(ran)))}, max {shown(max(ran))}"
    return text + (f" ({missing} untested)" if missing else "")


def rule_text(alpha: float = ALPHA, resamples: int = 1000) -> str:
    """The verdict rule in one paragraph, as the summaries state it."""
    level = f"{100 * (1 - alpha):g} %"
    return (
        f"Verdict rule (α = {alpha:g}): a task's gain is significant when, with two or more seeds, the {level} "
        "confidence interval of the mean gain over seeds (Student t, paired by seed) excludes 0, and the "
        "per-seed test on that seed's test rows against the single-task model (DeLong's test for AUC, a paired "
        f"bootstrap over test rows with {resamples} resamples for MSE) gives p < {alpha:g} with the same sign "
        "in a majority of the seeds; with one seed the per-seed test alone decides. Otherwise the task is "
        "n.s. (no significant difference), or untested when the run saved no test predictions. A model is a "
        "seesaw only when it gains significantly on one task and loses significantly on another."
    )


def summary_markdown(summary: Summary, title: str = "Comparison") -> str:
    seeds = max((s.n for s in summary.metrics.values()), default=0)
    level = f"{100 * (1 - summary.alpha):g} %"
    lines = [
        f"# {title}",
        "",
        f"Test split; mean ± standard deviation over {seeds} seed(s). "
        "MTL gain (Eq. 11) against the single-task model of the same seed, on AUC (binary, higher is "
        "better) or MSE (regression, lower is better): positive means the model helps the task. "
        f"Gains are shown as mean [{level} confidence interval over seeds]; p are the per-seed tests.",
        "",
        rule_text(summary.alpha, summary.resamples),
        "",
    ]
    balanced = [m for m in summary.models if "+" in m]
    if balanced:  # compare --balancing: one model under several loss-balancing methods (compare.run_name)
        lines += [
            "A run named MODEL+METHOD is MODEL trained with [train] balancing = METHOD; MODEL alone is trained with "
            "the experiment's own method (`fixed`, Eq. 10, unless it says otherwise). Each is tested against the "
            f"same single-task model: {', '.join(f'`{m}`' for m in balanced)}.",
            "",
        ]
    for task, kind in summary.task_kinds.items():
        metrics = METRICS_BY_KIND[kind]
        lines += [f"## {task} ({kind})", ""]
        header = ["model", *metrics, f"MTL gain ({PRIMARY[kind]}) [{level} CI]", f"p ({TEST_BY_KIND[kind]})", "verdict"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in summary.models:
            cells = [model]
            cells += [
                str(summary.metrics[model, task, m]) if (model, task, m) in summary.metrics else "—" for m in metrics
            ]
            test = summary.tests.get((model, task))
            if test is None:
                cells += ["—", "—", "—"]
            else:
                cells += [format_gain(test.interval), format_p(test.p_values), test.verdict]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Verdicts (seesaw check)", "", verdict_table(summary)]
    return "\n".join(lines) + "\n"


def verdict_table(summary: Summary) -> str:
    """One row per model: each task's gain with its interval and verdict, and the model's verdict."""
    metric = {t: PRIMARY[k] for t, k in summary.task_kinds.items()}
    lines = [
        "| model | " + " | ".join(f"gain {t} ({metric[t]})" for t in summary.task_kinds) + " | verdict |",
        "|" + "---|" * (len(summary.task_kinds) + 2),
    ]
    for model in summary.models:
        if model not in summary.verdicts:
            continue
        cells = [
            f"{format_gain(summary.tests[model, t].interval)} {summary.tests[model, t].verdict}"
            if (model, t) in summary.tests
            else "—"
            for t in summary.task_kinds
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {summary.verdicts[model]} |")
    return "\n".join(lines)
