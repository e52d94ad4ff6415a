import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, mean_squared_error, roc_auc_score

from plerec.metrics import (
    HIGHER_IS_BETTER,
    METRICS_BY_KIND,
    TaskMetricAccumulator,
    auc,
    evaluate_tasks,
    logloss,
    mse,
    mtl_gain,
    task_metrics,
)

TASKS = {"ctr": "binary", "vcr": "regression", "cvr": "binary"}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def random_tasks(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 3) logits, labels and mask for TASKS; rounded logits so scores have many ties."""
    rng = np.random.default_rng(seed)
    logits = np.round(rng.normal(0, 2, size=(n, 3)), 1)
    columns = [rng.integers(0, 2, n), rng.normal(0.5, 0.3, n), rng.integers(0, 2, n)]
    labels = np.stack(columns, axis=1).astype(np.float64)
    mask = rng.random((n, 3)) < 0.7
    labels[~mask] = np.nan  # rows outside a space may hold anything; they must never be read
    return logits, labels, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 8, 300).astype(float)  # only 8 distinct values: heavy ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_of_perfect_reversed_and_constant_scores():
    labels = np.array([0, 0, 1, 1])
    assert auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auc(labels, np.zeros(4)) == 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_logloss_and_mse_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400).astype(float)
    logits = rng.uniform(-9.5, 9.5, 400)  # |logit| < 10 keeps sklearn's probability clipping inert
    assert logloss(labels, logits) == pytest.approx(log_loss(labels, sigmoid(logits)), rel=1e-10)
    targets, preds = rng.normal(size=400), rng.normal(size=400)
    assert mse(targets, preds) == pytest.approx(mean_squared_error(targets, preds), rel=1e-12)


def test_logloss_is_finite_for_extreme_logits():
    # Probabilities of exactly 0/1 would give log(0); the logit form stays finite and exact.
    assert logloss(np.array([1.0, 0.0]), np.array([-1000.0, 1000.0])) == pytest.approx(1000.0)
    assert logloss(np.array([1.0, 0.0]), np.array([1000.0, -1000.0])) == 0.0


def test_masked_metrics_match_sklearn_on_filtered_rows():
    logits, labels, mask = random_tasks()
    result = evaluate_tasks(TASKS, logits, labels, mask)
    for t, name in enumerate(TASKS):
        keep = mask[:, t]
        y, z = labels[keep, t], logits[keep, t]
        assert result[name]["n"] == int(keep.sum())
        if TASKS[name] == "binary":
            assert set(result[name]) == {"auc", "logloss", "n"}
            assert result[name]["auc"] == pytest.approx(roc_auc_score(y, z), abs=1e-12)
            assert result[name]["logloss"] == pytest.approx(log_loss(y, sigmoid(z)), rel=1e-10)
        else:
            assert set(result[name]) == {"mse", "n"}
            assert result[name]["mse"] == pytest.approx(mean_squared_error(y, z), rel=1e-12)


def test_tasks_are_not_flattened_together():
    # Each task ranks perfectly within itself, but task b's scores sit far below task a's, so a
    # single AUC over both columns flattened would rank b's positives under a's negatives.
    logits = np.array([[10.0, -10.0], [11.0, -9.0], [10.5, -9.5], [11.5, -8.5]])
    labels = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    mask = np.ones_like(labels, dtype=bool)
    result = evaluate_tasks({"a": "binary", "b": "binary"}, logits, labels, mask)
    assert result["a"]["auc"] == result["b"]["auc"] == 1.0
    assert roc_auc_score(labels.ravel(), logits.ravel()) < 1.0


def test_single_class_space_leaves_auc_out_and_empty_space_has_only_n():
    labels = np.array([1.0, 1.0, 0.0])
    logits = np.array([0.5, -0.2, 3.0])
    single = task_metrics("binary", logits, labels, np.array([True, True, False]))
    assert set(single) == {"logloss", "n"} and single["n"] == 2
    assert task_metrics("binary", logits, labels, np.zeros(3, dtype=bool)) == {"n": 0}
    assert task_metrics("regression", logits, labels, np.zeros(3, dtype=bool)) == {"n": 0}


def test_accumulated_batches_equal_one_shot():
    logits, labels, mask = random_tasks(seed=3)
    acc = TaskMetricAccumulator(TASKS)
    for start in range(0, len(logits), 64):
        rows = slice(start, start + 64)
        acc.update(torch.tensor(logits[rows]), torch.tensor(labels[rows]), torch.tensor(mask[rows]))
    assert acc.compute() == evaluate_tasks(TASKS, logits, labels, mask)
    acc.reset()
    assert acc.compute() == {name: {"n": 0} for name in TASKS}


def test_accumulator_detaches_and_accepts_low_precision():
    acc = TaskMetricAccumulator({"ctr": "binary"})
    logits = torch.tensor([[0.5], [-1.0], [2.0]], requires_grad=True)
    acc.update(logits.to(torch.bfloat16), torch.tensor([[1.0], [0.0], [1.0]]), torch.ones(3, 1, dtype=bool))
    assert acc.compute()["ctr"]["auc"] == 1.0


@pytest.mark.parametrize(
    ("metric", "model", "single", "gain"),
    [
        ("auc", 0.95, 0.94, 0.01),
        ("auc", 0.93, 0.94, -0.01),
        ("mse", 0.13, 0.14, 0.01),
        ("logloss", 0.50, 0.45, -0.05),
    ],
)
def test_mtl_gain_sign_follows_metric_direction(metric, model, single, gain):
    assert mtl_gain(metric, model, single) == pytest.approx(gain)


def test_every_metric_of_every_kind_has_a_direction():
    assert {m for ms in METRICS_BY_KIND.values() for m in ms} == set(HIGHER_IS_BETTER)


def update_one_task(mask: torch.Tensor) -> None:
    TaskMetricAccumulator({"ctr": "binary"}).update(torch.zeros(mask.shape), torch.zeros(mask.shape), mask)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: auc(np.ones(4), np.arange(4.0)), "Expected both classes .* but got only positives"),
        (lambda: auc(np.zeros(4), np.arange(4.0)), "but got only negatives"),
        (lambda: auc(np.array([0, 2]), np.arange(2.0)), "Expected `labels` to be 0 or 1"),
        (lambda: auc(np.array([0, 1]), np.array([0.0, np.nan])), "Expected `scores` to be finite"),
        (lambda: mse(np.zeros(3), np.zeros(4)), "same length, but got shapes"),
        (lambda: logloss(np.zeros(0), np.zeros(0)), "Expected at least one sample"),
        (lambda: mtl_gain("ndcg", 0.5, 0.4), r"one of \['auc', 'logloss', 'mse'\], but got 'ndcg'"),
        (lambda: task_metrics("ranking", np.zeros(2), np.zeros(2), np.ones(2, bool)), "task kind"),
        (lambda: task_metrics("binary", np.zeros(2), np.zeros(2), np.ones(2)), "boolean array"),
        (
            lambda: evaluate_tasks(TASKS, np.zeros((4, 2)), np.zeros((4, 2)), np.ones((4, 2), bool)),
            r"shape \(N, 3\)",
        ),
        (lambda: TaskMetricAccumulator({"ctr": "multiclass"}), "kind of task 'ctr'"),
        (lambda: update_one_task(torch.ones(2, 1)), "bool tensor"),
        (lambda: update_one_task(torch.ones(2, 2, dtype=bool)), r"\(B, 1\)"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
