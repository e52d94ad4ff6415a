"""Funnel models: ESMM's pCTCVR = pCTR × pCVR and where its CVR head learns from; AITM's transfer attention and
calibrator; CVR metrics on clicked rows; funnel tasks refused when they cannot be trained; fit end to end."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from plerec.config import TaskConfig, experiment_from_dict, load_experiment
from plerec.data.tables import EncodedTable
from plerec.metrics import task_metrics
from plerec.models import build_model
from plerec.models.funnel import chain_logits, check_funnel_tasks, cvr_metrics
from plerec.train import fit, masked_task_losses, prepare_data

VOCABS, NUM_DENSE = [5, 7, 3], 4
SMALL = {"embedding_dim": 3, "tower_dims": [6, 4]}


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, v, (batch,), generator=g) for v in VOCABS], dim=1)
    return sparse, torch.randn(batch, NUM_DENSE, generator=g)


def _model(name: str, num_tasks: int = 2, seed: int = 0, **params):
    torch.manual_seed(seed)
    model = build_model(name, {**SMALL, **params}, VOCABS, NUM_DENSE, num_tasks)
    with torch.no_grad():  # embeddings far from their near-zero start, so rows differ
        model.input.embedding.weight.normal_()
    return model


def _funnel_labels(batch: int, num_tasks: int = 2, seed: int = 1) -> torch.Tensor:
    """Entire-space funnel labels: step t is 1 only where step t-1 is."""
    g = torch.Generator().manual_seed(seed)
    steps = (torch.rand(batch, num_tasks, generator=g) < 0.6).float()
    return torch.cumprod(steps, dim=1)  # (B, T)


# ---------------------------------------------------------------------------------------------
# ESMM


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_esmm_output_is_the_product_of_the_heads(num_tasks):
    model = _model("esmm", num_tasks)
    sparse, dense = _inputs(16)
    logits = model(sparse, dense)
    heads = model.funnel_probabilities(sparse, dense)  # (B, T): pCTR, pCVR, ...
    assert not torch.allclose(heads[:, 1], heads[0, 1])  # the rows really differ
    torch.testing.assert_close(logits[:, 0], model.funnel_step_logits(sparse, dense)[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(torch.sigmoid(logits), torch.cumprod(heads, dim=1))
    torch.testing.assert_close(torch.sigmoid(logits[:, 1]), heads[:, 0] * heads[:, 1])  # pCTCVR = pCTR × pCVR


def test_chain_logits_are_exact_and_finite_at_extreme_logits():
    values = torch.tensor([-200.0, -40.0, -3.0, 0.0, 2.5, 40.0, 200.0])
    a = torch.cartesian_prod(values, values, values)  # (343, 3)
    a.requires_grad_(True)
    out = chain_logits(a)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(a.grad).all()
    # Against float64: log p_t and log(1 - p_t) of the product of the sigmoids.
    a64 = a.detach().double()
    log_p = torch.cumsum(F.logsigmoid(a64), dim=1)
    log_not_p = torch.log(-torch.expm1(log_p))
    reference = log_p - log_not_p
    ok = torch.isfinite(reference)  # float64 itself saturates where p rounds to 1
    assert ok.float().mean() > 0.8
    torch.testing.assert_close(out.double()[ok], reference[ok], rtol=1e-5, atol=1e-4)
    # Where p is 1 to float64, the output still says "very likely" with a finite, large logit.
    assert (out.double()[~ok] > 30).all()
    # Losses on extreme logits stay finite both ways.
    labels = torch.cumprod((torch.rand(a.shape, generator=torch.Generator().manual_seed(0)) < 0.5).float(), dim=1)
    assert torch.isfinite(F.binary_cross_entropy_with_logits(out, labels)).all()


def test_changing_the_cvr_head_moves_only_the_ctcvr_loss():
    model = _model("esmm")
    sparse, dense = _inputs(32)
    labels = _funnel_labels(32)
    mask, is_binary = torch.ones(32, 2, dtype=torch.bool), torch.tensor([True, True])
    before = masked_task_losses(model(sparse, dense), labels, mask, is_binary).detach()
    with torch.no_grad():
        model.body.towers.biases[-1][1].add_(1.5)  # the CVR head's output logit
    after = masked_task_losses(model(sparse, dense), labels, mask, is_binary).detach()
    assert after[0] == before[0]  # CTR: exactly unchanged
    assert abs(float(after[1] - before[1])) > 1e-3  # CTCVR moves


def test_the_cvr_head_learns_only_through_the_ctcvr_loss():
    model = _model("esmm")
    sparse, dense = _inputs(32)
    labels = _funnel_labels(32)
    mask, is_binary = torch.ones(32, 2, dtype=torch.bool), torch.tensor([True, True])
    towers = [*model.body.towers.weights, *model.body.towers.biases]  # every layer: [CTR head, CVR head]

    def grads(task: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Task `task`'s loss gradient on the CTR head's and the CVR head's parameters."""
        model.zero_grad()
        masked_task_losses(model(sparse, dense), labels, mask, is_binary)[task].backward()
        return [p.grad[0].clone() for p in towers], [p.grad[1].clone() for p in towers]

    ctr_from_ctr, cvr_from_ctr = grads(0)
    assert all(torch.count_nonzero(g) == 0 for g in cvr_from_ctr)  # no gradient from the CTR loss
    assert all(torch.count_nonzero(g) > 0 for g in ctr_from_ctr)
    _, cvr_from_ctcvr = grads(1)
    assert all(torch.count_nonzero(g) > 0 for g in cvr_from_ctcvr)  # every CVR layer learns from CTCVR


