"""Loss balancing ([train] balancing): each method's update against a hand computation on a two-task toy
problem, `fixed` unchanged, every method through `fit`, exact resumption, and `compare --balancing`."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_experiments import experiment as _experiment
from tiny_experiments import write_table
from torch import nn

import plerec.train as train_module
from plerec.balancing import (
    DWA,
    GradNorm,
    PCGrad,
    Uncertainty,
    check_balancing,
    dwa_weights,
    last_shared_weight,
    make_balancing,
    project_conflicting,
    task_specific_parameters,
)
from plerec.cli import main
from plerec.compare import compare, parse_balancing
from plerec.config import BALANCING_METHODS, experiment_from_dict, load_experiment
from plerec.distributed import SINGLE_PROCESS, DistContext
from plerec.models import MultiTaskModel, build_model
from plerec.train import fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("balancing") / "table.csv"
    write_table(path, missing=0.2)
    return path


def _toy_experiment(**train):
    """A binary and a regression task; the data is never read."""
    return experiment_from_dict(
        {
            "data": {"path": "unused.csv"},
            "features": {"numeric": ["a"]},
            "tasks": [
                {"name": "click", "kind": "binary", "label": "click"},
                {"name": "watch", "kind": "regression", "label": "watch"},
            ],
            "train": train,
        }
    )


# ---------------------------------------------------------------------------------------------
# Each method's update, by hand


def test_uncertainty_gradient_of_the_log_variances_is_the_closed_form():
    balancing = Uncertainty(_toy_experiment(balancing="uncertainty"), None, SINGLE_PROCESS)
    s = torch.tensor([0.3, -0.4])
    with torch.no_grad():
        balancing.log_vars.copy_(s)
    losses = torch.tensor([0.7, 2.3])
    loss = balancing.loss(losses, None, 0, 0)
    balancing.backward(loss, 1)
    # binary: exp(−s)·L + ½s; regression: ½·exp(−s)·L + ½s
    expected_loss = math.exp(-0.3) * 0.7 + 0.15 + 0.5 * math.exp(0.4) * 2.3 - 0.2
    expected_grad = torch.tensor([-math.exp(-0.3) * 0.7 + 0.5, -0.5 * math.exp(0.4) * 2.3 + 0.5])
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(balancing.log_vars.grad, expected_grad)


def test_uncertainty_leaves_the_log_variance_of_a_task_without_rows_alone():
    balancing = Uncertainty(_toy_experiment(balancing="uncertainty"), None, SINGLE_PROCESS)
    loss = balancing.loss(torch.tensor([0.7, 0.0]), None, 0, 0)  # no watch row in the batch
    balancing.backward(loss, 1)
    assert balancing.log_vars.grad[1].item() == 0.0
    assert balancing.log_vars.grad[0].item() == pytest.approx(-0.7 + 0.5)
    rows = torch.tensor([5.0, 0.0])  # under DDP the global counts decide
    balancing.log_vars.grad = None
    balancing.backward(balancing.loss(torch.tensor([0.7, 0.0]), rows, 0, 0), 1)
    assert balancing.log_vars.grad[1].item() == 0.0


class _ToyShared(nn.Module):
    """L_click = Σ W², L_watch = 3 · Σ W: ∇_W L_click = 2W, ∇_W L_watch = 3 (every entry)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, 2))

    def last_shared_weight(self):
        return self.w

    def losses(self):
        return torch.stack([self.w.square().sum(), 3 * self.w.sum()])


def _adam(grads, lr, betas=(0.9, 0.999), eps=1e-8):
    """Adam's total update after the gradients `grads` (one per step), written out."""
    m = v = torch.zeros_like(grads[0])
    updates = []
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        updates.append(lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))
    return updates


