"""The single-task baseline is single-task: own embeddings, own loss, own model selection (PLE Eq. 11)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from plerec.config import experiment_from_dict, load_experiment
from plerec.models import build_model, stack_single_task
from plerec.train import fit, load_checkpoint, predict, prepare_data

VOCABS, NUM_DENSE, NUM_TASKS = [6, 4, 9], 3, 3


def _batch(rows=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.arange(rows) % v for v in VOCABS], dim=1)  # every id of every field appears
    return sparse, torch.randn(rows, NUM_DENSE, generator=g)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bottom_dims", [[16], [], [16, 8]])
def test_no_task_loss_has_a_gradient_on_any_weight_another_task_uses(bottom_dims):
    """Every parameter element that task k's loss moves (embeddings included) gets exactly zero gradient
    from every other task's loss, and each task moves some weights: nothing is shared."""
    torch.manual_seed(0)
    model = build_model("single", {"bottom_dims": bottom_dims, "tower_dims": [8]}, VOCABS, NUM_DENSE, NUM_TASKS)
    model.input.embedding.sparse = False
    with torch.no_grad():  # embeddings of a realistic size, so their gradients are not tiny
        model.input.embedding.weight.normal_()
    sparse, dense = _batch()
    grads = []
    for k in range(NUM_TASKS):
        logits = model(sparse, dense)  # (B, T)
        grads.append(_grads(model, logits[:, k].square().mean()))
    for k in range(NUM_TASKS):
        assert sum(int((g != 0).sum()) for g in grads[k].values()) > 0
        assert (grads[k]["input.embedding.weight"] != 0).any(), "a task's loss must train its embeddings"
        for j in range(NUM_TASKS):
            if j == k:
                continue
            for name, g in grads[k].items():
                overlap = (g != 0) & (grads[j][name] != 0)
                assert not overlap.any(), f"tasks {k} and {j} both move {name}"


def test_shared_bottom_fails_the_independence_property():
    """The property above is a real check: a hard-sharing model with the same layers violates it."""
    torch.manual_seed(0)
    model = build_model("shared_bottom", {"bottom_dims": [5], "tower_dims": [3]}, VOCABS, NUM_DENSE, 2)
    model.input.embedding.sparse = False
    sparse, dense = _batch()
    g0 = _grads(model, model(sparse, dense)[:, 0].square().mean())
    g1 = _grads(model, model(sparse, dense)[:, 1].square().mean())
    assert any(((g0[n] != 0) & (g1[n] != 0)).any() for n in g0)


def test_stacked_model_computes_what_each_one_task_model_computes():
    sparse, dense = _batch(rows=20, seed=3)
    parts = []
    for k in range(NUM_TASKS):
        torch.manual_seed(k)
        parts.append(build_model("single", {"bottom_dims": [5], "tower_dims": [3]}, VOCABS, NUM_DENSE, 1))
    stacked = stack_single_task(parts, VOCABS, NUM_DENSE)
    expected = torch.cat([m(sparse, dense) for m in parts], dim=1)
    torch.testing.assert_close(stacked(sparse, dense), expected, rtol=0, atol=1e-6)