def test_cvr_metrics_score_the_cvr_head_on_clicked_rows_only():
    model = _model("esmm").eval()
    n = 60
    sparse, dense = _inputs(n, seed=3)
    labels = _funnel_labels(n, seed=4)
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[:5, 1] = False  # a few rows without a conversion label
    table = EncodedTable(sparse=sparse, dense=dense, labels=labels.to(torch.uint8), label_mask=mask)
    got = cvr_metrics(model, table, click_task=0, batch_size=7)
    clicked = (labels[:, 0] == 1) & mask[:, 1]
    with torch.no_grad():
        q = model.funnel_probabilities(sparse, dense)[:, 1].double()
    expected = task_metrics("binary", torch.logit(q).numpy(), labels[:, 1].numpy(), clicked.numpy())
    assert got["n"] == int(clicked.sum()) < n and 0 < got["auc"] < 1
    assert got["auc"] == pytest.approx(expected["auc"]) and got["logloss"] == pytest.approx(expected["logloss"])
    # Scoring the CTCVR output instead (the entire-space probability) would give a different log-loss.
    with torch.no_grad():
        ctcvr = model(sparse, dense)[:, 1].numpy()
    assert task_metrics("binary", ctcvr, labels[:, 1].numpy(), clicked.numpy())["logloss"] != pytest.approx(
        got["logloss"]
    )
    with pytest.raises(ValueError, match=r"Expected `click_task` to index a task followed by a conversion task"):
        cvr_metrics(model, table, click_task=1)
    with pytest.raises(TypeError, match=r"Expected a funnel model with per-step conditional logits \(esmm\)"):
        cvr_metrics(_model("ple", expert_dims=[4]), table)


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_funnel_models_refuse_a_single_task(name):
    with pytest.raises(ValueError, match=rf"Expected `{name}` to have at least 2 tasks"):
        build_model(name, SMALL, VOCABS, NUM_DENSE, 1)


def test_funnel_tasks_that_cannot_be_trained_are_refused():
    click = TaskConfig(name="ctr", kind="binary", label="click")
    check_funnel_tasks("esmm", [click, TaskConfig(name="ctcvr", kind="binary", label="purchase")])
    with pytest.raises(ValueError, match=r"`esmm` to have at least 2 \[\[tasks\]\].* but got 1"):
        check_funnel_tasks("esmm", [click])
    with pytest.raises(ValueError, match=r"`aitm` funnel to be binary, but `watch` is 'regression'"):
        check_funnel_tasks("aitm", [click, TaskConfig(name="watch", kind="regression", label="watch")])
    conditioned = TaskConfig(name="cvr", kind="binary", label="purchase", space="click == 1")
    with pytest.raises(ValueError, match=r"`cvr` of the `esmm` funnel to be labelled over the entire space"):
        check_funnel_tasks("esmm", [click, conditioned])


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_an_experiment_with_a_funnel_model_checks_its_tasks(name):
    """The experiment refuses the funnel when it is read (and when `compare` switches to the model), not
    only when the model is built: a task's `space` is invisible to the model."""
    from plerec.config import experiment_from_dict

    raw = {
        "data": {"path": "unused.csv"},
        "features": {"categorical": ["a"]},
        "tasks": [
            {"name": "ctr", "kind": "binary", "label": "click"},
            {"name": "cvr", "kind": "binary", "label": "purchase", "space": "click == 1"},
        ],
    }
    plain = experiment_from_dict(raw)  # any other model takes a task with a space
    with pytest.raises(ValueError, match=rf"`cvr` of the `{name}` funnel to be labelled over the entire space"):
        experiment_from_dict({**raw, "model": {"name": name}})
    with pytest.raises(ValueError, match=rf"`cvr` of the `{name}` funnel"):
        plain.with_model(name)