def test_gradnorm_weight_update_matches_a_hand_computation():
    lr, alpha = 0.05, 1.5
    exp = _toy_experiment(balancing="gradnorm", gradnorm={"alpha": alpha, "lr": lr})
    model = _ToyShared()
    balancing = GradNorm(exp, model, SINGLE_PROCESS)
    assert balancing.layer is model.w

    # Step 1, W = 1: L = (4, 12) = L(0), so r = 1; ‖∇L‖ = (2·‖W‖, 3·‖1‖) = (4, 6); G = (4, 6), target 5.
    loss = balancing.loss(model.losses(), None, 0, 0)
    assert loss.item() == pytest.approx(4 + 12)  # the weights before the update: 1
    torch.testing.assert_close(balancing.norms, torch.tensor([4.0, 6.0]))
    g1 = torch.tensor([-4.0, 6.0])  # sign(G − target) · ‖∇L‖
    torch.testing.assert_close(balancing.task_weights.grad, g1)
    balancing.after_step()
    w1 = torch.ones(2) - _adam([g1], lr)[0]
    w1 = w1 * 2 / w1.sum()
    torch.testing.assert_close(balancing.task_weights.detach(), w1)

    # Step 2, W = ½: L = (1, 6), L̃ = (¼, ½), r = (⅔, 4⁄3); ‖∇L‖ = (2, 6).
    with torch.no_grad():
        model.w.fill_(0.5)
    loss = balancing.loss(model.losses(), None, 0, 1)
    assert loss.item() == pytest.approx(float(w1[0] * 1 + w1[1] * 6), rel=1e-6)
    norms = torch.tensor([2.0, 6.0])
    g = w1 * norms
    r = torch.tensor([2 / 3, 4 / 3])
    target = g.mean() * r**alpha
    g2 = torch.sign(g - target) * norms
    torch.testing.assert_close(balancing.task_weights.grad, g2)
    balancing.after_step()
    first, second = _adam([g1, g2], lr)
    w2 = w1 - second
    w2 = w2 * 2 / w2.sum()  # renormalised to sum to the number of tasks
    torch.testing.assert_close(balancing.task_weights.detach(), w2)
    assert balancing.task_weights.sum().item() == pytest.approx(2.0)


def test_dwa_weights_from_two_epochs_losses():
    exp = _toy_experiment(balancing="dwa", dwa={"temperature": 2.0})
    balancing = DWA(exp, None, SINGLE_PROCESS)
    losses = torch.tensor([0.8, 3.0])
    assert balancing.loss(losses, None, 0, 0).item() == pytest.approx(3.8)  # w = 1 in epoch 1
    balancing.end_epoch(torch.tensor([1.0, 2.0]))
    assert balancing.loss(losses, None, 1, 0).item() == pytest.approx(3.8)  # and in epoch 2
    balancing.end_epoch(torch.tensor([0.5, 1.8]))
    r = [0.5 / 1.0, 1.8 / 2.0]
    e = [math.exp(x / 2.0) for x in r]
    expected = [2 * x / sum(e) for x in e]
    torch.testing.assert_close(balancing.task_weights, torch.tensor(expected))
    assert balancing.loss(losses, None, 2, 0).item() == pytest.approx(expected[0] * 0.8 + expected[1] * 3.0)
    balancing.end_epoch(torch.tensor([0.5, 0.9]))  # only the last two epochs count: r = (1, ½)
    e = [math.exp(1.0 / 2), math.exp(0.5 / 2)]
    torch.testing.assert_close(balancing.task_weights, torch.tensor([2 * x / sum(e) for x in e]))
    assert dwa_weights([torch.tensor([1.0, 2.0])], 2.0).tolist() == [1.0, 1.0]


def test_pcgrad_projects_conflicting_gradients_onto_each_others_normal_plane():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1 · g2 = −1 < 0
    # g1 − (g1·g2)/‖g2‖² g2 = (1, 0) + ½ (−1, 1) = (½, ½);  g2 − (g1·g2)/‖g1‖² g1 = (−1, 1) + (1, 0) = (0, 1)
    torch.testing.assert_close(project_conflicting(g, [[1], [0]]), torch.tensor([0.5, 1.5]))


def test_pcgrad_leaves_gradients_that_do_not_conflict_alone():
    g = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, -0.5]])  # dot = 0: no conflict
    torch.testing.assert_close(project_conflicting(g, [[1], [0]]), g.sum(0))
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(project_conflicting(g, [[1], [0]]), torch.tensor([2.0, 1.0]))


