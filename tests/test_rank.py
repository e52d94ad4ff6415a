"""Eq. 1 against a direct computation of the product, ranking within users (ties, several users, top-k),
`plerec rank` end to end, and the [rank] / rank_weight keys of the experiment file."""

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_ship import EXPERIMENT, candidates, train_tiny

from plerec.cli import main
from plerec.config import RankConfig, TaskConfig, experiment_from_dict, load_experiment, write_experiment
from plerec.rank import Scorer, fused_log_score, rank_within_groups, task_outputs
from plerec.train import predict

TASKS = (
    TaskConfig(name="vtr", kind="binary", label="v", rank_weight=2.0),
    TaskConfig(name="vcr", kind="regression", label="c", rank_weight=0.5),
    TaskConfig(name="shr", kind="binary", label="s", rank_weight=1.5),
    TaskConfig(name="skip", kind="binary", label="k", rank_weight=-0.7),
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def direct_score(logits: list[float], length: float | None, transform: str, center=0.0, scale=1.0) -> float:
    """Eq. 1 as written: the product of each task's prediction to its exponent, times f(length)."""
    score = 1.0
    for task, logit in zip(TASKS, logits, strict=True):
        p = sigmoid(logit) if task.kind == "binary" else logit
        score *= p**task.rank_weight
    if length is not None:
        score *= {"none": length, "log": math.log(1 + length), "sigmoid": sigmoid((length - center) / scale)}[transform]
    return score


@pytest.mark.parametrize(
    ("transform", "center", "scale"),
    [("none", 0.0, 1.0), ("log", 0.0, 1.0), ("sigmoid", 0.0, 1.0), ("sigmoid", 30.0, 10.0), (None, 0.0, 1.0)],
)
def test_fused_score_equals_the_product_of_eq_1(transform, center, scale):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(50, 4))
    logits[:, 1] = rng.uniform(0.05, 3, size=50)  # the regression task: a positive value
    length = rng.uniform(0.2, 90, size=50)
    if transform is None:
        config, length = RankConfig(), None
    else:
        config = RankConfig(length="len", length_transform=transform, length_center=center, length_scale=scale)
    got = fused_log_score(torch.from_numpy(logits).float(), TASKS, config, length)
    assert got.dtype == np.float64 and got.shape == (50,)
    logits32 = torch.from_numpy(logits).float().double().numpy()  # the model's logits are float32
    for i in range(50):
        expected = direct_score(list(logits32[i]), None if length is None else length[i], transform, center, scale)
        assert got[i] == pytest.approx(math.log(expected), rel=1e-12, abs=1e-12)
        assert math.exp(got[i]) == pytest.approx(expected, rel=1e-12)


def test_task_outputs_are_probabilities_and_values():
    logits = torch.tensor([[0.0, -1.5, 3.0, 0.25]])
    np.testing.assert_allclose(task_outputs(logits, TASKS), [[0.5, -1.5, sigmoid(3.0), sigmoid(0.25)]], rtol=1e-12)


def test_log_space_stays_finite_where_the_product_underflows():
    logits = torch.tensor([[-800.0, 1.0, -800.0, 0.0]])  # p_vtr ≈ e^-800: 0 in float64
    got = fused_log_score(logits, TASKS, RankConfig())
    assert got[0] == pytest.approx(2.0 * -800 + 0.5 * 0.0 + 1.5 * -800 - 0.7 * math.log(0.5), rel=1e-12)


def test_zero_weight_task_is_left_out_whatever_it_predicts():
    tasks = (TASKS[0], replace(TASKS[1], rank_weight=0.0))
    logits = torch.tensor([[1.0, -4.0], [1.0, 0.0]])  # non-positive regression values, weight 0
    got = fused_log_score(logits, tasks, RankConfig())
    np.testing.assert_allclose(got, [2 * math.log(sigmoid(1.0))] * 2, rtol=1e-12)


