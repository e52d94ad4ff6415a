"""Significance of a difference between two models: per seed on the test rows, and over seeds.

- `delong`: DeLong et al. (Biometrics 1988) for two correlated AUCs scored on the same rows, in
  O(n log n) from mid-ranks (DESIGN.md §9).
- `paired_bootstrap`: log-loss or MSE difference of two predictions on the same rows, resampling
  rows with replacement (the same rows for both models, which is what makes it paired).
- `seed_interval`: mean gain over seeds ± t_{1-α/2, s-1} · sd/√s (paired by seed), with the Student t
  quantile computed here (no scipy at runtime).
- `task_verdict` / `model_verdict`: the rule that turns those numbers into words.

Verdict rule (α = 0.05 unless told otherwise). A task's MTL gain is significant when
  1. with two or more seeds, the (1 − α) confidence interval of the mean gain over seeds excludes 0, and
  2. the per-seed test on that seed's test rows (DeLong for AUC, paired bootstrap for log-loss/MSE)
     gives p < α with the same sign as the interval in a strict majority of the seeds (a seed without a
     test counts as not significant).
With one seed only the per-seed test decides. A task is then "gain" or "loss" by that sign, otherwise
"n.s."; with no per-seed test at all it is "untested". A model is a "seesaw" only when one task gains
and another loses significantly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from plerec.metrics import _average_ranks

ALPHA = 0.05
VERDICTS = ("gain", "loss", "n.s.", "untested")
_CHUNK_ELEMENTS = 1 << 22  # resampled rows held at once by the bootstrap (32 MiB of indices)


# ---------------------------------------------------------------------------------------- DeLong


@dataclass(frozen=True, slots=True)
class DeLongResult:
    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    variance: float  # Var(AUC_A - AUC_B)
    z: float
    p_value: float  # two-sided


def delong(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """DeLong's test of AUC(scores_a) = AUC(scores_b) on the same rows, two-sided.

    With m positives X and n negatives Y, V10_i = (1/n) Σ_j ψ(X_i, Y_j) and V01_j = (1/m) Σ_i ψ(X_i, Y_j),
    ψ = 1, ½, 0 for >, =, <. Mid-ranks give them without the m×n matrix: a positive's rank among all
    rows minus its rank among the positives counts the negatives below it, ties one half.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = [np.asarray(s, dtype=np.float64) for s in (scores_a, scores_b)]
    if labels.ndim != 1 or any(s.shape != labels.shape for s in scores):
        raise ValueError(
            "Expected `labels`, `scores_a` and `scores_b` to be 1-D arrays of the same length, "
            f"but got shapes {labels.shape}, {scores[0].shape} and {scores[1].shape}"
        )
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"Expected `labels` to be 0 or 1, but got values {np.unique(labels)[:10]}")
    if not all(np.isfinite(s).all() for s in scores):
        raise ValueError("Expected finite scores, but got NaN or infinity")
    positive = labels == 1.0
    m = int(positive.sum())
    n = labels.size - m
    if m < 2 or n < 2:
        raise ValueError(f"Expected at least two positives and two negatives for DeLong's test, but got {m} and {n}")
    v10 = np.empty((2, m))
    v01 = np.empty((2, n))
    for k, s in enumerate(scores):
        ranks = _average_ranks(s)
        v10[k] = (ranks[positive] - _average_ranks(s[positive])) / n
        v01[k] = 1.0 - (ranks[~positive] - _average_ranks(s[~positive])) / m
    auc_a, auc_b = v10.mean(axis=1)
    difference = float(auc_a - auc_b)
    # S_AA + S_BB − 2 S_AB of the 2×2 covariances (ddof=1) is the sample variance of the component
    # difference; written that way it cannot come out negative by rounding, and is exactly 0 when
    # both models rank every pair alike.
    variance = float(np.var(v10[0] - v10[1], ddof=1) / m + np.var(v01[0] - v01[1], ddof=1) / n)
    if variance > 0.0:
        z = difference / math.sqrt(variance)
        p = math.erfc(abs(z) / math.sqrt(2.0))
    elif difference == 0.0:
        z, p = 0.0, 1.0
    else:  # every pair moves the same way: the difference is certain
        z, p = math.copysign(math.inf, difference), 0.0
    return DeLongResult(float(auc_a), float(auc_b), difference, variance, z, p)


# ------------------------------------------------------------------------------ paired bootstrap


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    metric: str
    value_a: float
    value_b: float
    difference: float  # metric(a) - metric(b) on all rows
    ci_low: float  # percentile interval of the resampled differences
    ci_high: float
    p_value: float  # two-sided, at least 1 / (resamples + 1)
    resamples: int


