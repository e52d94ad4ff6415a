"""Evaluation metrics per task, each over its own sample space (DESIGN.md §4).

Binary tasks get ROC AUC and log-loss, regression tasks get MSE. Metrics are computed in numpy
float64, one task column at a time: flattening all tasks into one vector would mix label
distributions and score scales and give a number that belongs to no task.

Binary tasks also get their calibration (`pcoc`, `ece`, and the reliability bins), and, given a group
code per row ([evaluate] group, e.g. the user), GAUC: the AUC within each group, averaged by rows.
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


MISSING_GROUP = np.iinfo(np.int64).min  # the group code of a row whose group value is missing: in no group


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Group AUC: Σ_g n_g·AUC_g / Σ_g n_g over the groups g holding both classes, n_g a group's rows.

    A group of one class has no AUC: it is left out, and counted. Returns {"gauc", "gauc_groups" (groups
    used), "gauc_skipped_groups", "gauc_skipped_share" (the share of the rows left out: those of skipped
    groups and of rows whose group code is MISSING_GROUP)}; "gauc" is absent where no group qualifies.
    Vectorised: one sort by (group, score) gives every group's tie-averaged ranks at once, and each
    group's AUC is its rank sum in the Mann-Whitney form of `auc` (1M rows, 100k groups: about 0.5 s).
    """
    labels, scores = _pair(labels, scores, "scores")
    groups = np.asarray(groups)
    if groups.shape != labels.shape or groups.dtype.kind not in "iu":
        raise ValueError(
            f"Expected `groups` to be integer codes of the same length as `labels`, but got {groups.dtype} of shape "
            f"{groups.shape}"
        )
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"Expected `labels` to be 0 or 1, but got values {np.unique(labels)[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError("Expected `scores` to be finite, but got NaN or infinity")
    total = labels.size
    known = groups != MISSING_GROUP
    labels, scores, groups = labels[known], scores[known], groups[known]
    by_score = np.argsort(scores)
    order = by_score[np.argsort(groups[by_score], kind="stable")]  # by group, then by score within it
    codes, s, y = groups[order], scores[order], labels[order]
    new_group = np.r_[True, codes[1:] != codes[:-1]] if codes.size else np.zeros(0, bool)
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]] if codes.size else np.zeros(0, bool)
    group = np.cumsum(new_group) - 1  # 0 .. G-1, the group of each sorted position
    group_start = np.flatnonzero(new_group)[group]  # the position where that group starts
    tie = np.cumsum(new_tie) - 1  # the tie block of each sorted position
    tie_first = np.flatnonzero(new_tie)
    tie_last = np.r_[tie_first[1:], codes.size] - 1
    ranks = (tie_first + tie_last)[tie] / 2.0 - group_start + 1.0  # 1-based, tie-averaged, within the group
    num_groups = int(new_group.sum())
    rows = np.bincount(group, minlength=num_groups)
    positives = np.bincount(group, weights=y, minlength=num_groups)
    negatives = rows - positives
    rank_sums = np.bincount(group, weights=ranks * y, minlength=num_groups)
    used = (positives > 0) & (negatives > 0)
    out: dict[str, float] = {
        "gauc_groups": int(used.sum()),
        "gauc_skipped_groups": int((~used).sum()),
        "gauc_skipped_share": float((total - rows[used].sum()) / total),
    }
    if used.any():
        p, q = positives[used], negatives[used]
        group_auc = (rank_sums[used] - p * (p + 1) / 2.0) / (p * q)
        out["gauc"] = float(np.sum(rows[used] * group_auc) / rows[used].sum())
    return out


