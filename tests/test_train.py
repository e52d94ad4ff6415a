"""The training loop: masked losses (Eq. 9), loss weights (Eq. 10), determinism, early stopping, checkpoints."""

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_experiments import experiment as _experiment
from tiny_experiments import write_table

import plerec.train as train_module
from plerec.checkpoint import read_checkpoint_file
from plerec.config import experiment_from_dict
from plerec.data.tables import EncodedTable
from plerec.models import build_model
from plerec.train import (
    evaluate,
    fit,
    load_checkpoint,
    loss_weights,
    masked_task_losses,
    monitor_value,
    predict,
    prepare_data,
)


def _write_table(path, rows: int = 300, seed: int = 0) -> None:
    """Two dense features, one categorical; `click` is binary, `watch` a regression with missing labels."""
    write_table(path, rows, seed, missing=0.2)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "table.csv"
    _write_table(path)
    return path


def _initial_model(exp, data):
    """The model `fit` starts from: it seeds torch with the experiment seed right before building."""
    torch.manual_seed(exp.seed)
    enc = data.encoder
    return build_model(exp.model_name, exp.model, enc.vocab_sizes, len(enc.dense_names), len(exp.tasks))


# ---------------------------------------------------------------------------------------------
# Masked losses (Eq. 9)


def test_masked_loss_equals_loss_on_filtered_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 3, generator=g)
    is_binary = torch.tensor([True, False, True])
    labels = torch.randn(32, 3, generator=g)
    labels[:, is_binary] = (labels[:, is_binary] > 0).float()
    mask = torch.rand(32, 3, generator=g) > 0.4
    losses = masked_task_losses(logits, labels, mask, is_binary)

    expected = torch.stack(
        [
            F.binary_cross_entropy_with_logits(logits[mask[:, 0], 0], labels[mask[:, 0], 0]),
            F.mse_loss(logits[mask[:, 1], 1], labels[mask[:, 1], 1]),
            F.binary_cross_entropy_with_logits(logits[mask[:, 2], 2], labels[mask[:, 2], 2]),
        ]
    )
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, expected)


def test_masked_loss_ignores_whatever_lies_outside_the_space():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 2, generator=g)
    labels = (torch.rand(16, 2, generator=g) > 0.5).float()
    mask = torch.rand(16, 2, generator=g) > 0.5
    is_binary = torch.tensor([True, False])
    garbage = labels.masked_fill(~mask, float("nan"))
    torch.testing.assert_close(
        masked_task_losses(logits, garbage, mask, is_binary), masked_task_losses(logits, labels, mask, is_binary)
    )