class _ToyTowers(nn.Module):
    """Two shared parameters (an embedding table, sparse or dense, and a gain) read by two per-task towers."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.table = nn.Embedding(4, 2, sparse=sparse)
        self.gain = nn.Parameter(torch.tensor([1.0, 0.5]))
        self.body = nn.Module()
        self.body.towers = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.table.weight.copy_(torch.tensor([[0.5, -1.0], [1.0, 0.2], [-0.3, 0.4], [2.0, 1.0]]))
            self.body.towers.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))

    def losses(self):
        h = self.table(torch.tensor([1, 3, 1])).sum(0) * self.gain  # (2,): rows 1 (twice) and 3
        out = self.body.towers(h)  # (2,) one output per task
        return torch.stack([out[0], out[1] + out[1].square() / 10])


def _pc(g1, g2):
    """Two-task PCGrad by hand: each projected on the other's normal plane where they conflict, summed."""
    dot = g1 @ g2
    if dot >= 0:
        return g1 + g2
    return g1 - dot / (g2 @ g2) * g2 + g2 - dot / (g1 @ g1) * g1


@pytest.mark.parametrize("sparse", [False, True])
def test_pcgrad_step_projects_the_shared_gradient_and_leaves_the_towers_ordinary(sparse):
    exp = _toy_experiment(balancing="pcgrad")
    model = _ToyTowers(sparse)
    assert [p is model.body.towers.weight for p in task_specific_parameters(model)] == [True]
    balancing = PCGrad(exp, model, SINGLE_PROCESS)
    assert {id(p) for p in balancing.shared} == {id(model.table.weight), id(model.gain)}
    losses = model.losses()
    shared = [model.table.weight, model.gain]
    per_task = []
    for k in range(2):
        grads = torch.autograd.grad(losses[k], shared, retain_graph=True)
        per_task.append(torch.cat([g.to_dense().flatten() for g in grads]))  # (8 + 2,) the whole gradient
    ordinary_tower = torch.autograd.grad(losses.sum(), model.body.towers.weight, retain_graph=True)[0]
    g1, g2 = per_task
    assert (g1 @ g2).item() < 0  # the toy's task gradients conflict
    expected = _pc(g1, g2)
    by_layer = torch.cat([_pc(g1[:8], g2[:8]), _pc(g1[8:], g2[8:])])
    assert not torch.allclose(expected, by_layer)  # projecting layer by layer would be another method

    balancing.backward(balancing.loss(losses, None, 0, 0), 1)
    grad = model.table.weight.grad
    assert grad.is_sparse == sparse
    torch.testing.assert_close(torch.cat([grad.to_dense().flatten(), model.gain.grad]), expected)
    torch.testing.assert_close(model.body.towers.weight.grad, ordinary_tower)


def test_pcgrad_keeps_an_auxiliary_losss_gradient():
    exp = _toy_experiment(balancing="pcgrad")
    model, twin = _ToyTowers(False), _ToyTowers(False)
    balancing, bare = PCGrad(exp, model, SINGLE_PROCESS), PCGrad(exp, twin, SINGLE_PROCESS)
    extra = model.table.weight.square().sum()  # an auxiliary loss on the shared table, added after balancing
    balancing.backward(balancing.loss(model.losses(), None, 0, 0) + extra, 1)
    bare.backward(bare.loss(twin.losses(), None, 0, 0), 1)
    torch.testing.assert_close(model.table.weight.grad, twin.table.weight.grad + 2 * model.table.weight.detach())
    torch.testing.assert_close(model.body.towers.weight.grad, twin.body.towers.weight.grad)


