"""Evaluation metrics per task, each over its own sample space (DESIGN.md §4).

Binary tasks get ROC AUC and log-loss, regression tasks get MSE. Metrics are computed in numpy
float64, one task column at a time: flattening all tasks into one vector would mix label
distributions and score scales and give a number that belongs to no task.
"""

from __future__ import annotations

import numpy as np
import torch

HIGHER_IS_BETTER: dict[str, bool] = {"auc": True, "logloss": False, "mse": False}
METRICS_BY_KIND: dict[str, tuple[str, ...]] = {"binary": ("auc", "logloss"), "regression": ("mse",)}


def _pair(labels: np.ndarray, values: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return `labels` and `values` as 1-D float64 arrays of equal length with at least one entry."""
    labels = np.asarray(labels, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != values.shape:
        raise ValueError(
            f"Expected `labels` and `{name}` to be 1-D arrays of the same length, "
            f"but got shapes {labels.shape} and {values.shape}"
        )
    if labels.size == 0:
        raise ValueError("Expected at least one sample, but got an empty array")
    return labels, values


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_group) - 1  # group id of each sorted position
    first = np.flatnonzero(starts_group)  # 0-based position where each group starts
    counts = np.diff(np.r_[first, values.size])
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = (first + (counts + 1) / 2.0)[group]
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` against 0/1 `labels`, in O(n log n).

    Uses the Mann-Whitney form: the probability that a random positive outscores a random
    negative, ties counting one half. Average ranks give exactly that tie handling, which is
    also what sklearn's `roc_auc_score` computes.
    """
    labels, scores = _pair(labels, scores, "scores")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"Expected `labels` to be 0 or 1, but got values {np.unique(labels)[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError("Expected `scores` to be finite, but got NaN or infinity")
    positive = labels == 1.0
    n_pos = int(positive.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        present = "positives" if n_pos else "negatives"
        raise ValueError(
            f"Expected both classes in `labels` to compute AUC, but got only {present} ({labels.size} rows)"
        )
    rank_sum = _average_ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of `logits` against `labels` in [0, 1].

    Computed from logits as log(1 + e^z) - y·z with log-sum-exp, so that confident predictions
    give a large finite loss instead of log(0) or a value distorted by clipping probabilities.
    """
    labels, logits = _pair(labels, logits, "logits")
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def mse(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean squared error of `predictions` against `labels`."""
    labels, predictions = _pair(labels, predictions, "predictions")
    return float(np.mean((predictions - labels) ** 2))


def task_metrics(kind: str, logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Metrics of one task over the rows where `mask` is True (the task's sample space).

    Binary tasks give {"auc", "logloss", "n"}, regression tasks {"mse", "n"}; `n` is the number of
    rows in the space. A binary space holding a single class has no defined AUC, so "auc" is left
    out rather than reported as a misleading 0.5 or NaN. An empty space gives {"n": 0}.
    """
    if kind not in METRICS_BY_KIND:
        raise ValueError(f"Expected task kind to be one of {sorted(METRICS_BY_KIND)}, but got {kind!r}")
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"Expected `mask` to be a boolean array, but got dtype {mask.dtype}")
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if not logits.shape == labels.shape == mask.shape or mask.ndim != 1:
        raise ValueError(
            "Expected `logits`, `labels` and `mask` to be 1-D arrays of the same length, "
            f"but got shapes {logits.shape}, {labels.shape} and {mask.shape}"
        )
    logits, labels = logits[mask], labels[mask]
    n = int(mask.sum())
    if n == 0:
        return {"n": 0}
    if kind == "regression":
        return {"mse": mse(labels, logits), "n": n}
    out: dict[str, float] = {}
    if np.unique(labels).size > 1:
        out["auc"] = auc(labels, logits)  # sigmoid is monotonic: ranking logits is ranking probs
    out["logloss"] = logloss(labels, logits)
    out["n"] = n
    return out


def evaluate_tasks(
    task_kinds: dict[str, str], logits: np.ndarray, labels: np.ndarray, mask: np.ndarray
) -> dict[str, dict[str, float]]:
    """Metrics of every task, column t of the (N, T) arrays being task t of `task_kinds` (in order)."""
    logits, labels, mask = np.asarray(logits), np.asarray(labels), np.asarray(mask)
    num_tasks = len(task_kinds)
    for name, array in (("logits", logits), ("labels", labels), ("mask", mask)):
        if array.ndim != 2 or array.shape[1] != num_tasks:
            raise ValueError(
                f"Expected `{name}` to have shape (N, {num_tasks}) for tasks {list(task_kinds)}, but got {array.shape}"
            )
    if not logits.shape == labels.shape == mask.shape:
        raise ValueError(
            f"Expected `logits`, `labels` and `mask` to have the same shape, "
            f"but got {logits.shape}, {labels.shape} and {mask.shape}"
        )
    return {
        name: task_metrics(kind, logits[:, t], labels[:, t], mask[:, t])
        for t, (name, kind) in enumerate(task_kinds.items())
    }


def mtl_gain(metric: str, model_value: float, single_value: float) -> float:
    """MTL gain of a model over the single-task baseline (DESIGN.md Eq. 11); positive means better."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"Expected metric to be one of {sorted(HIGHER_IS_BETTER)}, but got {metric!r}")
    if HIGHER_IS_BETTER[metric]:
        return float(model_value - single_value)
    return float(single_value - model_value)


class TaskMetricAccumulator:
    """Streaming per-task metrics for evaluation loops, in the update/compute/reset style.

    `update` only keeps detached CPU copies: AUC is not decomposable over batches, so every metric
    is computed once on the concatenation in `compute`. Keeping raw rows also lets a distributed
    run gather them from all ranks before computing.
    """

    def __init__(self, task_kinds: dict[str, str]) -> None:
        for name, kind in task_kinds.items():
            if kind not in METRICS_BY_KIND:
                raise ValueError(
                    f"Expected kind of task {name!r} to be one of {sorted(METRICS_BY_KIND)}, but got {kind!r}"
                )
        self.task_kinds = dict(task_kinds)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._mask: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """Store one batch of (B, T) logits, labels and boolean label mask."""
        num_tasks = len(self.task_kinds)
        if not logits.shape == labels.shape == mask.shape or logits.ndim != 2 or logits.shape[1] != num_tasks:
            raise ValueError(
                f"Expected `logits`, `labels` and `mask` of shape (B, {num_tasks}), "
                f"but got {tuple(logits.shape)}, {tuple(labels.shape)} and {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"Expected `mask` to be a bool tensor, but got {mask.dtype}")
        self._logits.append(logits.detach().cpu())
        self._labels.append(labels.detach().cpu())
        self._mask.append(mask.detach().cpu())

    def compute(self) -> dict[str, dict[str, float]]:
        """Metrics of every task over all stored rows; {"n": 0} per task if nothing was stored."""
        if not self._logits:
            return {name: {"n": 0} for name in self.task_kinds}
        # float64 before numpy: bf16/fp16 tensors have no numpy dtype and would lose AUC resolution.
        logits = torch.cat(self._logits).to(torch.float64).numpy()
        labels = torch.cat(self._labels).to(torch.float64).numpy()
        mask = torch.cat(self._mask).numpy()
        return evaluate_tasks(self.task_kinds, logits, labels, mask)