@pytest.mark.parametrize("empty_kind", ["binary", "regression"])
def test_task_without_labelled_rows_adds_zero_and_no_gradient(empty_kind):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 2, generator=g, requires_grad=True)
    is_binary = torch.tensor([True, empty_kind == "binary"])
    labels = (torch.rand(8, 2, generator=g) > 0.5).float()
    labels[:, 1] = float("nan")  # what a missing label looks like before encoding
    mask = torch.ones(8, 2, dtype=torch.bool)
    mask[:, 1] = False

    losses = masked_task_losses(logits, labels, mask, is_binary)
    assert losses[1].item() == 0.0
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[:, 1], torch.zeros(8))
    assert logits.grad[:, 0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Loss weights (Eq. 10)


def _weighted_tasks(w0: float, g0: float, w1: float = 1.0, g1: float = 1.0) -> list:
    return [
        {"name": "click", "kind": "binary", "label": "click", "weight": w0, "gamma": g0},
        {"name": "watch", "kind": "regression", "label": "watch", "weight": w1, "gamma": g1},
    ]


def test_loss_weights_follow_eq_10(table_path):
    exp = _experiment(table_path, tasks=_weighted_tasks(2.0, 0.5, 3.0, 1.1))
    for t in (0, 1, 3, 7):
        torch.testing.assert_close(loss_weights(exp, t), torch.tensor([2.0 * 0.5**t, 3.0 * 1.1**t]))
    assert loss_weights(exp, 0).dtype == torch.float32


@pytest.mark.parametrize("schedule", ["epoch", "step"])
def test_fit_advances_the_weight_schedule_per_epoch_or_per_step(table_path, monkeypatch, schedule):
    exp = _experiment(table_path, tasks=_weighted_tasks(2.0, 0.5), weight_schedule=schedule, patience=0)
    seen = []

    def recording(exp_, t):
        weights = loss_weights(exp_, t)
        seen.append((t, weights.tolist()))
        return weights

    monkeypatch.setattr(train_module, "loss_weights", recording)
    fit(exp)
    steps_per_epoch = 3  # 180 training rows in batches of 64
    expected_t = (
        [0] * steps_per_epoch + [1] * steps_per_epoch if schedule == "epoch" else list(range(2 * steps_per_epoch))
    )
    assert [t for t, _ in seen] == expected_t
    for t, weights in seen:
        assert weights == pytest.approx([2.0 * 0.5**t, 1.0])


@pytest.mark.parametrize("frozen", [0, 1])
def test_zero_weight_task_tower_gets_no_update(table_path, frozen):
    weights = [1.0, 1.0]
    weights[frozen] = 0.0
    exp = _experiment(table_path, tasks=_weighted_tasks(weights[0], 1.0, weights[1], 1.0), patience=0)
    data = prepare_data(exp)
    before = _initial_model(exp, data)
    after = fit(exp, data).model
    towers_before, towers_after = before.body.towers.mlp, after.body.towers.mlp
    other = 1 - frozen
    for w0, w1 in zip(towers_before.weights, towers_after.weights, strict=True):
        assert torch.equal(w0[frozen], w1[frozen])
        assert not torch.equal(w0[other], w1[other])
    for b0, b1 in zip(towers_before.biases, towers_after.biases, strict=True):
        assert torch.equal(b0[frozen], b1[frozen])
        assert not torch.equal(b0[other], b1[other])


# ---------------------------------------------------------------------------------------------
# Determinism


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_identical_weights_and_another_seed_does_not(table_path):
    first = _state(fit(_experiment(table_path, seed=3)).model)
    second = _state(fit(_experiment(table_path, seed=3)).model)
    other = _state(fit(_experiment(table_path, seed=4)).model)
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


# ---------------------------------------------------------------------------------------------
# Early stopping, model selection and checkpoints


def _script_monitor(monkeypatch, values: list[float]) -> list[dict]:
    """Make each validation pass of `fit` report the next of `values` (higher is better) as its monitor.

    Returns the model states seen by each evaluation, in order.
    """
    scripted, evaluated, snapshots = iter(values), set(), []
    real_evaluate, real_monitor = train_module.evaluate_split, train_module.monitor_value

    def snapshot_evaluate(model, data, split, exp_, ctx):
        metrics, rows = real_evaluate(model, data, split, exp_, ctx)
        if split == "valid" and len(snapshots) < len(values):
            snapshots.append(_state(model))
            evaluated.add(id(metrics))
        return metrics, rows

    def scripted_monitor(metrics, exp_, *stats):
        return (next(scripted), True) if id(metrics) in evaluated else real_monitor(metrics, exp_, *stats)

    monkeypatch.setattr(train_module, "evaluate_split", snapshot_evaluate)
    monkeypatch.setattr(train_module, "monitor_value", scripted_monitor)
    return snapshots


def test_early_stopping_respects_patience_and_restores_best_epoch(table_path, monkeypatch, tmp_path):
    exp = _experiment(table_path, epochs=10, patience=2, monitor="click")
    # Best at epoch 2, then two epochs without gain; the later better values must never be reached.
    snapshots = _script_monitor(monkeypatch, [0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    result = fit(exp, out_dir=tmp_path)

    assert [r["monitor"] for r in result.history] == [0.5, 0.7, 0.6, 0.65]
    assert result.best_epoch == 2
    best_state = snapshots[1]  # the validation pass after epoch 2
    restored = result.model.state_dict()
    assert all(torch.equal(restored[k], best_state[k]) for k in best_state)
    assert not all(torch.equal(restored[k], snapshots[3][k]) for k in best_state)  # not the last epoch's
    payload = read_checkpoint_file(tmp_path / "best.pt")
    assert payload["epoch"] == 2
    assert all(torch.equal(payload["state_dict"][k], best_state[k]) for k in best_state)


def test_best_weights_are_copied_only_when_a_later_epoch_changes_them(table_path, monkeypatch, tmp_path):
    # Best at epoch 2 of 3; the run dies at the start of epoch 3 and resumes from the end of epoch 2.
    exp = _experiment(table_path, epochs=3, patience=0, monitor="click")
    steps_per_epoch = -(-len(prepare_data(exp).splits["train"]) // 64)
    snapshots = _script_monitor(monkeypatch, [0.5, 0.7, 0.6])
    calls, real_weights = {"n": 0}, train_module.loss_weights

    def dying(exp_, t):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 1:
            raise RuntimeError("killed at the first step of epoch 3")
        return real_weights(exp_, t)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "loss_weights", dying)
        with pytest.raises(RuntimeError, match="killed"):
            fit(exp, out_dir=tmp_path)
    saved = read_checkpoint_file(tmp_path / "last.pt")
    assert saved["progress"]["epoch"] == 2
    # The best epoch is the one just trained: its weights are the model's, saved once, not copied.
    assert saved["best_state"] is None
    assert all(torch.equal(saved["model"][k], snapshots[1][k]) for k in snapshots[1])

    result = fit(exp, out_dir=tmp_path, resume=True)
    assert result.best_epoch == 2 and len(result.history) == 3
    restored = result.model.state_dict()
    assert all(torch.equal(restored[k], snapshots[1][k]) for k in snapshots[1])  # epoch 3 was worse
    assert not all(torch.equal(restored[k], snapshots[2][k]) for k in snapshots[2])


def test_no_early_stop_with_patience_zero(table_path, monkeypatch):
    exp = _experiment(table_path, epochs=4, patience=0, monitor="click")
    _script_monitor(monkeypatch, [0.9, 0.1, 0.1, 0.1])
    result = fit(exp)
    assert len(result.history) == 4
    assert result.best_epoch == 1


def test_restored_model_is_the_best_epoch_and_best_pt_round_trips(table_path, tmp_path):
    # A large learning rate makes validation bounce, so the best epoch is not the last one.
    exp = _experiment(table_path, epochs=6, patience=0, lr=0.5, batch_size=32)
    data = prepare_data(exp)
    result = fit(exp, data, out_dir=tmp_path)

    monitors = [r["monitor"] for r in result.history]
    _, higher = monitor_value(result.history[0]["valid"], exp, data.encoder.label_stats)
    assert higher is True  # mixed binary/regression tasks: the mean of scale-free skills (AUC, R²)
    assert result.best_epoch == int(np.argmax(monitors)) + 1
    assert result.best_epoch < len(result.history), "the test needs a best epoch before the last"
    restored_value, _ = monitor_value(evaluate(result.model, data.splits["valid"], exp), exp, data.encoder.label_stats)
    assert restored_value == pytest.approx(max(monitors), rel=1e-12)
    assert result.metrics["valid"] == result.history[result.best_epoch - 1]["valid"]

    model, encoder, trained = load_checkpoint(tmp_path / "best.pt")
    assert trained == exp
    assert encoder.state_dict() == data.encoder.state_dict()
    assert not model.training
    test = data.splits["test"]
    assert torch.equal(predict(model, test), predict(result.model, test))


def test_load_checkpoint_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="plerec checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_ple_trains_with_batch_size_one(tmp_path):
    path = tmp_path / "tiny.csv"
    _write_table(path, rows=10, seed=5)  # a seed whose 2-row valid and test splits hold both classes
    exp = _experiment(path, batch_size=1, epochs=1)
    data = prepare_data(exp)
    assert len(data.splits["train"]) == 6  # six steps of one row each
    before = _initial_model(exp, data)
    result = fit(exp, data)
    losses = result.history[0]["train_loss"]
    assert all(np.isfinite(v) for v in losses.values())
    after = result.model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.state_dict().items())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_predict_on_an_empty_table_has_one_column_per_task(table_path):
    exp = _experiment(table_path)
    data = prepare_data(exp)
    model = _initial_model(exp, data)
    empty = EncodedTable(
        sparse=torch.zeros(0, 1, dtype=torch.int16),
        dense=torch.zeros(0, 2),
        labels=torch.zeros(0, 2),
        label_mask=torch.zeros(0, 2, dtype=torch.bool),
    )
    assert predict(model, empty).shape == (0, 2)
    assert evaluate(model, empty, exp) == {"click": {"n": 0}, "watch": {"n": 0}}


@pytest.mark.parametrize("batch_size", [1, 7, 299, 300, 1000])
def test_predict_fills_every_row_in_order_whatever_the_batch_size(table_path, batch_size):
    """Batches are written into one output tensor: each row's logits land in its own row, the last
    (partial) batch included, in float32."""
    exp = _experiment(table_path)
    data = prepare_data(exp)
    model = _initial_model(exp, data).eval()
    table = data.splits["train"]
    with torch.inference_mode():
        whole = model(table.sparse, table.dense)
    got = predict(model, table, batch_size)
    assert got.dtype == torch.float32 and got.shape == whole.shape
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------------
# The validation monitor


THREE_TASKS = [
    {"name": "click", "kind": "binary", "label": "click"},
    {"name": "like", "kind": "binary", "label": "click"},
    {"name": "watch", "kind": "regression", "label": "watch"},
]
METRICS = {
    "click": {"auc": 0.8, "logloss": 0.4, "n": 10},
    "like": {"auc": 0.6, "logloss": 0.6, "n": 10},
    "watch": {"mse": 2.0, "n": 8},
}
# training positive rate 0.3 for both binary tasks; the regression labels' std 2 (variance 4)
LABEL_STATS = {
    "click": {"mean": 0.3, "std": 0.46},
    "like": {"mean": 0.3, "std": 0.46},
    "watch": {"mean": 5, "std": 2.0},
}
ENTROPY_30 = -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))