def test_gradnorm_last_shared_layer_per_family(table_path):
    def built(name, **params):
        return build_model(name, {"embedding_dim": 2, **params}, [4], 2, 2)

    ple = built("ple", expert_dims=[4, 3])
    assert last_shared_weight(ple) is ple.body.levels[-1].experts.weights[-1]
    mmoe = built("mmoe")
    assert last_shared_weight(mmoe) is mmoe.body.levels[0].experts.weights[-1]
    bottom = built("shared_bottom", bottom_dims=[5, 4])
    assert last_shared_weight(bottom) is bottom.body.bottom.weights[-1]
    for name in ("omoe", "ml_mmoe", "customized", "asymmetric", "cross_stitch", "sluice", "cgc"):
        w = last_shared_weight(built(name))
        assert w.dim() == 3  # a bank's (E, d_in, d_out) weights, never a tower's or an embedding
    for model in (ple, bottom):
        towers = {id(p) for p in model.body.towers.parameters()}
        assert {id(p) for p in task_specific_parameters(model)} == towers


@pytest.mark.parametrize("sparse", [False, True])
def test_gradnorm_falls_back_to_the_embeddings_of_a_model_whose_towers_read_them(sparse):
    model = _ToyTowers(sparse)  # towers on the embeddings (as in ESMM): nothing else every task reads
    model.input = nn.Module()
    model.input.embedding = model.table
    assert last_shared_weight(model) is model.table.weight
    balancing = GradNorm(_toy_experiment(balancing="gradnorm"), model, SINGLE_PROCESS)
    losses = model.losses()
    dense = [torch.autograd.grad(losses[k], model.table.weight, retain_graph=True)[0].to_dense() for k in range(2)]
    balancing.loss(losses, None, 0, 0)
    torch.testing.assert_close(balancing.norms, torch.stack([g.norm() for g in dense]))  # id 1 twice: rows summed


# ---------------------------------------------------------------------------------------------
# Through fit


def test_fixed_is_the_default_and_trains_bit_identically(table_path, monkeypatch):
    base = _experiment(table_path, epochs=2)
    assert base.train.balancing == "fixed"
    absent = fit(base)

    def no_task_gradients(*args, **kwargs):
        raise AssertionError("fixed computes no per-task gradient")

    monkeypatch.setattr(torch.autograd, "grad", no_task_gradients)
    fixed = fit(_experiment(table_path, epochs=2, balancing="fixed"))
    for key, value in absent.model.state_dict().items():
        assert torch.equal(value, fixed.model.state_dict()[key]), key
    assert all("balancing" not in record for record in fixed.history)  # history.json as before


@pytest.mark.parametrize("sparse", [True, False])
def test_fixed_equals_a_plain_weighted_sum_loop(table_path, sparse):
    """`fixed` is the loop as it was: Σ_k ω_k(t) · L_k, one backward pass, the optimisers' step."""
    from plerec.data.batches import InMemoryBatches
    from plerec.train import loss_weights, make_optimizers, masked_task_losses, prepare_data, set_output_scale

    tasks = [
        {"name": "click", "kind": "binary", "label": "click", "weight": 2.0, "gamma": 0.5},
        {"name": "watch", "kind": "regression", "label": "watch", "weight": 0.5},
    ]
    # One epoch (fit keeps the best epoch's weights), weights per step: ω_k0 · γ_k^step.
    exp = _experiment(table_path, epochs=1, tasks=tasks, sparse_embeddings=sparse, weight_schedule="step")
    data = prepare_data(exp)
    torch.manual_seed(exp.seed)
    enc = data.encoder
    model = build_model(exp.model_name, exp.model, num_tasks=2, **enc.model_inputs())
    set_output_scale(model, exp, enc)
    model.input.set_sparse(sparse)
    optimizers = make_optimizers(model, exp)
    source = InMemoryBatches(data.splits["train"], exp.train.batch_size, exp.seed, SINGLE_PROCESS)
    is_binary = torch.tensor([True, False])
    model.train()
    for step, batch in enumerate(source.epoch()):
        logits = model(*batch.inputs).float()
        losses = masked_task_losses(logits, batch.labels, batch.label_mask, is_binary, None, model.output_scale)
        loss = (loss_weights(exp, step) * losses).sum()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    trained = fit(exp, data).model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize("method", BALANCING_METHODS)