# ---------------------------------------------------------------------------------------------
# AITM


def test_calibrator_is_zero_for_a_non_increasing_funnel_and_positive_otherwise():
    model = _model("aitm", 3, calibrator_weight=0.25)
    decreasing = torch.tensor([[2.0, 1.0, -3.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -2.5]])
    assert model.auxiliary_loss(decreasing).item() == 0.0
    rising = torch.tensor([[0.0, 1.0, -1.0], [2.0, 1.0, 3.0], [-1.0, -2.0, -2.5]])
    s = torch.sigmoid
    by_hand = 0.25 * ((s(torch.tensor(1.0)) - 0.5) + (s(torch.tensor(3.0)) - s(torch.tensor(1.0))) + 0.0) / 3
    loss = model.auxiliary_loss(rising)
    assert loss.item() > 0
    torch.testing.assert_close(loss, by_hand)
    # It pushes the later step down and the earlier one up, where the later one is more likely.
    logits = rising.clone().requires_grad_(True)
    model.auxiliary_loss(logits).backward()
    assert logits.grad[0, 1] > 0 and logits.grad[0, 0] < 0 and logits.grad[0, 2] == 0
    assert torch.count_nonzero(logits.grad[2]) == 0


def test_calibrator_weight_scales_it_and_other_models_have_none():
    logits = torch.tensor([[0.0, 2.0]])
    one = _model("aitm", calibrator_weight=1.0).auxiliary_loss(logits)
    zero = _model("aitm", calibrator_weight=0.0).auxiliary_loss(logits)
    torch.testing.assert_close(one, torch.sigmoid(torch.tensor(2.0)) - 0.5)
    assert zero.item() == 0.0
    assert _model("aitm").body.calibrator_weight == 0.6  # the default
    for name, params in [("esmm", {}), ("ple", {"expert_dims": [4]}), ("adatt", {"expert_dims": [4]})]:
        assert _model(name, **params).auxiliary_loss(logits) is None


def test_calibrator_added_to_the_task_losses_trains_the_towers():
    """The training step's contract: loss = weighted task losses + model.auxiliary_loss(logits)."""
    model = _model("aitm", 3, calibrator_weight=5.0)
    sparse, dense = _inputs(32)
    with torch.no_grad():  # the last step's output layer made more likely than the others: the calibrator bites
        model.body.outputs.biases[0][2].add_(4.0)
    logits = model(sparse, dense)
    aux = model.auxiliary_loss(logits)
    assert aux is not None and aux.dim() == 0 and aux.item() > 0
    labels, mask = _funnel_labels(32, 3), torch.ones(32, 3, dtype=torch.bool)
    tasks = masked_task_losses(logits, labels, mask, torch.tensor([True, True, True])).sum()
    (tasks + aux).backward()
    with_aux = model.body.outputs.biases[0].grad.clone()
    model.zero_grad()
    masked_task_losses(model(sparse, dense), labels, mask, torch.tensor([True, True, True])).sum().backward()
    assert with_aux[2] > model.body.outputs.biases[0].grad[2]  # pushed further down by the calibrator


def test_ait_attention_weights_sum_to_one_and_mix_as_the_equation_says():
    model = _model("aitm", 3)
    sparse, dense = _inputs(16)
    gates = model.gate_weights(sparse, dense)
    assert set(gates) == {"task1.ait", "task2.ait"} == set(model.gate_experts())
    assert model.gate_experts()["task2.ait"] == ["task1.transfer", "task2.tower"]
    for w in gates.values():
        assert w.shape == (16, 2) and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(16))
        assert not torch.allclose(w[:, 0], w[0, 0])  # weights depend on the row
    # The equations, written out: z_1 = q_1; p = relu(h(z_{t-1})); w_u = softmax(<Q u, K u> / sqrt(k)); z_t = Σ w_u V u.
    body = model.body
    with torch.no_grad():
        x = model.input(sparse, dense)
        q = body.towers(x)
        k = q.shape[-1]
        z = q[0]
        for t in (1, 2):
            p = torch.relu(z @ body.transfers.weights[0][t - 1] + body.transfers.biases[0][t - 1])
            v_map, q_map, k_map = body.projections.weights[0][3 * (t - 1) : 3 * t]
            scores = torch.stack([(u @ q_map * (u @ k_map)).sum(-1) for u in (p, q[t])], dim=-1) / math.sqrt(k)
            w = torch.softmax(scores, dim=-1)
            torch.testing.assert_close(w, gates[f"task{t}.ait"])
            z = w[:, :1] * (p @ v_map) + w[:, 1:] * (q[t] @ v_map)
        expected = z @ body.outputs.weights[0][2] + body.outputs.biases[0][2]
        torch.testing.assert_close(model(sparse, dense)[:, 2:], expected)