def _table(path, rows=400, seed=0):
    """Task `easy` learns fast and then overfits; task `slow` keeps improving: their best epochs differ."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4))
    frame = pd.DataFrame({f"f{i}": x[:, i] for i in range(4)})
    frame["cat"] = rng.choice(list("abcdefgh"), size=rows)
    frame["easy"] = (x[:, 0] + rng.normal(scale=1.5, size=rows) > 0).astype(int)
    frame["slow"] = (np.sin(3 * x[:, 1]) * x[:, 2] + 0.3 * rng.normal(size=rows) > 0).astype(int)
    frame.to_csv(path, index=False)
    return path


def _experiment(path, **train):
    return experiment_from_dict(
        {
            "seed": 3,
            "data": {"path": str(path), "split": [0.5, 0.25, 0.25]},
            "features": {"numeric": ["f*"], "categorical": ["cat"]},
            "tasks": [
                {"name": "easy", "kind": "binary", "label": "easy"},
                {"name": "slow", "kind": "binary", "label": "slow"},
            ],
            "model": {"name": "single", "embedding_dim": 2, "bottom_dims": [32], "tower_dims": [16]},
            "train": {"epochs": 12, "batch_size": 32, "lr": 0.01, "patience": 0, "progress": False, **train},
        }
    )


def test_each_task_is_selected_on_its_own_validation_metric(tmp_path):
    """Two tasks end on different best epochs, each the best of its own validation AUC."""
    exp = _experiment(_table(tmp_path / "log.csv"))
    result = fit(exp, out_dir=tmp_path / "run")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["best_epoch"] == result.best_epochs
    assert result.best_epochs["easy"] != result.best_epochs["slow"]
    for task in ("easy", "slow"):
        aucs = [record["valid"][task]["auc"] for record in history["epochs"]]
        assert result.best_epochs[task] == 1 + int(np.argmax(aucs))


def test_baseline_equals_separate_one_task_runs_with_the_same_seed(tmp_path):
    """The K-task baseline's test metrics and predictions are those of K one-task experiments, each
    trained on its own from its own experiment file."""
    exp = _experiment(_table(tmp_path / "log.csv"), epochs=4, patience=2)
    data = prepare_data(exp)
    joint = fit(exp, data, out_dir=tmp_path / "joint")
    joint_logits = predict(joint.model, data.splits["test"])
    for k, task in enumerate(("easy", "slow")):
        alone_exp = load_experiment(tmp_path / "joint" / "tasks" / task / "experiment.toml")
        assert [t.name for t in alone_exp.tasks] == [task]
        alone = fit(alone_exp, out_dir=tmp_path / f"alone_{task}")
        assert alone.metrics["test"][task] == joint.metrics["test"][task]
        alone_logits = predict(alone.model, prepare_data(alone_exp).splits["test"])
        torch.testing.assert_close(joint_logits[:, k : k + 1], alone_logits, rtol=0, atol=1e-6)
    # The stacked checkpoint scores like the model it was made of.
    model, _, loaded_exp = load_checkpoint(tmp_path / "joint" / "best.pt")
    assert loaded_exp.model_name == "single" and len(loaded_exp.tasks) == 2
    torch.testing.assert_close(predict(model, data.splits["test"]), joint_logits)


def test_baseline_trains_each_task_on_its_own_loss_only(tmp_path):
    """Adding a second task (a different label) leaves the first task's single-task model untouched."""
    path = _table(tmp_path / "log.csv")
    both = _experiment(path, epochs=3)
    one = experiment_from_dict({**_raw(both), "tasks": [{"name": "easy", "kind": "binary", "label": "easy"}]})
    a = fit(both, out_dir=tmp_path / "both")
    b = fit(one, out_dir=tmp_path / "one")
    assert a.metrics["test"]["easy"] == b.metrics["test"]["easy"]


def _raw(exp):
    from plerec.config import experiment_to_dict

    return experiment_to_dict(exp)


def test_the_baseline_streamed_from_parquet_equals_streamed_one_task_runs(tmp_path):
    """Per-task views of streamed splits: each task's batches carry its own labels only."""
    from parquet_splits import write_splits

    path = write_splits(tmp_path, 101, epochs=3)
    path.write_text(path.read_text().replace('name = "ple"', 'name = "single"').replace("expert_dims", "bottom_dims"))
    streamed = fit(load_experiment(path, ["data.streaming=true"]), out_dir=tmp_path / "stream")
    assert set(streamed.metrics["test"]) == {"click", "watch"}
    for task in ("click", "watch"):
        alone = fit(load_experiment(tmp_path / "stream" / "tasks" / task / "experiment.toml"))
        assert alone.metrics["test"][task] == streamed.metrics["test"][task]


def test_plerec_train_single_reports_each_tasks_best_epoch(tmp_path, capsys):
    from plerec.cli import main

    exp = _experiment(_table(tmp_path / "log.csv"), epochs=3)
    path = tmp_path / "exp.toml"
    from plerec.config import write_experiment

    write_experiment(exp, path)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    result = json.loads((tmp_path / "run" / "history.json").read_text())["best_epoch"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"best epochs easy {result['easy']}, slow {result['slow']};"), line