def test_every_method_trains_end_to_end(table_path, tmp_path, method):
    exp = _experiment(table_path, epochs=3, patience=0, balancing=method)
    result = fit(exp, out_dir=tmp_path)
    assert result.best_epoch >= 1
    for task in ("click", "watch"):
        assert all(math.isfinite(v) for v in result.metrics["test"][task].values() if isinstance(v, float))
    history = json.loads((tmp_path / "history.json").read_text())["epochs"]
    if method == "fixed":
        assert all("balancing" not in r for r in history)
        return
    assert [r["balancing"]["method"] for r in history] == [method] * 3
    if method in ("uncertainty", "gradnorm", "dwa"):
        weights = history[-1]["balancing"]["weights"]
        assert set(weights) == {"click", "watch"}
        assert weights != {"click": 1.0, "watch": 1.0}  # learnt or adapted, not left at 1
    if method == "gradnorm":
        assert sum(history[-1]["balancing"]["weights"].values()) == pytest.approx(2.0)


@pytest.mark.parametrize("sparse", [True, False])
def test_pcgrad_with_sparse_or_dense_embeddings_through_fit(table_path, sparse):
    result = fit(_experiment(table_path, epochs=1, balancing="pcgrad", sparse_embeddings=sparse))
    assert result.model.input.embedding.sparse == sparse
    assert math.isfinite(result.metrics["test"]["click"]["auc"])


def test_an_auxiliary_loss_is_added_after_balancing(table_path, monkeypatch):
    exp = _experiment(table_path, epochs=1)
    plain = fit(exp)
    seen = []

    def penalty(self, logits):
        seen.append(tuple(logits.shape))
        return 10.0 * logits[:, 0].square().mean()

    monkeypatch.setattr(MultiTaskModel, "auxiliary_loss", penalty, raising=False)
    for method in ("fixed", "pcgrad"):
        seen.clear()
        penalised = fit(_experiment(table_path, epochs=1, balancing=method))
        assert seen and all(shape[1] == 2 for shape in seen)
        changed = [
            k for k, v in plain.model.state_dict().items() if not torch.equal(v, penalised.model.state_dict()[k])
        ]
        assert changed  # its gradient reached the weights


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm", "dwa", "pcgrad"])
def test_resume_restores_the_methods_state(table_path, tmp_path, monkeypatch, method):
    # 3 steps per epoch; checkpoints every 2 steps: the run dies at step 6 (epoch 2), resumes from step 4.
    exp = _experiment(table_path, epochs=3, patience=0, balancing=method, checkpoint_every=2)
    whole = fit(exp, out_dir=tmp_path / "whole")
    calls, real = {"n": 0}, train_module.masked_task_losses

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise Crash
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "masked_task_losses", dying)
        with pytest.raises(Crash):
            fit(exp, out_dir=tmp_path / "cut")
    resumed = fit(exp, out_dir=tmp_path / "cut", resume=True)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    strip = lambda history: [{k: v for k, v in r.items() if k not in ("seconds", "epoch_seconds")} for r in history]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history)  # the learnt weights of every epoch included
    assert whole.metrics == resumed.metrics


def test_resume_without_the_methods_state_is_refused(table_path, tmp_path):
    from plerec.checkpoint import read_checkpoint_file, write_checkpoint_file

    exp = _experiment(table_path, epochs=1, balancing="uncertainty")
    fit(exp, out_dir=tmp_path)
    state = read_checkpoint_file(tmp_path / "last.pt")
    assert set(state["balancing"]) == {"log_vars"}
    del state["balancing"]
    write_checkpoint_file(tmp_path / "last.pt", state)
    with pytest.raises(ValueError, match="no state of \\[train\\] balancing = 'uncertainty'"):
        fit(_experiment(table_path, epochs=2, balancing="uncertainty"), out_dir=tmp_path, resume=True)