@pytest.mark.parametrize(
    ("monitor", "metric", "expected"),
    [
        ("click", "auto", (0.8, True)),
        ("like", "auto", (0.6, True)),
        ("watch", "auto", (2.0, False)),
        # several tasks: the mean of scale-free skills, AUC, 1 - logloss / H(p), 1 - MSE / var (higher is better)
        ("mean", "auto", ((0.8 + 0.6 + (1 - 2.0 / 4.0)) / 3, True)),
        ("click", "logloss", (0.4, False)),
        ("mean", "loss", (((1 - 0.4 / ENTROPY_30) + (1 - 0.6 / ENTROPY_30) + (1 - 2.0 / 4.0)) / 3, True)),
        ("watch", "mse", (2.0, False)),
    ],
)
def test_monitor_value(table_path, monitor, metric, expected):
    exp = _experiment(table_path, tasks=THREE_TASKS, monitor=monitor, monitor_metric=metric)
    value, higher = monitor_value(METRICS, exp, LABEL_STATS)
    assert value == pytest.approx(expected[0])
    assert higher is expected[1]


def test_monitor_mean_of_binary_tasks_is_mean_auc(table_path):
    exp = _experiment(table_path, tasks=THREE_TASKS[:2], monitor="mean")
    assert monitor_value(METRICS, exp) == (pytest.approx(0.7), True)