def test_non_positive_regression_value_with_a_weight_is_an_error_naming_task_and_row():
    logits = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, -0.25, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"Task `vcr` \(regression\) predicts -0.25 for row r2: .*rank_weight = 0"):
        fused_log_score(logits, TASKS, RankConfig(), rows=["r1", "r2"])


@pytest.mark.parametrize(
    ("transform", "length", "message"),
    [
        ("log", 0.0, r"row 1: expected a positive number \(length_transform = 'log'"),
        ("none", -3.0, r"row 1: expected a positive number \(length_transform = 'none'"),
        ("sigmoid", math.nan, "row 1: expected a finite number, but got nan"),
        ("sigmoid", math.inf, "row 1: expected a finite number, but got inf"),
    ],
)
def test_bad_length_is_an_error_naming_the_row(transform, length, message):
    config = RankConfig(length="duration", length_transform=transform)
    logits = torch.zeros(2, 4)
    logits[:, 1] = 1.0
    with pytest.raises(ValueError, match=r"Length column `duration`, " + message):
        fused_log_score(logits, TASKS, config, np.array([5.0, length]))


def test_sigmoid_takes_any_finite_length():
    config = RankConfig(length="len", length_transform="sigmoid")
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2)
    got = fused_log_score(logits, TASKS, config, np.array([-40.0, 40.0]))
    assert got[0] == pytest.approx(fused_log_score(logits[:1], TASKS, RankConfig())[0] + math.log(sigmoid(-40.0)))
    assert got[1] > got[0]


def test_ranking_within_users_on_a_hand_made_table_with_ties():
    groups = ["b", "a", "b", "a", "c", "b", "a"]
    log_score = np.array([0.5, 1.0, 0.5, 1.0, -3.0, 0.9, 2.0])
    order, ranks = rank_within_groups(groups, log_score)
    # users in order of first appearance (b, a, c); best first; equal scores keep input order (0 before 2, 1 before 3)
    assert order.tolist() == [5, 0, 2, 6, 1, 3, 4]
    assert ranks.tolist() == [1, 2, 3, 1, 2, 3, 1]


def test_ranking_with_numeric_user_ids_and_a_single_user():
    order, ranks = rank_within_groups(np.array([7, 7, 7]), np.array([-1.0, 3.0, 3.0]))
    assert order.tolist() == [1, 2, 0] and ranks.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="row 1 has none"):
        rank_within_groups(pd.Series(["a", None]), np.zeros(2))


# --- with a trained model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    checkpoint, experiment = train_tiny(root)
    return root, checkpoint, experiment


