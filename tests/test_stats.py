"""plerec.stats and the significance in the comparison summary: DeLong, paired bootstrap, intervals
over seeds, verdicts."""

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from plerec import stats
from plerec.compare import write_results_csv
from plerec.metrics import evaluate_tasks, logloss
from plerec.report.summary import predictions_loader, summarize, summary_markdown
from plerec.stats import delong, model_verdict, paired_bootstrap, seed_interval, t_cdf, t_quantile, task_verdict

# ------------------------------------------------------------------------------------------ DeLong


def delong_reference(labels, a, b):
    """DeLong et al. 1988 written out: the explicit m×n ψ matrix per model, then the 2×2 covariances."""
    pos = labels == 1
    components = []
    for s in (a, b):
        x, y = s[pos][:, None], s[~pos][None, :]
        psi = (x > y) + 0.5 * (x == y)  # (m, n)
        components.append((psi.mean(axis=1), psi.mean(axis=0)))  # V10 (m,), V01 (n,)
    m, n = pos.sum(), (~pos).sum()
    s10 = np.cov(np.vstack([components[0][0], components[1][0]]))  # ddof=1
    s01 = np.cov(np.vstack([components[0][1], components[1][1]]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    auc_a, auc_b = components[0][0].mean(), components[1][0].mean()
    z = (auc_a - auc_b) / math.sqrt(var)
    return auc_a, auc_b, var, z, 2 * scipy_stats.norm.sf(abs(z))


@pytest.mark.parametrize("seed", range(5))
def test_delong_equals_the_quadratic_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 70
    labels = (rng.random(n) < 0.4).astype(float)
    signal = labels + rng.normal(size=n)
    a = np.round(signal + 0.5 * rng.normal(size=n), 1)  # one decimal: many ties, within and across classes
    b = np.round(signal + 1.0 * rng.normal(size=n), 1)
    assert len(np.unique(a)) < n
    result = delong(labels, a, b)
    auc_a, auc_b, var, z, p = delong_reference(labels, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    assert (result.auc_a, result.auc_b) == pytest.approx((auc_a, auc_b), abs=1e-12)
    assert result.difference == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert result.variance == pytest.approx(var, rel=1e-9)
    assert result.z == pytest.approx(z, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-7)


def test_delong_zero_variance_gives_p_one_or_zero_without_nan():
    rng = np.random.default_rng(0)
    labels = (rng.random(50) < 0.5).astype(float)
    scores = rng.normal(size=50)
    same = delong(labels, scores, scores)
    assert (same.difference, same.variance, same.z, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    monotone = delong(labels, scores, np.exp(3 * scores))  # the same ranking: nothing to test
    assert monotone.p_value == 1.0 and monotone.z == 0.0
    # Perfect against reversed: every pair flips the same way, the difference is certain.
    flipped = delong(np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.9, 0.8, 0.2, 0.1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert flipped.difference == 1.0 and flipped.variance == 0.0
    assert flipped.z == math.inf and flipped.p_value == 0.0


def test_delong_rejects_bad_input():
    labels = np.array([1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="at least two positives and two negatives"):
        delong(np.array([1.0, 0.0, 0.0]), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="Expected `labels` to be 0 or 1"):
        delong(np.array([1.0, 2.0, 0.0, 0.0]), np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="same length"):
        delong(labels, np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        delong(labels, np.array([0.1, np.nan, 0.2, 0.3]), np.ones(4))


# -------------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_interval_covers_the_true_difference_at_the_stated_rate():
    # Both predictions share a large error component c, so the MSE difference is much tighter than
    # either MSE: an unpaired bootstrap (or too wide an interval) covers nearly always and fails here.
    rng = np.random.default_rng(0)
    true_difference = 0.5**2 - 0.3**2  # E(c + u_a)² - E(c + u_b)² with u_a ~ N(0, .5²), u_b ~ N(0, .3²)
    covered = 0
    reps = 200
    for rep in range(reps):
        n = 300
        y = rng.normal(size=n)
        c = rng.normal(size=n)
        a = y + c + 0.5 * rng.normal(size=n)
        b = y + c + 0.3 * rng.normal(size=n)
        result = paired_bootstrap(y, a, b, "mse", resamples=400, seed=rep)
        covered += result.ci_low <= true_difference <= result.ci_high
    assert 0.90 <= covered / reps <= 0.99


def test_paired_bootstrap_difference_p_value_mask_and_determinism(monkeypatch):
    rng = np.random.default_rng(1)
    n = 500
    labels = (rng.random(n) < 0.3).astype(float)
    good = 3 * (labels - 0.5) + rng.normal(size=n)
    bad = 0.5 * (labels - 0.5) + rng.normal(size=n)
    result = paired_bootstrap(labels, bad, good, "logloss", resamples=300, seed=7)
    assert result.difference == pytest.approx(logloss(labels, bad) - logloss(labels, good))
    assert (result.value_a, result.value_b) == pytest.approx((logloss(labels, bad), logloss(labels, good)))
    assert result.ci_low <= result.difference <= result.ci_high
    assert result.p_value == pytest.approx(1 / 301)  # every resample on one side: the floor
    assert paired_bootstrap(labels, bad, good, "logloss", resamples=300, seed=7) == result
    assert paired_bootstrap(labels, bad, good, "logloss", resamples=300, seed=8) != result
    # The chunks that bound memory do not change the draws.
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 7 * n)
    assert paired_bootstrap(labels, bad, good, "logloss", resamples=300, seed=7) == result
    same = paired_bootstrap(labels, good, good, "logloss", resamples=50)
    assert (same.difference, same.p_value) == (0.0, 1.0)
    mask = rng.random(n) < 0.6
    labels_nan = np.where(mask, labels, np.nan)  # rows outside the sample space carry no label
    masked = paired_bootstrap(labels_nan, bad, good, "mse", resamples=100, seed=3, mask=mask)
    assert masked == paired_bootstrap(labels[mask], bad[mask], good[mask], "mse", resamples=100, seed=3)


def test_paired_bootstrap_p_value_is_two_sided_and_near_uniform_under_the_null():
    rng = np.random.default_rng(2)
    p_values = []
    for rep in range(100):
        y = rng.normal(size=200)
        a, b = y + rng.normal(size=200), y + rng.normal(size=200)  # same population MSE
        p_values.append(paired_bootstrap(y, a, b, "mse", resamples=200, seed=rep).p_value)
    p_values = np.array(p_values)
    assert 0.0 < np.mean(p_values < 0.05) <= 0.12
    assert 0.35 <= np.mean(p_values) <= 0.65


def test_paired_bootstrap_rejects_bad_input():
    y = np.zeros(4)
    with pytest.raises(ValueError, match="Expected metric to be 'logloss' or 'mse'"):
        paired_bootstrap(y, y, y, "auc")
    with pytest.raises(ValueError, match="positive integer"):
        paired_bootstrap(y, y, y, "mse", resamples=0)
    with pytest.raises(ValueError, match="boolean array of shape"):
        paired_bootstrap(y, y, y, "mse", mask=np.ones(4))
    with pytest.raises(ValueError, match="at least one row"):
        paired_bootstrap(y, y, y, "mse", mask=np.zeros(4, bool))
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(y, y, np.zeros(3), "mse")


# ------------------------------------------------------------------------------- over seeds, t


def test_t_quantile_and_cdf_match_scipy():
    for df in range(1, 61):
        for q in (0.6, 0.9, 0.95, 0.975, 0.995, 0.025):
            assert t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), abs=1e-6, rel=1e-9), (q, df)
        for t in (-8.0, -1.3, 0.2, 2.5, 40.0):
            assert t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-12), (t, df)
    assert t_quantile(0.975, 2.5) == pytest.approx(scipy_stats.t.ppf(0.975, 2.5), rel=1e-9)  # fractional df
    with pytest.raises(ValueError, match="probability in"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_cdf(1.0, 0)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_seed_interval_matches_scipy_t_interval(n):
    values = np.random.default_rng(n).normal(0.01, 0.02, size=n)
    got = seed_interval(values)
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=values.mean(), scale=scipy_stats.sem(values))
    assert got.n == n and got.mean == pytest.approx(values.mean())
    assert got.sd == pytest.approx(np.std(values, ddof=1))
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-9)
    assert got.excludes_zero == (low > 0 or high < 0)
    wider = seed_interval(values, confidence=0.99)
    assert wider.half_width == pytest.approx(scipy_stats.t.ppf(0.995, n - 1) * scipy_stats.sem(values), rel=1e-9)


def test_seed_interval_with_one_seed_has_no_interval():
    one = seed_interval([0.03])
    assert (one.mean, one.sd, one.n, one.half_width, one.low, one.high) == (0.03, None, 1, None, None, None)
    assert not one.excludes_zero
    with pytest.raises(ValueError, match="non-empty"):
        seed_interval([])
    with pytest.raises(ValueError, match="finite"):
        seed_interval([0.1, math.nan])


# --------------------------------------------------------------------------------------- verdicts


def test_task_verdict_needs_the_interval_and_a_majority_of_seeds():
    tight = [0.010, 0.012, 0.011]
    assert task_verdict(tight, [0.001, 0.01, 0.03]) == "gain"
    assert task_verdict([-g for g in tight], [0.001, 0.01, 0.03]) == "loss"
    assert task_verdict(tight, [0.2, 0.3, 0.4]) == "n.s."  # consistent over seeds, not on the test rows
    assert task_verdict(tight, [0.01, 0.3, 0.4]) == "n.s."  # 1 of 3 seeds is no majority
    assert task_verdict(tight, [0.01, 0.01, 0.4]) == "gain"  # 2 of 3 is
    assert task_verdict(tight, [0.01, 0.01, None]) == "gain"
    assert task_verdict(tight, [0.01, None, None]) == "n.s."  # an untested seed is not significant
    # Every seed significant, but in different directions: the interval over seeds includes 0.
    assert task_verdict([0.03, 0.001, -0.0005], [0.001, 0.001, 0.001]) == "n.s."
    # The test's own direction counts, not only the sign of the stored gain.
    assert task_verdict(tight, [0.01, 0.01, 0.01], directions=[-0.01, -0.01, 0.01]) == "n.s."
    assert task_verdict(tight, [0.04] * 3) == "gain" and task_verdict(tight, [0.04] * 3, alpha=0.01) == "n.s."
    # One seed: the per-seed test alone decides.
    assert task_verdict([0.01], [0.01]) == "gain"
    assert task_verdict([-0.01], [0.01]) == "loss"
    assert task_verdict([0.01], [0.2]) == "n.s."
    assert task_verdict(tight, [None] * 3) == "untested"
    with pytest.raises(ValueError, match="one p-value"):
        task_verdict(tight, [0.01])


def test_model_verdict_wording():
    assert model_verdict({"a": "gain", "b": "gain"}) == "gains on every task"
    assert model_verdict({"a": "loss", "b": "loss"}) == "negative transfer on every task"
    assert model_verdict({"a": "gain", "b": "loss"}) == "seesaw: gains on a, loses on b"
    assert model_verdict({"a": "gain", "b": "loss", "c": "n.s."}) == (
        "seesaw: gains on a, loses on b, no significant difference on c"
    )
    assert model_verdict({"a": "gain", "b": "n.s."}) == "gains on a, no significant difference on b"
    assert model_verdict({"a": "n.s.", "b": "loss"}) == "loses on b, no significant difference on a"
    assert model_verdict({"a": "n.s.", "b": "n.s."}) == "no significant difference"
    assert model_verdict({"a": "gain", "b": "untested"}) == "gains on a; untested on b (test predictions missing)"
    assert model_verdict({"a": "untested"}) == "untested: no per-seed test (test predictions missing)"
    with pytest.raises(ValueError, match="one of"):
        model_verdict({"a": "better"})


KINDS = {"click": "binary", "watch": "regression"}
# (noise on the click logit, noise on the watch prediction): less noise is a better model.
QUALITY = {
    "single": (1.0, 0.6),
    "good": (0.4, 0.3),
    "seesaw": (0.4, 1.0),
    "same": (1.0, 0.6),
    "bad": (2.0, 1.0),
    "half": (0.4, 0.6),
}
EXPECTED = {
    "good": "gains on every task",
    "seesaw": "seesaw: gains on click, loses on watch",
    "same": "no significant difference",
    "bad": "negative transfer on every task",
    "half": "gains on click, no significant difference on watch",
}


def fake_comparison(seeds=(0, 1, 2), rows=3000):
    """Runs and test predictions of six 'models' whose quality is set by the noise on the truth."""
    rng = np.random.default_rng(123)
    truth = np.stack([1.5 * rng.normal(size=rows), rng.normal(size=rows)], axis=1)  # (N, 2)
    mask = np.stack([np.ones(rows, bool), rng.random(rows) < 0.9], axis=1)  # watch missing on a tenth
    labels = np.stack([rng.random(rows) < 1 / (1 + np.exp(-truth[:, 0])), truth[:, 1] + 0.3 * rng.normal(size=rows)], 1)
    labels = np.where(mask, labels.astype(float), np.nan)
    runs, predictions = [], {}
    for model, noise in QUALITY.items():
        for seed in seeds:
            preds = truth + np.asarray(noise) * rng.normal(size=truth.shape)  # (N, 2): a logit, a value
            predictions[model, seed] = (preds, labels, mask)
            runs.append(
                SimpleNamespace(model=model, seed=seed, metrics={"test": evaluate_tasks(KINDS, preds, labels, mask)})
            )
    return runs, predictions


def test_verdicts_on_a_constructed_comparison():
    runs, predictions = fake_comparison()
    summary = summarize(runs, KINDS, predictions=predictions, resamples=200)
    assert {m: summary.verdict(m) for m in EXPECTED} == EXPECTED
    assert summary.tests["seesaw", "click"].verdict == "gain"
    assert summary.tests["half", "watch"].verdict == "n.s."
    assert summary.tests["bad", "watch"].verdict == "loss"
    gain = summary.tests["good", "click"]
    assert gain.test == "delong" and gain.metric == "auc" and gain.seeds == (0, 1, 2)
    assert all(p < 0.05 for p in gain.p_values)
    assert gain.interval.low > 0
    assert summary.tests["good", "watch"].test == "bootstrap"
    assert summary.gains["good", "click"].mean == pytest.approx(gain.interval.mean)
    # One seed: the per-seed test alone decides, and with these sizes it decides the same way.
    one = summarize([r for r in runs if r.seed == 0], KINDS, predictions=predictions, resamples=200)
    assert {m: one.verdict(m) for m in EXPECTED} == EXPECTED
    assert one.tests["good", "click"].interval.half_width is None
    # Without a model's predictions its gains stay and its verdict says it was not tested.
    partial = {k: v for k, v in predictions.items() if k[0] != "half"}
    some = summarize(runs, KINDS, predictions=partial, resamples=200)
    assert some.verdict("half") == "untested: no per-seed test (test predictions missing)"
    assert some.tests["half", "click"].interval == summary.tests["half", "click"].interval
    assert some.verdict("good") == EXPECTED["good"]
    text = summary_markdown(summary)
    assert "Verdict rule (α = 0.05)" in text and "seesaw: gains on click, loses on watch" in text
    assert "[" in text and "<0.001" in text


def test_predictions_from_run_folders_and_results_csv(tmp_path):
    runs, predictions = fake_comparison(seeds=(0, 1), rows=400)
    for (model, seed), (preds, labels, mask) in predictions.items():
        if model != "half":  # one model ran before test predictions were saved
            folder = tmp_path / "runs" / model / f"seed{seed}"
            folder.mkdir(parents=True)
            np.savez(folder / "test_predictions.npz", predictions=preds, labels=labels, mask=mask)
    from_files = summarize(runs, KINDS, predictions=predictions_loader(tmp_path), resamples=100)
    from_memory = summarize(
        runs, KINDS, predictions={k: v for k, v in predictions.items() if k[0] != "half"}, resamples=100
    )
    assert from_files.tests == from_memory.tests
    assert from_files.verdict("half").startswith("untested")
    write_results_csv(runs, tmp_path / "results.csv", from_files)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "seed", "task", "metric", "split", "value"]
    get = lambda model, seed, task, metric: [  # noqa: E731
        float(r["value"])
        for r in rows
        if (r["model"], r["seed"], r["task"], r["metric"]) == (model, seed, task, metric)
    ]
    test = from_files.tests["good", "click"]
    assert get("good", "1", "click", "gain_auc") == [pytest.approx(test.gains[1])]
    assert get("good", "1", "click", "p_delong") == [pytest.approx(test.p_values[1])]
    assert get("good", "0", "watch", "p_bootstrap") == [pytest.approx(from_files.tests["good", "watch"].p_values[0])]
    assert get("half", "0", "click", "p_delong") == []  # untested: no p row
    assert get("half", "0", "click", "gain_auc") != []
    for name, value in [
        ("mean", test.interval.mean),
        ("sd", test.interval.sd),
        ("ci_low", test.interval.low),
        ("ci_high", test.interval.high),
    ]:
        assert get("good", "all", "click", f"gain_auc_{name}") == [pytest.approx(value)]
    assert not any(r["model"] == "single" and r["metric"].startswith(("gain_", "p_")) for r in rows)


def test_predictions_on_other_rows_are_an_error():
    runs, predictions = fake_comparison(seeds=(0,), rows=200)
    preds, labels, mask = predictions["good", 0]
    predictions["good", 0] = (preds, labels[::-1].copy(), mask[::-1].copy())
    with pytest.raises(ValueError, match="test predictions of good seed 0 to be on the same rows as single"):
        summarize(runs, KINDS, predictions=predictions, resamples=20)