@pytest.mark.parametrize(
    ("monitor", "metric", "message"),
    [
        ("click", "mse", "'mse' does not apply to binary task `click`"),
        ("mean", "mse", "'mse' does not apply to binary task `click`"),
        ("watch", "auc", "'auc' does not apply to regression task `watch`"),
        ("watch", "logloss", "'logloss' does not apply to regression task `watch`"),
    ],
)
def test_monitor_metric_that_does_not_apply_raises(table_path, monitor, metric, message):
    exp = _experiment(table_path, tasks=THREE_TASKS, monitor=monitor, monitor_metric=metric)
    with pytest.raises(ValueError, match=message):
        monitor_value(METRICS, exp)


def test_fit_rejects_a_monitor_metric_that_does_not_apply_before_training(table_path, monkeypatch, tmp_path):
    exp = _experiment(table_path, monitor="click", monitor_metric="mse")
    steps = []
    monkeypatch.setattr(train_module, "masked_task_losses", lambda *args: steps.append(1))
    with pytest.raises(ValueError, match="'mse' does not apply to binary task `click`"):
        fit(exp, out_dir=tmp_path / "run")
    assert steps == []  # no epoch was spent
    assert not (tmp_path / "run").exists()


def test_fit_selects_on_the_monitored_task(table_path):
    result = fit(_experiment(table_path, monitor="click", epochs=3, patience=0, lr=0.05))
    monitors = [r["monitor"] for r in result.history]
    assert monitors == [r["valid"]["click"]["auc"] for r in result.history]
    assert result.best_epoch == int(np.argmax(monitors)) + 1