def _row_losses(metric: str, labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    if metric == "logloss":  # pred are logits; log(1 + e^z) - y·z stays finite on extreme logits
        return np.logaddexp(0.0, pred) - labels * pred
    return (pred - labels) ** 2


def paired_bootstrap(
    labels: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    metric: str,
    *,
    resamples: int = 1000,
    seed: int = 0,
    mask: np.ndarray | None = None,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap of metric(a) − metric(b) over rows, for "logloss" (pred are logits) or "mse".

    Both metrics are row means, so a resample's difference is the mean of the per-row loss difference
    over the resampled rows. The p-value is 2·min(share of resampled differences ≤ 0, share ≥ 0),
    floored at 1/(resamples + 1). Deterministic given `seed`.
    """
    if metric not in ("logloss", "mse"):
        raise ValueError(f"Expected metric to be 'logloss' or 'mse' (AUC uses `delong`), but got {metric!r}")
    if not isinstance(resamples, int | np.integer) or resamples < 1:
        raise ValueError(f"Expected `resamples` to be a positive integer, but got {resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"Expected `confidence` in (0, 1), but got {confidence}")
    labels = np.asarray(labels, dtype=np.float64)
    a = np.asarray(pred_a, dtype=np.float64)
    b = np.asarray(pred_b, dtype=np.float64)
    if labels.ndim != 1 or a.shape != labels.shape or b.shape != labels.shape:
        raise ValueError(
            "Expected `labels`, `pred_a` and `pred_b` to be 1-D arrays of the same length, "
            f"but got shapes {labels.shape}, {a.shape} and {b.shape}"
        )
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != labels.shape:
            raise ValueError(
                f"Expected `mask` to be a boolean array of shape {labels.shape}, but got {mask.dtype} {mask.shape}"
            )
        labels, a, b = labels[mask], a[mask], b[mask]
    if labels.size == 0:
        raise ValueError("Expected at least one row for the bootstrap, but got none")
    if not (np.isfinite(labels).all() and np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("Expected finite labels and predictions, but got NaN or infinity")
    loss_a, loss_b = _row_losses(metric, labels, a), _row_losses(metric, labels, b)
    delta = loss_a - loss_b  # (N,)
    n = delta.size
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        rows = rng.integers(0, n, size=(k, n))  # (k, N) int64: np.take gathers fastest with native indices
        diffs[start : start + k] = np.take(delta, rows).mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    p = 2.0 * min(np.mean(diffs <= 0.0), np.mean(diffs >= 0.0))
    p = min(1.0, max(float(p), 1.0 / (resamples + 1)))
    return BootstrapResult(
        metric, float(loss_a.mean()), float(loss_b.mean()), float(delta.mean()), float(low), float(high), p, resamples
    )


# ------------------------------------------------------------------------------ Student t, seeds


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (DLMF 8.17.22), evaluated with the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for k in range(1, 1000):
        # even term d_{2k}, then odd term d_{2k+1}
        for coef in (
            k * (b - k) * x / ((a + 2 * k - 1) * (a + 2 * k)),
            -(a + k) * (a + b + k) * x / ((a + 2 * k) * (a + 2 * k + 1)),
        ):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            h *= step
        if abs(step - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _beta_lower(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) with y = 1 − x passed in exactly; valid where the fraction converges fast (x < (a+1)/(a+b+2))."""
    if x <= 0.0:
        return 0.0
    log_front = a * math.log(x) + b * math.log(y) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return math.exp(log_front) / a * _beta_continued_fraction(a, b, x)


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"Expected a, b > 0 and 0 <= x <= 1, but got a={a}, b={b}, x={x}")
    if x < (a + 1.0) / (a + b + 2.0):
        return _beta_lower(a, b, x, 1.0 - x)
    return 1.0 - _beta_lower(b, a, 1.0 - x, x)


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom: tail = ½ I_{df/(df+t²)}(df/2, ½)."""
    if not df > 0:
        raise ValueError(f"Expected degrees of freedom > 0, but got {df}")
    if t == 0.0:
        return 0.5
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    t2 = t * t
    x, y = df / (df + t2), t2 / (df + t2)  # y computed directly: 1 − x would cancel for small t
    a, b = df / 2.0, 0.5
    tail = 0.5 * (_beta_lower(a, b, x, y) if x < (a + 1.0) / (a + b + 2.0) else 1.0 - _beta_lower(b, a, y, x))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with `df` degrees of freedom, by bisection on `t_cdf` (to ~1e-13)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"Expected a probability in (0, 1), but got {q}")
    if not df > 0:
        raise ValueError(f"Expected degrees of freedom > 0, but got {df}")
    if q == 0.5:
        return 0.0
    p = max(q, 1.0 - q)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-13 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    value = 0.5 * (lo + hi)
    return value if q > 0.5 else -value


@dataclass(frozen=True, slots=True)
class SeedInterval:
    """Mean over seeds and its confidence interval; `sd` and `half_width` are None with one seed."""

    mean: float
    sd: float | None
    n: int
    half_width: float | None
    confidence: float = 0.95

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below 0; False when there is no interval."""
        return self.half_width is not None and abs(self.mean) > self.half_width


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> SeedInterval:
    """Mean ± t_{(1+c)/2, s−1} · sd/√s over s per-seed values (sd with ddof=1); no interval when s = 1."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"Expected `confidence` in (0, 1), but got {confidence}")
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"Expected a non-empty 1-D sequence of per-seed values, but got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"Expected finite per-seed values, but got {arr.tolist()}")
    n = int(arr.size)
    mean = float(arr.mean())
    if n == 1:
        return SeedInterval(mean, None, 1, None, confidence)
    sd = float(arr.std(ddof=1))
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * sd / math.sqrt(n)
    return SeedInterval(mean, sd, n, half, confidence)


# -------------------------------------------------------------------------------------- verdicts


def task_verdict(
    gains: Sequence[float],
    p_values: Sequence[float | None],
    *,
    directions: Sequence[float | None] | None = None,
    alpha: float = ALPHA,
) -> str:
    """The verdict on one (model, task) under the module's rule: "gain", "loss", "n.s." or "untested".

    `gains` are the per-seed MTL gains (positive = better than single-task), `p_values` the per-seed
    test p-values (None where no test ran). A seed's test points the way of `directions[i]` (the
    test's own estimate of the gain) when given, else of `gains[i]`.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"Expected `alpha` in (0, 1), but got {alpha}")
    if len(p_values) != len(gains) or (directions is not None and len(directions) != len(gains)):
        raise ValueError(
            f"Expected one p-value (and direction) per seed, but got {len(gains)} gains, {len(p_values)} p-values"
            + ("" if directions is None else f" and {len(directions)} directions")
        )
    if not gains or all(p is None for p in p_values):
        return "untested"
    signs = [g if d is None else d for g, d in zip(gains, directions or [None] * len(gains), strict=True)]
    up = sum(1 for p, s in zip(p_values, signs, strict=True) if p is not None and p < alpha and s > 0)
    down = sum(1 for p, s in zip(p_values, signs, strict=True) if p is not None and p < alpha and s < 0)
    majority = len(gains) // 2 + 1
    if len(gains) == 1:
        return "gain" if up else "loss" if down else "n.s."
    interval = seed_interval(gains, 1.0 - alpha)
    if interval.excludes_zero and interval.mean > 0 and up >= majority:
        return "gain"
    if interval.excludes_zero and interval.mean < 0 and down >= majority:
        return "loss"
    return "n.s."


def model_verdict(per_task: Mapping[str, str]) -> str:
    """One line per model from its task verdicts (task -> "gain" | "loss" | "n.s." | "untested")."""
    for task, verdict in per_task.items():
        if verdict not in VERDICTS:
            raise ValueError(f"Expected the verdict of task {task!r} to be one of {VERDICTS}, but got {verdict!r}")
    pick = lambda v: [t for t, x in per_task.items() if x == v]  # noqa: E731
    gains, losses, same, untested = pick("gain"), pick("loss"), pick("n.s."), pick("untested")
    names = ", ".join
    if not per_task or len(untested) == len(per_task):
        return "untested: no per-seed test (test predictions missing)"
    if not untested and len(gains) == len(per_task):
        text = "gains on every task"
    elif not untested and len(losses) == len(per_task):
        text = "negative transfer on every task"
    else:
        parts = []
        if gains:
            parts.append(f"gains on {names(gains)}")
        if losses:
            parts.append(f"loses on {names(losses)}")
        if same:
            parts.append("no significant difference" + (f" on {names(same)}" if gains or losses else ""))
        text = ("seesaw: " if gains and losses else "") + ", ".join(parts)
    if untested:
        text += f"; untested on {names(untested)} (test predictions missing)"
    return text