# ---------------------------------------------------------------------------------------------
# Configuration and refused combinations


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ({"balancing": "uncertain"}, "`balancing` to be one of fixed, .* Did you mean `uncertainty`"),
        ({"balancing": "gradnorm", "gradnorm": {"alpha": -1.0}}, "\\[train.gradnorm\\] `alpha`"),
        ({"gradnorm": {"lr": 0.0}}, "\\[train.gradnorm\\] `lr`"),
        ({"dwa": {"temperature": 0}}, "\\[train.dwa\\] `temperature`"),
        ({"dwa": {"temp": 1.0}}, "Unknown key `temp`"),
        ({"balancing": 3}, "\\[train\\] `balancing` to be a string"),
    ],
)
def test_bad_balancing_keys_are_errors_naming_the_key(train, match):
    with pytest.raises(ValueError, match=match):
        _toy_experiment(**train)


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm", "dwa"])
def test_methods_with_their_own_weights_refuse_eq_10_weights(method):
    exp = experiment_from_dict(
        {
            "data": {"path": "unused.csv"},
            "features": {"numeric": ["a"]},
            "tasks": [
                {"name": "click", "kind": "binary", "label": "click", "weight": 2.0},
                {"name": "watch", "kind": "regression", "label": "watch"},
            ],
            "train": {"balancing": method},
        }
    )
    with pytest.raises(ValueError, match="weight = 1 and gamma = 1 .* `click` \\(weight 2, gamma 1\\)"):
        check_balancing(exp, SINGLE_PROCESS)
    check_balancing(experiment_from_dict({**_raw(exp), "train": {"balancing": "pcgrad"}}), SINGLE_PROCESS)


def _raw(exp):
    return {
        "data": {"path": "unused.csv"},
        "features": {"numeric": ["a"]},
        "tasks": [{"name": t.name, "kind": t.kind, "label": t.label, "weight": t.weight} for t in exp.tasks],
    }


@pytest.mark.parametrize("method", ["gradnorm", "pcgrad"])
def test_per_task_gradient_methods_refuse_ddp(method):
    with pytest.raises(ValueError, match=f"balancing = '{method}' cannot run under torchrun"):
        make_balancing(_toy_experiment(balancing=method), None, DistContext(world_size=2))
    for fine in ("fixed", "uncertainty", "dwa"):
        check_balancing(_toy_experiment(balancing=fine), DistContext(world_size=2))


def test_the_example_loads():
    exp = load_experiment(ROOT / "examples" / "census_balancing.toml")
    assert exp.train.balancing == "uncertainty"
    assert (exp.train.gradnorm.alpha, exp.train.dwa.temperature) == (1.5, 2.0)


def test_balancing_keys_at_their_defaults_leave_fingerprints_unchanged(table_path):
    from plerec.checkpoint import differences
    from plerec.config import experiment_to_dict, key_defaults

    now = experiment_to_dict(_experiment(table_path))
    before = json.loads(json.dumps(now))
    for key in ("balancing", "gradnorm", "dwa"):
        del before["train"][key]  # a record written before the keys existed
    assert differences(before, now, defaults=key_defaults()) == []
    changed = experiment_to_dict(_experiment(table_path, balancing="dwa", dwa={"temperature": 1.0}))
    assert differences(before, changed, defaults=key_defaults()) == [
        "train.balancing: (absent, so 'fixed') -> 'dwa'",
        "train.dwa: (absent, so {'temperature': 2.0}) -> {'temperature': 1.0}",
    ]


# ---------------------------------------------------------------------------------------------
# compare --balancing


def test_parse_balancing_rejects_unknown_methods():
    assert parse_balancing("fixed, pcgrad,fixed") == ["fixed", "pcgrad"]
    with pytest.raises(ValueError, match="Unknown balancing method `pcgad`.*Did you mean `pcgrad`"):
        parse_balancing("fixed,pcgad")
    with pytest.raises(ValueError, match="--balancing"):
        parse_balancing(" , ")