def test_sparse_embedding_update_equals_dense_adam_on_touched_rows():
    """SparseAdam on the rows a batch touches gives the weights dense Adam gives them; other rows stay put."""
    from plerec.models import build_model
    from plerec.train import make_optimizers

    exp = experiment_from_dict(
        {
            "data": {"path": "unused.csv"},
            "features": {"categorical": ["a"]},
            "tasks": [{"name": "t", "kind": "binary", "label": "t"}],
            "train": {"lr": 1e-2},
        }
    )
    vocabs, steps = [50, 40], 5
    g = torch.Generator().manual_seed(0)
    # Every batch touches the same rows (ids 1..6 of each field), so both optimisers see them every step.
    sparse_ids = torch.stack([torch.randint(1, 7, (32,), generator=g) for _ in vocabs], dim=1)
    sparse_ids[:6, 0] = sparse_ids[:6, 1] = torch.arange(1, 7)
    dense, labels = torch.randn(32, 2, generator=g), (torch.rand(32, 1, generator=g) > 0.5).float()
    models = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build_model("mmoe", {"num_experts": 2, "expert_dims": [4], "tower_dims": [3]}, vocabs, 2, 1)
        model.input.embedding.sparse = sparse
        optimizers = make_optimizers(model, replace(exp, train=replace(exp.train, sparse_embeddings=sparse)))
        assert len(optimizers) == (2 if sparse else 1)
        for _ in range(steps):
            loss = masked_task_losses(
                model(sparse_ids, dense), labels, torch.ones_like(labels, dtype=torch.bool), torch.tensor([True])
            )
            for opt in optimizers:
                opt.zero_grad()
            loss.sum().backward()
            for opt in optimizers:
                opt.step()
        models.append(model)
    dense_model, sparse_model = models
    touched = torch.unique(sparse_ids + model.input.offsets)
    untouched = torch.ones(sum(vocabs), dtype=torch.bool)
    untouched[touched] = False
    w_dense, w_sparse = dense_model.input.embedding.weight, sparse_model.input.embedding.weight
    torch.testing.assert_close(w_sparse[touched], w_dense[touched], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    initial = build_model("mmoe", {"num_experts": 2, "expert_dims": [4], "tower_dims": [3]}, vocabs, 2, 1)
    torch.testing.assert_close(w_sparse[untouched], initial.input.embedding.weight[untouched], rtol=0, atol=0)
    assert not torch.allclose(w_sparse[touched], initial.input.embedding.weight[touched])
    for (name, p_dense), p_sparse in zip(dense_model.named_parameters(), sparse_model.parameters(), strict=True):
        torch.testing.assert_close(p_sparse, p_dense, rtol=1e-5, atol=1e-6, msg=name)


def test_dense_embedding_gradients_get_the_same_lazy_update_as_sparse_ones():
    """Under NCCL the embedding gradients travel dense; the rule stays the lazy row update without weight
    decay: the same weights, bit for bit, as the sparse gradients give, untouched rows unmoved."""
    from plerec.models import build_model
    from plerec.train import make_optimizers

    exp = experiment_from_dict(
        {
            "data": {"path": "unused.csv"},
            "features": {"categorical": ["a"]},
            "tasks": [{"name": "t", "kind": "binary", "label": "t"}],
            "train": {"lr": 1e-2, "weight_decay": 0.1},
        }
    )
    vocabs = [50, 40]
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.stack([torch.randint(1, v, (16,), generator=g) for v in vocabs], 1), torch.randn(16, 2, generator=g))
        for _ in range(4)
    ]
    labels = (torch.rand(16, 1, generator=g) > 0.5).float()
    weights = []
    for sparse in (True, False):
        torch.manual_seed(0)
        model = build_model("mmoe", {"num_experts": 2, "expert_dims": [4], "tower_dims": [3]}, vocabs, 2, 1)
        model.input.set_sparse(sparse)  # False: the gradients DDP leaves under NCCL
        optimizers = make_optimizers(model, exp)
        assert [type(o).__name__ for o in optimizers] == ["Adam", "RowSparseAdam"]
        for ids, dense in batches:
            loss = masked_task_losses(
                model(ids, dense), labels, torch.ones_like(labels, dtype=torch.bool), torch.tensor([True])
            )
            for opt in optimizers:
                opt.zero_grad()
            loss.sum().backward()
            assert model.input.embedding.weight.grad.is_sparse == sparse
            for opt in optimizers:
                opt.step()
        weights.append(model.input.embedding.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    torch.manual_seed(0)
    initial = build_model("mmoe", {"num_experts": 2, "expert_dims": [4], "tower_dims": [3]}, vocabs, 2, 1)
    touched = torch.unique(torch.cat([ids + model.input.offsets for ids, _ in batches]))
    untouched = torch.ones(sum(vocabs), dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(weights[1][untouched], initial.input.embedding.weight[untouched])  # no decay there


# ---------------------------------------------------------------------------------------------
# Tasks of mixed kinds


def _mixed_table(path, rows=4000, seed=0):
    """A purchase task beside a spend task in the thousands (MSE ~1e6 unstandardised against BCE ~0.5)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6))
    frame = pd.DataFrame({f"f{i}": x[:, i] for i in range(6)})
    frame["cat"] = rng.choice(list("abcdefghij"), size=rows)
    frame["buy"] = (x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + rng.normal(size=rows) > 0.8).astype(int)
    frame["spend"] = 2000 + 800 * x[:, 4] + 300 * x[:, 5] ** 2 + rng.normal(scale=100, size=rows)
    frame.to_csv(path, index=False)
    return path


def _mixed_experiment(path, model, tasks, **task_keys):
    return experiment_from_dict(
        {
            "seed": 0,
            "data": {"path": str(path), "split": [0.6, 0.2, 0.2]},
            "features": {"numeric": ["f*"], "categorical": ["cat"]},
            "tasks": [
                {"name": "buy", "kind": "binary", "label": "buy"},
                {"name": "spend", "kind": "regression", "label": "spend", **task_keys},
            ][:tasks],
            "model": {"name": model, "embedding_dim": 4, "bottom_dims": [32], "tower_dims": [16]},
            "train": {"epochs": 12, "batch_size": 64, "patience": 3, "progress": False},
        }
    )


def test_a_regression_task_in_the_thousands_does_not_drag_a_binary_task_below_its_one_task_run(tmp_path):
    from plerec.stats import delong

    path = _mixed_table(tmp_path / "mixed.csv")
    alone_exp = _mixed_experiment(path, "single", 1)
    alone = fit(alone_exp)
    test = prepare_data(alone_exp).splits["test"]
    labels = test.labels[:, 0].double().numpy()
    alone_scores = predict(alone.model, test)[:, 0].double().numpy()
    outcomes = {}
    spend = {}
    for standardize in (True, False):
        exp = _mixed_experiment(path, "shared_bottom", 2, standardize=standardize)
        data = prepare_data(exp)
        assert torch.equal(data.splits["test"].labels[:, 0].double(), test.labels[:, 0].double())  # the same rows
        joint = fit(exp, data)
        predictions = predict(joint.model, data.splits["test"]).double()
        outcomes[standardize] = delong(labels, predictions[:, 0].numpy(), alone_scores)
        spend[standardize] = float(predictions[:, 1].mean())
    # Standardised (the default): within noise of the one-task run (DeLong z > -2) ...
    assert outcomes[True].z > -2, outcomes[True]
    # ... while the raw MSE swamps the binary loss and costs it significantly: the test can fail.
    assert outcomes[False].z < -2, outcomes[False]
    # Standardised, the network starts at the training mean and predicts in the label's units (spend ~ 2,300).
    assert 1500 < spend[True] < 3000, spend


def test_a_nan_validation_monitor_stops_the_run_naming_task_and_split(table_path, tmp_path, monkeypatch, capsys):
    """A NaN monitor would keep epoch 1 'best' for ever (NaN compares false); it is an error instead."""
    real_evaluate = train_module.evaluate_split

    def nan_valid(model, data, split, exp_, ctx):
        metrics, rows = real_evaluate(model, data, split, exp_, ctx)
        if split == "valid":
            metrics["click"]["auc"] = float("nan")
        return metrics, rows

    monkeypatch.setattr(train_module, "evaluate_split", nan_valid)
    exp = _experiment(table_path, epochs=2, monitor="click")
    with pytest.raises(ValueError, match=r"Task `click` has nan validation auc \(valid split, \d+ rows"):
        fit(exp)
    from plerec.config import write_experiment

    write_experiment(exp, tmp_path / "exp.toml")
    from plerec.cli import main

    assert main(["train", str(tmp_path / "exp.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "Task `click` has nan validation auc (valid split" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "device", "expected", "reason"),
    [
        ({"avx2", "amx_bf16", "amx_tile"}, "cpu", True, "on (the CPU has amx_bf16)"),  # AMX: measured faster
        ({"avx512f", "avx512_bf16"}, "cpu", True, "on (the CPU has avx512_bf16)"),  # AVX-512 BF16: measured faster
        ({"avx512f", "avx512_vnni"}, "cpu", False, "off (fp32: no amx_bf16 or avx512_bf16 here)"),
        ({"avx2", "fma"}, "cpu", False, "off (fp32: no amx_bf16 or avx512_bf16 here)"),
        (set(), "cpu", False, "off (fp32: no amx_bf16 or avx512_bf16 here)"),
        ({"amx_bf16"}, "cuda", False, "off (not measured on cuda: set bf16 = true to ask for it)"),
    ],
)
def test_bf16_auto_decides_by_the_cpu_flags(flags, device, expected, reason):
    from plerec.train import use_bf16

    assert use_bf16("auto", torch.device(device), frozenset(flags)) == (expected, reason)
    assert use_bf16(True, torch.device(device), frozenset(flags)) == (True, None)  # as given, whatever the CPU
    assert use_bf16(False, torch.device(device), frozenset(flags)) == (False, None)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from plerec.train import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\nbogomips\t: 1\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_bf16_takes_true_false_or_auto():
    task = {"name": "t", "kind": "binary", "label": "t"}
    base = {"data": {"path": "x.csv"}, "features": {"numeric": ["a"]}, "tasks": [task]}
    assert experiment_from_dict({**base, "train": {"bf16": "auto"}}).train.bf16 == "auto"
    with pytest.raises(ValueError, match="Expected \\[train\\] `bf16` to be true, false or \"auto\", but got 'yes'"):
        experiment_from_dict({**base, "train": {"bf16": "yes"}})