def probabilities(logits: np.ndarray) -> np.ndarray:
    """σ(z) in float64, computed as exp(−log(1 + e^−z)) so that no logit overflows."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64)))


def calibration(labels: np.ndarray, logits: np.ndarray, bins: int = 10) -> tuple[dict[str, float], dict]:
    """How well predicted probabilities match observed rates, over `bins` equal-width bins of [0, 1].

    Returns the scalars {"pcoc": mean predicted probability / observed positive rate (absent where no row
    is positive), "ece": Σ_b (n_b / n)·|mean predicted_b − observed rate_b|} and the reliability data
    {"edges": the bins+1 edges, "mean_predicted", "observed_rate", "count": per bin, None where empty}.
    Bin b holds the probabilities in [b/bins, (b+1)/bins), the last bin also 1.
    """
    labels, logits = _pair(labels, logits, "logits")
    if bins < 1:
        raise ValueError(f"Expected `bins` >= 1, but got {bins}")
    probs = probabilities(logits)
    which = np.minimum((probs * bins).astype(np.int64), bins - 1)  # (n,) the bin of each row
    count = np.bincount(which, minlength=bins)
    predicted_sum = np.bincount(which, weights=probs, minlength=bins)
    positive_sum = np.bincount(which, weights=labels, minlength=bins)
    filled = count > 0
    mean_predicted = np.where(filled, predicted_sum / np.maximum(count, 1), np.nan)
    observed_rate = np.where(filled, positive_sum / np.maximum(count, 1), np.nan)
    gaps = np.abs(mean_predicted - observed_rate)[filled]
    scalars = {"ece": float(np.sum(count[filled] / labels.size * gaps))}
    if labels.sum() > 0:
        scalars = {"pcoc": float(probs.mean() / labels.mean()), **scalars}
    reliability = {
        "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "mean_predicted": [float(v) if f else None for v, f in zip(mean_predicted, filled, strict=True)],
        "observed_rate": [float(v) if f else None for v, f in zip(observed_rate, filled, strict=True)],
        "count": count.tolist(),
    }
    return scalars, reliability


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


def task_metrics(
    kind: str,
    logits: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    groups: np.ndarray | None = None,
    bins: int | None = None,
) -> dict[str, float]:
    """Metrics of one task over the rows where `mask` is True (the task's sample space).

    Binary tasks give {"auc", "logloss", "n"}; with `bins` (not None or 0) also "pcoc" and "ece"
    (`calibration` over that many bins); with `groups` (a group code per row) also "gauc" and its
    counts (`gauc`). Regression tasks give {"mse", "n"}. `n` is the number of rows in the space. A
    binary space holding a single class has no defined AUC, so "auc" is left out rather than reported
    as a misleading 0.5 or NaN (GAUC's one-class groups are counted instead). An empty space gives
    {"n": 0}.
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
    if groups is not None and np.shape(groups) != mask.shape:
        raise ValueError(f"Expected `groups` to have shape {mask.shape}, but got {np.shape(groups)}")
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
    if groups is not None:
        out.update(gauc(labels, logits, np.asarray(groups)[mask]))
    if bins:
        out.update(calibration(labels, logits, bins)[0])
    out["n"] = n
    return out


def evaluate_tasks(
    task_kinds: dict[str, str],
    logits: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    groups: np.ndarray | None = None,
    bins: int | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of every task, column t of the (N, T) arrays being task t of `task_kinds` (in order);
    `groups` (N,) the rows' group codes for GAUC (None: no GAUC), `bins` the calibration bins (None or 0:
    no calibration)."""
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
    if groups is not None and np.shape(groups) != (logits.shape[0],):
        raise ValueError(f"Expected `groups` to have shape ({logits.shape[0]},), but got {np.shape(groups)}")
    return {
        name: task_metrics(kind, logits[:, t], labels[:, t], mask[:, t], groups, bins)
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

    def __init__(self, task_kinds: dict[str, str], bins: int | None = None) -> None:
        for name, kind in task_kinds.items():
            if kind not in METRICS_BY_KIND:
                raise ValueError(
                    f"Expected kind of task {name!r} to be one of {sorted(METRICS_BY_KIND)}, but got {kind!r}"
                )
        self.task_kinds = dict(task_kinds)
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._mask: list[torch.Tensor] = []
        self._groups: list[torch.Tensor] = []

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor | None = None
    ) -> None:
        """Store one batch of (B, T) logits, labels and boolean label mask, and (B,) int64 group codes for
        GAUC: given with every batch or with none."""
        num_tasks = len(self.task_kinds)
        if not logits.shape == labels.shape == mask.shape or logits.ndim != 2 or logits.shape[1] != num_tasks:
            raise ValueError(
                f"Expected `logits`, `labels` and `mask` of shape (B, {num_tasks}), "
                f"but got {tuple(logits.shape)}, {tuple(labels.shape)} and {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"Expected `mask` to be a bool tensor, but got {mask.dtype}")
        if groups is not None and (groups.shape != logits.shape[:1] or groups.dtype != torch.int64):
            raise ValueError(
                f"Expected `groups` to be an int64 tensor of shape ({logits.shape[0]},), "
                f"but got {groups.dtype} of shape {tuple(groups.shape)}"
            )
        if self._logits and (groups is None) != (not self._groups):
            raise ValueError("Expected `groups` with every batch or with none, but got them with some only")
        self._logits.append(logits.detach().cpu())
        self._labels.append(labels.detach().cpu())
        self._mask.append(mask.detach().cpu())
        if groups is not None:
            self._groups.append(groups.detach().cpu())

    def compute(self) -> dict[str, dict[str, float]]:
        """Metrics of every task over all stored rows; {"n": 0} per task if nothing was stored."""
        if not self._logits:
            return {name: {"n": 0} for name in self.task_kinds}
        # float64 before numpy: bf16/fp16 tensors have no numpy dtype and would lose AUC resolution.
        logits = torch.cat(self._logits).to(torch.float64).numpy()
        labels = torch.cat(self._labels).to(torch.float64).numpy()
        mask = torch.cat(self._mask).numpy()
        groups = torch.cat(self._groups).numpy() if self._groups else None
        return evaluate_tasks(self.task_kinds, logits, labels, mask, groups, self.bins)