def test_aitm_config_errors():
    with pytest.raises(ValueError, match=r"`calibrator_weight` to be a finite number >= 0, but got -0.5"):
        build_model("aitm", {"calibrator_weight": -0.5}, VOCABS, NUM_DENSE, 2)
    with pytest.raises(ValueError, match=r"Expected `tower_dims` to list at least one width, but got \[\]"):
        build_model("aitm", {"tower_dims": []}, VOCABS, NUM_DENSE, 2)


# ---------------------------------------------------------------------------------------------
# End to end through plerec's own fit


@pytest.fixture(scope="module")
def funnel_csv(tmp_path_factory):
    """Impressions with a click and a purchase that happens only after a click (entire-space labels)."""
    rng = np.random.default_rng(0)
    rows = 400
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    frame = pd.DataFrame({"a": a, "b": b, "cat": rng.choice(["x", "y", "z"], rows)})
    frame["click"] = (a + 0.5 * rng.normal(size=rows) > 0).astype(int)
    frame["purchase"] = ((frame["click"] == 1) & (b + 0.5 * rng.normal(size=rows) > 0)).astype(int)
    path = tmp_path_factory.mktemp("funnel") / "funnel.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "model",
    [
        {"name": "esmm", "tower_dims": [8, 4]},
        {"name": "aitm", "tower_dims": [8, 4]},
        {"name": "adatt", "expert_dims": [6], "tower_dims": [4], "num_task_experts": 2, "num_shared_experts": 1},
    ],
)
def test_funnel_models_train_end_to_end(funnel_csv, model):
    exp = experiment_from_dict(
        {
            "seed": 0,
            "data": {"path": str(funnel_csv), "split": [0.6, 0.2, 0.2]},
            "features": {"numeric": ["a", "b"], "categorical": ["cat"]},
            "tasks": [
                {"name": "ctr", "kind": "binary", "label": "click"},
                {"name": "ctcvr", "kind": "binary", "label": "purchase"},
            ],
            "model": {"embedding_dim": 2, **model},
            "train": {"epochs": 3, "batch_size": 32, "lr": 0.02, "progress": False},
        }
    )
    result = fit(exp)
    for split in ("valid", "test"):
        for task in ("ctr", "ctcvr"):
            metrics = result.metrics[split][task]
            assert all(math.isfinite(v) for v in metrics.values()), (split, task, metrics)
            assert metrics["auc"] > 0.6, (model["name"], split, task, metrics)  # it learnt the signal
    if model["name"] == "esmm":  # the CVR head, on the clicked rows of the test split
        test = prepare_data(exp, encoder=result.encoder).splits["test"]
        cvr = cvr_metrics(result.model, test, click_task=0)
        assert 0 < cvr["n"] < len(test) and math.isfinite(cvr["logloss"]) and cvr["auc"] > 0.6
        # fit reports them as the conversion step's cvr_* metrics, every split
        assert {k: result.metrics["test"]["ctcvr"][f"cvr_{k}"] for k in cvr} == pytest.approx(cvr)
        assert "cvr_auc" in result.history[-1]["valid"]["ctcvr"]
    else:
        assert not any(k.startswith("cvr_") for k in result.metrics["test"]["ctcvr"])


ROOT = Path(__file__).resolve().parents[1]


def test_the_ali_ccp_funnel_example_is_an_entire_space_funnel():
    exp = load_experiment(ROOT / "examples" / "ali_ccp_funnel.toml", ["train.progress=false"])
    assert exp.model_name == "esmm" and [t.label for t in exp.tasks] == ["click", "purchase"]
    check_funnel_tasks(exp.model_name, exp.tasks)  # binary, no `space`
    paths = [Path(p) for p in (exp.data.train, exp.data.valid, exp.data.test)]
    if not all(p.exists() for p in paths):
        pytest.skip("needs the tiny Ali-CCP sample in ../shared/data")
    for path in paths:  # purchase is 1 only where click is: the label is already click AND purchase
        frame = pd.read_csv(path, usecols=["click", "purchase"])
        assert frame["purchase"].sum() > 0 and not ((frame["purchase"] == 1) & (frame["click"] == 0)).any()
    result = fit(exp)
    assert result.metrics["test"]["ctcvr"]["n"] == 50  # every impression, not the 2 clicked rows
    assert math.isfinite(result.metrics["test"]["ctcvr"]["logloss"])