def test_scorer_fuses_the_models_predictions_with_the_length(trained):
    _, checkpoint, experiment = trained
    scorer = Scorer.from_checkpoint(checkpoint, load_experiment(experiment))
    rows = candidates(30, seed=4)
    scored = scorer.score(rows)
    logits = predict(scorer.model, scorer.encoder.transform(rows, labels=False)).double()
    # click has rank_weight 2, watch 0; f = ln(1 + duration)
    expected = 2 * torch.nn.functional.logsigmoid(logits[:, 0]).numpy() + np.log(np.log1p(rows["duration"].to_numpy()))
    np.testing.assert_allclose(scored["log_score"].to_numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(scored["score"].to_numpy(), np.exp(expected), rtol=1e-12)
    np.testing.assert_allclose(scored["click"].to_numpy(), torch.sigmoid(logits[:, 0]).numpy(), rtol=1e-12)
    np.testing.assert_allclose(scored["watch"].to_numpy(), logits[:, 1].numpy(), rtol=1e-12)


def test_rank_table_with_ties_several_users_and_top_k(trained):
    _, checkpoint, experiment = trained
    scorer = Scorer.from_checkpoint(checkpoint, load_experiment(experiment))
    base = candidates(3, seed=6).reset_index(drop=True)
    # u2's items 10 and 11 are identical rows (a tie), items of u1 interleave with u2's
    rows = pd.concat(
        [base.iloc[[0]], base.iloc[[1]], base.iloc[[0]], base.iloc[[2]], base.iloc[[0]]], ignore_index=True
    )
    rows["user"] = ["u2", "u1", "u2", "u1", "u1"]
    rows["item"] = [10, 20, 11, 21, 22]
    scores = scorer.score(rows)["log_score"].to_numpy()
    ranked = scorer.rank_table(rows)
    assert list(ranked.columns) == ["user", "item", "click", "watch", "score", "log_score", "rank"]
    assert ranked["user"].tolist() == ["u2", "u2", "u1", "u1", "u1"]
    assert ranked["item"].tolist()[:2] == [10, 11]  # the tie keeps input order
    assert ranked["rank"].tolist() == [1, 2, 1, 2, 3]
    u1 = ranked[ranked["user"] == "u1"]
    order_u1 = sorted([(-scores[i], i) for i in (1, 3, 4)])
    assert u1["item"].tolist() == [rows["item"][i] for _, i in order_u1]
    top1 = scorer.rank_table(rows, top_k=1)
    assert top1["item"].tolist() == [10, rows["item"][order_u1[0][1]]] and top1["rank"].tolist() == [1, 1]


def test_rank_table_errors_name_the_column_and_row(trained):
    _, checkpoint, experiment = trained
    exp = load_experiment(experiment)
    scorer = Scorer.from_checkpoint(checkpoint, exp)
    rows = candidates(4, seed=2)
    with pytest.raises(ValueError, match="Column `user` named in \\[rank\\] is not in the data"):
        scorer.rank_table(rows.drop(columns=["user"]))
    broken = rows.copy()
    broken.loc[2, "item"] = None
    with pytest.raises(ValueError, match="Column `item` of the data, row 2: expected a item id, but got a missing"):
        scorer.rank_table(broken)
    broken = rows.copy()
    broken.loc[3, "duration"] = -1.0
    with pytest.raises(ValueError, match="Length column `duration`, row 3: expected a positive number"):
        scorer.rank_table(broken)
    with pytest.raises(ValueError, match="Length column `duration` named in \\[rank\\] is not in"):
        scorer.score(rows.drop(columns=["duration"]))
    unset = Scorer.from_checkpoint(checkpoint, replace(exp, rank=RankConfig()))
    with pytest.raises(ValueError, match="Expected \\[rank\\] `group` to name a column, but it is not set"):
        unset.rank_table(rows)


def test_scorer_refuses_an_experiment_with_other_tasks(trained):
    _, checkpoint, experiment = trained
    exp = load_experiment(experiment)
    other = replace(exp, tasks=(exp.tasks[0],))
    with pytest.raises(ValueError, match="was trained on tasks .*click.*watch.* but .* defines"):
        Scorer.from_checkpoint(checkpoint, other)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_cli_rank_writes_ranked_candidates(trained, tmp_path, capsys, suffix):
    _, checkpoint, experiment = trained
    rows = candidates(24, seed=9)
    rows["item"] = np.arange(len(rows))  # unique items, to match rows back
    rows.to_csv(tmp_path / "candidates.csv", index=False)
    out = tmp_path / f"ranked{suffix}"
    argv = ["rank", str(experiment), "--checkpoint", str(checkpoint), "--input", str(tmp_path / "candidates.csv")]
    assert main([*argv, "--out", str(out), "--top-k", "3"]) == 0
    assert "ranked 24 candidates of 3 user values" in capsys.readouterr().out
    ranked = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(ranked.columns) == ["user", "item", "click", "watch", "score", "log_score", "rank"]
    expected = Scorer.from_checkpoint(checkpoint, load_experiment(experiment)).score(rows)
    for user, group in ranked.groupby("user", sort=False):
        assert group["rank"].tolist() == list(range(1, min(3, (rows["user"] == user).sum()) + 1))
        best = expected[rows["user"] == user].sort_values("log_score", ascending=False, kind="stable")
        assert group["item"].tolist() == rows.loc[best.index[:3], "item"].tolist()
    np.testing.assert_allclose(ranked["log_score"].to_numpy(), expected.loc[ranked["item"], "log_score"].to_numpy())


def test_cli_rank_errors(trained, tmp_path, capsys):
    _, checkpoint, experiment = trained
    candidates(5, seed=1).to_csv(tmp_path / "c.csv", index=False)
    argv = ["rank", str(experiment), "--checkpoint", str(checkpoint), "--input", str(tmp_path / "c.csv")]
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    assert "r.json to end in .csv, .csv.gz or .parquet, but got 'r.json'" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "r.csv"), "--set", "rank.group=account"]) == 2
    assert "plerec: error: Column `account` named in [rank] is not in" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "r.csv"), "--top-k", "-1"]) == 2
    assert "Expected --top-k >= 0" in capsys.readouterr().err