def test_compare_balancing_gives_distinct_runs_and_rows(table_path, tmp_path, capsys):
    exp_path = tmp_path / "exp.toml"
    exp_path.write_text(
        f"""
[data]
path = "{table_path}"
split = [0.6, 0.2, 0.2]
[features]
numeric = ["a", "b"]
categorical = ["cat"]
[[tasks]]
name = "click"
kind = "binary"
label = "click"
[[tasks]]
name = "watch"
kind = "regression"
label = "watch"
[model]
name = "ple"
embedding_dim = 2
expert_dims = [4]
tower_dims = [4]
[train]
epochs = 1
batch_size = 64
progress = false
"""
    )
    out = tmp_path / "out"
    argv = ["compare", str(exp_path), "--models", "ple", "--balancing", "fixed,uncertainty,pcgrad"]
    assert main([*argv, "--seeds", "1", "--out", str(out), "--quiet"]) == 0
    names = ["single", "ple", "ple+uncertainty", "ple+pcgrad"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names)
    trained = {
        name: json.loads((out / "runs" / name / "seed0" / "run.json").read_text())["fingerprint"]["experiment"]
        for name in names
    }
    assert {name: e["train"]["balancing"] for name, e in trained.items()} == {
        "single": "fixed",
        "ple": "fixed",
        "ple+uncertainty": "uncertainty",
        "ple+pcgrad": "pcgrad",
    }
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == set(names)
    gains = {r["model"] for r in rows if r["metric"] == "gain_auc"}
    assert gains == {"ple", "ple+uncertainty", "ple+pcgrad"}  # each tested against the single-task model
    assert any(r["metric"] == "p_delong" and r["model"] == "ple+pcgrad" for r in rows)
    summary = (out / "summary.md").read_text()
    assert "| ple+uncertainty |" in summary and "| ple+pcgrad |" in summary
    assert "MODEL+METHOD" in summary

    # Without --balancing the comparison is the one it always was: the `ple` run is found done, not retrained.
    capsys.readouterr()
    assert main(["compare", str(exp_path), "--models", "ple", "--seeds", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "ple seed 0: already done, skipped" in err and "single seed 0: already done, skipped" in err
    assert "training" not in err


def test_compare_refuses_a_method_the_experiment_cannot_run_before_training(table_path, tmp_path):
    tasks = [
        {"name": "click", "kind": "binary", "label": "click", "gamma": 0.9},
        {"name": "watch", "kind": "regression", "label": "watch"},
    ]
    exp = _experiment(table_path, tasks=tasks)
    with pytest.raises(ValueError, match="balancing = 'dwa'"):
        compare(exp, ["ple"], 1, tmp_path / "out", balancing=["fixed", "dwa"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["uncertainty"])
def test_ddp_with_a_balancing_method_equals_one_process(tmp_path, method):
    """Two gloo ranks under torchrun against one process on the same global batches: uncertainty's
    log-variances are averaged over the ranks and its regulariser split between them (DWA reads the epoch's
    global training losses, whose DDP parity test_distributed checks)."""
    import os
    import subprocess

    from parquet_splits import write_splits

    from plerec.checkpoint import read_checkpoint_file

    experiment = write_splits(tmp_path, 101, epochs=3)  # DWA's weights move after epoch 2
    overrides = [f"train.balancing={method}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "plerec", "train", str(experiment), "--out", str(tmp_path / "ddp"), "--quiet"]
    done = subprocess.run(cmd + ["--set", overrides[0]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    single = fit(load_experiment(experiment, overrides), ctx=DistContext())
    ddp = read_checkpoint_file(tmp_path / "ddp" / "last.pt")
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    ddp_history = ddp["progress"]["history"]
    for a, b in zip(ddp_history, single.history, strict=True):
        for name, weight in b["balancing"]["weights"].items():
            assert a["balancing"]["weights"][name] == pytest.approx(weight, rel=1e-5)
    assert single.history[-1]["balancing"]["weights"] != {"click": 1.0, "watch": 1.0}


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_a_funnels_towers_count_as_shared_for_pcgrad(name):
    """A funnel's tower of step t feeds every later step's output (ESMM's product, AITM's transfer), so no
    parameter of it is one task's alone: PCGrad projects them all."""
    from plerec.balancing import task_specific_parameters
    from plerec.models import build_model

    model = build_model(name, {"embedding_dim": 2, "tower_dims": [4, 3]}, [5, 4], 2, 2)
    assert task_specific_parameters(model) == []
    ple = build_model("ple", {"embedding_dim": 2, "expert_dims": [4], "tower_dims": [3]}, [5, 4], 2, 2)
    towers = {id(p) for p in ple.body.towers.parameters()}
    assert towers and {id(p) for p in task_specific_parameters(ple)} == towers