# --- the experiment file ---------------------------------------------------------------------


def test_rank_keys_are_read_and_round_trip(tmp_path):
    (tmp_path / "exp.toml").write_text(
        EXPERIMENT.replace('length_transform = "log"', 'length_transform = "sigmoid"\nlength_center = 30\ntop_k = 5')
    )
    exp = load_experiment(tmp_path / "exp.toml")
    assert exp.rank == RankConfig(
        group="user", item="item", length="duration", length_transform="sigmoid", length_center=30.0, top_k=5
    )
    assert [t.rank_weight for t in exp.tasks] == [2.0, 0.0]
    write_experiment(exp, tmp_path / "copy.toml")
    assert load_experiment(tmp_path / "copy.toml").rank == exp.rank


def base() -> dict:
    return {
        "data": {"path": "/tmp/rows.csv"},
        "features": {"numeric": ["x"]},
        "tasks": [{"name": "ctr", "kind": "binary", "label": "click"}],
    }


@pytest.mark.parametrize(
    ("rank", "message"),
    [
        ({"grup": "user"}, "Unknown key `grup` in \\[rank\\]. Did you mean `group`?"),
        ({"length": "len", "length_transform": "exp"}, "`length_transform` to be one of .* but got 'exp'"),
        ({"length_transform": "log"}, "Expected \\[rank\\] `length` \\(a column\\) with length_transform = 'log'"),
        ({"length": "len", "length_scale": 2.0}, "`length_center` and `length_scale` only with length_transform"),
        ({"length": "len", "length_transform": "sigmoid", "length_scale": 0.0}, "`length_scale` > 0"),
        ({"top_k": -1}, "`top_k` >= 0"),
        ({"top_k": 2.5}, "Expected \\[rank\\] `top_k` to be an integer, but got 2.5"),
    ],
)
def test_bad_rank_section_is_rejected(rank, message):
    with pytest.raises(ValueError, match=message):
        experiment_from_dict({**base(), "rank": rank})


def test_bad_rank_weight_is_rejected():
    raw = base()
    raw["tasks"][0]["rank_weight"] = float("nan")
    with pytest.raises(ValueError, match="Expected `rank_weight` of \\[\\[tasks\\]\\] `ctr` to be a finite number"):
        experiment_from_dict(raw)
    raw["tasks"][0]["rank_weight"] = "high"
    with pytest.raises(ValueError, match="`rank_weight` to be a number, but got 'high'"):
        experiment_from_dict(raw)


def test_task_named_like_an_output_column_is_refused(trained):
    _, checkpoint, experiment = trained
    exp = load_experiment(experiment)
    scorer = Scorer.from_checkpoint(checkpoint, exp)
    with pytest.raises(ValueError, match=r"Task names \['score'\] clash with the ranking's output columns"):
        Scorer(scorer.model, scorer.encoder, (replace(exp.tasks[0], name="score"), exp.tasks[1]), exp.rank)
    with pytest.raises(ValueError, match="`group` and `item` to be different columns, but both are 'user'"):
        Scorer(scorer.model, scorer.encoder, exp.tasks, replace(exp.rank, item="user"))
