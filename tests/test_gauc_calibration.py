"""GAUC over a named group column and the calibration of binary tasks: the metrics against direct
computations written out here, the group codes read from the raw values, and what a fit writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from parquet_splits import write_splits
from sklearn.metrics import roc_auc_score

from plerec.compare import compare
from plerec.config import load_experiment
from plerec.data.groups import group_codes
from plerec.metrics import MISSING_GROUP, TaskMetricAccumulator, calibration, evaluate_tasks, gauc, task_metrics
from plerec.report.plots import pooled_reliability, reliability_plot, reliability_records
from plerec.train import evaluate, evaluate_split, fit, load_checkpoint, predict, prepare_data


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def gauc_by_loop(labels, scores, groups) -> tuple[float, int, int, float]:
    """The definition, one group at a time: Σ n_g·AUC_g / Σ n_g over the groups holding both classes."""
    weighted = rows_used = used = skipped = 0
    for g in np.unique(groups):
        if g == MISSING_GROUP:
            continue
        mine = groups == g
        if len(np.unique(labels[mine])) < 2:
            skipped += 1
            continue
        weighted += mine.sum() * roc_auc_score(labels[mine], scores[mine])
        rows_used += mine.sum()
        used += 1
    return weighted / rows_used, used, skipped, 1 - rows_used / len(labels)


def uneven_groups(seed: int, n: int = 1500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups of very different sizes (a few large, many of 1-3 rows: those often hold one class), rare
    positives, and scores with only 9 distinct values: ties inside and across groups."""
    rng = np.random.default_rng(seed)
    sizes = np.r_[rng.integers(100, 300, 4), rng.integers(1, 4, 200)]
    codes = rng.choice(10**12, size=len(sizes), replace=False) - 5 * 10**11  # far from 0 .. G-1, some negative
    groups = np.repeat(codes, sizes)[:n]
    groups = rng.permutation(groups)  # rows of a group are not adjacent
    labels = (rng.random(len(groups)) < 0.2).astype(float)
    scores = np.round(rng.normal(size=len(groups)) + labels, 0) / 2
    return labels, scores, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_equals_a_per_group_loop_of_sklearn_auc(seed):
    labels, scores, groups = uneven_groups(seed)
    expected, used, skipped, share = gauc_by_loop(labels, scores, groups)
    assert skipped > 10 and used >= 4  # the single-class groups were exercised
    result = gauc(labels, scores, groups)
    assert result["gauc"] == pytest.approx(expected, abs=1e-12)
    assert (result["gauc_groups"], result["gauc_skipped_groups"]) == (used, skipped)
    assert result["gauc_skipped_share"] == pytest.approx(share, abs=1e-12)


def test_gauc_weights_groups_by_rows_and_leaves_out_missing_groups():
    # group 1: 4 rows, AUC 1; group 2: 2 rows, AUC 0; group 3: one class (skipped); one row of no group.
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 1, 0], dtype=float)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.1, 0.9, 0.5, 0.6, 0.7])
    groups = np.array([1, 1, 1, 1, 2, 2, 3, 3, MISSING_GROUP])
    result = gauc(labels, scores, groups)
    assert result == {
        "gauc": pytest.approx((4 * 1.0 + 2 * 0.0) / 6),
        "gauc_groups": 2,
        "gauc_skipped_groups": 1,
        "gauc_skipped_share": pytest.approx(3 / 9),
    }
    assert "gauc" not in gauc(labels[6:8], scores[6:8], groups[6:8])  # no group with both classes


def test_gauc_honours_each_task_sample_space():
    labels, scores, groups = uneven_groups(3)
    logits = np.stack([scores, -scores], axis=1)
    y = np.stack([labels, 1 - labels], axis=1)
    mask = np.stack([np.ones(len(labels), bool), np.random.default_rng(0).random(len(labels)) < 0.5], axis=1)
    y[~mask] = np.nan  # never read
    result = evaluate_tasks({"a": "binary", "b": "binary"}, logits, y, mask, groups=groups)
    for t, name in enumerate(("a", "b")):
        keep = mask[:, t]
        expected, used, skipped, share = gauc_by_loop(y[keep, t], logits[keep, t], groups[keep])
        assert result[name]["gauc"] == pytest.approx(expected, abs=1e-12)
        assert (result[name]["gauc_groups"], result[name]["gauc_skipped_groups"]) == (used, skipped)
        assert result[name]["gauc_skipped_share"] == pytest.approx(share, abs=1e-12)
    assert result["a"]["gauc"] != pytest.approx(result["b"]["gauc"])  # the spaces differ, and so do the values


def test_calibration_ratio_ece_and_bins_against_direct_computation():
    rng = np.random.default_rng(5)
    logits = rng.normal(-1.5, 0.8, 800)  # probabilities up to about 0.7: the top bins stay empty
    labels = (rng.random(800) < sigmoid(logits + 0.4)).astype(float)  # under-predicted on purpose
    probs = sigmoid(logits)
    scalars, bins = calibration(labels, logits, bins=10)
    assert scalars["pcoc"] == pytest.approx(probs.mean() / labels.mean(), rel=1e-12)
    assert scalars["pcoc"] < 0.95
    ece, filled = 0.0, 0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = (probs >= lo) & ((probs < hi) if b < 9 else (probs <= hi))
        assert bins["count"][b] == inside.sum()
        if inside.any():
            filled += 1
            assert bins["mean_predicted"][b] == pytest.approx(probs[inside].mean(), rel=1e-12)
            assert bins["observed_rate"][b] == pytest.approx(labels[inside].mean(), rel=1e-12)
            ece += inside.mean() * abs(probs[inside].mean() - labels[inside].mean())
        else:
            assert bins["mean_predicted"][b] is None and bins["observed_rate"][b] is None
    assert 3 <= filled < 10  # some bins empty, several filled
    assert scalars["ece"] == pytest.approx(ece, rel=1e-12) and scalars["ece"] > 0.02
    assert bins["edges"] == pytest.approx(np.linspace(0, 1, 11).tolist())


def test_calibration_edge_cases():
    # a probability of exactly 1 goes in the last bin; no positive row: no ratio, but an ECE
    scalars, bins = calibration(np.array([0.0, 0.0]), np.array([800.0, -800.0]), bins=4)
    assert "pcoc" not in scalars and scalars["ece"] == pytest.approx(0.5)
    assert bins["count"] == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="Expected `bins` >= 1, but got 0"):
        calibration(np.array([1.0]), np.array([0.0]), bins=0)


def test_regression_tasks_get_no_gauc_or_calibration():
    result = task_metrics(
        "regression", np.array([0.5, 1.0]), np.array([1.0, 0.0]), np.ones(2, bool), groups=np.array([1, 1]), bins=10
    )
    assert set(result) == {"mse", "n"}


def test_accumulator_equals_one_shot_and_needs_groups_on_every_batch():
    labels, scores, groups = uneven_groups(4, n=600)
    logits, y, mask = torch.tensor(scores)[:, None], torch.tensor(labels)[:, None], torch.ones(len(labels), 1).bool()
    acc = TaskMetricAccumulator({"ctr": "binary"}, bins=5)
    for part in torch.arange(len(labels)).tensor_split(4):
        acc.update(logits[part], y[part], mask[part], torch.from_numpy(groups)[part])
    whole = evaluate_tasks({"ctr": "binary"}, scores[:, None], labels[:, None], mask.numpy(), groups, bins=5)
    computed = acc.compute()
    assert computed == whole
    assert {"gauc", "pcoc", "ece"} <= set(computed["ctr"])
    acc.reset()
    acc.update(logits[:3], y[:3], mask[:3], torch.from_numpy(groups[:3]))
    with pytest.raises(ValueError, match="`groups` with every batch or with none"):
        acc.update(logits[3:6], y[3:6], mask[3:6])
    with pytest.raises(ValueError, match="Expected `groups` to be an int64 tensor of shape"):
        acc.update(logits[3:6], y[3:6], mask[3:6], torch.zeros(3, dtype=torch.int32))


def test_group_codes_follow_the_raw_values_not_the_vocabulary():
    # 7, 7.0, " 7" and "7" are one group, as they are one category; "u1" is not "u2"; blank is no group.
    frame = pd.DataFrame({"user": [" 7", 7.0, "u1", "u1", "", None, "u2", 7]}, dtype=object)
    codes = group_codes(frame, "user", "f.csv")
    assert codes.dtype == np.int64
    assert codes[0] == codes[1] == codes[7] == 7 and codes[2] == codes[3] != codes[6]
    assert codes[4] == codes[5] == MISSING_GROUP
    assert group_codes(pd.DataFrame({"user": [5, 9, 5]}), "user", "f.csv").tolist() == [5, 9, 5]


EXPERIMENT = """\
seed = 3

[data]
train = "train.csv"
valid = "valid.csv"
test = "test.csv"

[features]
numeric = ["a"]
categorical = ["cat"]

[[tasks]]
name = "click"
kind = "binary"
label = "click"

[[tasks]]
name = "buy"
kind = "binary"
label = "buy"
space = "click == 1"

[[tasks]]
name = "watch"
kind = "regression"
label = "watch"

[model]
name = "mmoe"
embedding_dim = 2
num_experts = 2
expert_dims = [4]
tower_dims = [3]

[train]
epochs = 1
batch_size = 64
progress = false

[evaluate]
group = "user"
calibration_bins = 5
"""


def _frame(rows: int, seed: int, users: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=rows)
    frame = pd.DataFrame({"a": a, "cat": rng.choice(["x", "y"], rows), "user": rng.choice(users, rows)})
    frame["click"] = (a + rng.normal(size=rows) > 0).astype(int)
    frame["buy"] = (rng.random(rows) < 0.4).astype(int)
    frame["watch"] = 2 * a + rng.normal(size=rows)
    return frame


@pytest.fixture
def project(tmp_path) -> Path:
    # The test users are not the training users: encoded ids would put them all in one group (id 0).
    users = {
        "train": [f"u{i}" for i in range(20)],
        "valid": [f"v{i}" for i in range(8)],
        "test": [f"t{i}" for i in range(12)],
    }
    for i, (name, rows) in enumerate((("train", 240), ("valid", 90), ("test", 150))):
        _frame(rows, i, users[name]).to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    return tmp_path


def test_fit_writes_gauc_and_calibration_into_metrics_json(project):
    exp = load_experiment(project / "exp.toml")
    data = prepare_data(exp)
    result = fit(exp, data, out_dir=project / "run")
    record = json.loads((project / "run" / "metrics.json").read_text())
    assert {"model", "seed", "split", "tasks", "splits", "train_seconds"} <= set(record)  # the shape stays
    assert record["gauc_group"] == "user"
    logits = predict(result.model, data.splits["test"]).double().numpy()
    labels = data.splits["test"].labels.double().numpy()
    mask = data.splits["test"].label_mask.numpy()
    users = pd.read_csv(project / "test.csv")["user"].to_numpy()
    for t, name in enumerate(("click", "buy")):
        keep = mask[:, t]
        got = record["tasks"][name]
        expected, used, skipped, share = gauc_by_loop(labels[keep, t], logits[keep, t], users[keep])
        assert got["gauc"] == pytest.approx(expected, abs=1e-9)
        assert (got["gauc_groups"], got["gauc_skipped_groups"]) == (used, skipped) and used > 5
        assert got["gauc_skipped_share"] == pytest.approx(share, abs=1e-12)
        probs, y = sigmoid(logits[keep, t]), labels[keep, t]
        assert got["pcoc"] == pytest.approx(probs.mean() / y.mean(), rel=1e-9)
        which = np.minimum((probs * 5).astype(int), 4)  # calibration_bins = 5
        ece = sum((which == b).mean() * abs(probs[which == b].mean() - y[which == b].mean()) for b in set(which))
        assert got["ece"] == pytest.approx(ece, rel=1e-9)
    assert mask[:, 1].sum() < mask[:, 0].sum()  # `buy` was scored over its own space only
    assert set(record["tasks"]["watch"]) == {"mse", "n"}  # regression: neither GAUC nor calibration
    assert {"gauc", "pcoc", "ece"} <= set(record["splits"]["valid"]["click"])
    history = json.loads((project / "run" / "history.json").read_text())
    assert "gauc" in history["epochs"][0]["valid"]["click"]  # every epoch's validation has it too


def test_fit_without_group_has_calibration_but_no_gauc_and_bins_0_has_neither(project):
    text = (project / "exp.toml").read_text().replace('group = "user"\n', "")
    (project / "exp.toml").write_text(text)
    fit(load_experiment(project / "exp.toml"), out_dir=project / "run")
    record = json.loads((project / "run" / "metrics.json").read_text())
    assert "gauc_group" not in record and not any(k.startswith("gauc") for k in record["tasks"]["click"])
    assert {"pcoc", "ece"} <= set(record["tasks"]["click"])
    (project / "exp.toml").write_text(text.replace("calibration_bins = 5", "calibration_bins = 0"))
    fit(load_experiment(project / "exp.toml"), out_dir=project / "off")
    record = json.loads((project / "off" / "metrics.json").read_text())
    assert set(record) == {"model", "seed", "split", "tasks", "splits", "train_seconds"}  # as before the keys
    assert set(record["tasks"]["click"]) == {"auc", "logloss", "n"}


def test_a_bad_group_column_is_an_error_naming_the_key_and_the_file(project):
    (project / "exp.toml").write_text(EXPERIMENT.replace('group = "user"', 'group = "usr"'))
    with pytest.raises(ValueError, match=r"\[evaluate\] `group` of .*exp\.toml.*train\.csv.*'usr'.*Did you mean"):
        prepare_data(load_experiment(project / "exp.toml"))
    pd.read_csv(project / "test.csv").drop(columns="user").to_csv(project / "test.csv", index=False)
    (project / "exp.toml").write_text(EXPERIMENT)
    with pytest.raises(ValueError, match=r"Column `user` used by \[evaluate\] `group`.*test\.csv"):
        prepare_data(load_experiment(project / "exp.toml"))


def test_group_config_is_checked(project):
    (project / "exp.toml").write_text(EXPERIMENT.replace('group = "user"', 'group = "click"'))
    with pytest.raises(ValueError, match=r"\[evaluate\] `group` to name a column other than the label.*`click`"):
        load_experiment(project / "exp.toml")
    (project / "exp.toml").write_text(EXPERIMENT.replace("calibration_bins = 5", "calibration_bins = -1"))
    with pytest.raises(ValueError, match=r"\[evaluate\] `calibration_bins` in \[0, 1000\].*got -1"):
        load_experiment(project / "exp.toml")
    (project / "exp.toml").write_text(EXPERIMENT.replace("calibration_bins = 5", "bins = 5"))
    with pytest.raises(ValueError, match="calibration_bins"):  # the unknown key gets a hint
        load_experiment(project / "exp.toml")


def _record(model: str, count: list[int], predicted: list, observed: list) -> dict:
    bins = {"edges": [0, 0.5, 1], "count": count, "mean_predicted": predicted, "observed_rate": observed}
    return {"model": model, "seed": 0, "reliability": {"test": {"click": bins}}}


def test_reliability_pools_seeds_by_rows_and_plots_one_line_per_model(tmp_path):
    records = [
        _record("ple", [2, 0, 1], [0.1, None, 0.9], [0.0, None, 1.0]),
        _record("ple", [1, 0, 3], [0.4, None, 0.7], [1.0, None, 0.5]),
        _record("mmoe", [0, 1, 0], [None, 0.5, None], [None, 0.0, None]),
    ]
    pooled = pooled_reliability(records)
    predicted, observed, rows = pooled["click"]["ple"]
    assert predicted == pytest.approx([(2 * 0.1 + 0.4) / 3, (0.9 + 3 * 0.7) / 4])
    assert observed == pytest.approx([1 / 3, (1.0 + 3 * 0.5) / 4]) and rows.tolist() == [3, 4]
    assert [a.tolist() for a in pooled["click"]["mmoe"]] == [[0.5], [0.0], [1]]
    assert reliability_plot(records, tmp_path / "r.png") and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert not reliability_plot(records, tmp_path / "none.png", split="valid") and not (tmp_path / "none.png").exists()


def test_compare_reliability_comes_from_the_runs_saved_test_predictions(project):
    exp = load_experiment(project / "exp.toml")
    runs = compare(exp, ["mmoe", "single"], 1, project / "cmp")
    records = reliability_records(project / "cmp", runs, exp.task_kinds, exp.evaluate.calibration_bins)
    assert sorted(r["model"] for r in records) == ["mmoe", "single"]
    for record in records:
        saved = json.loads((project / "cmp" / "runs" / record["model"] / "seed3" / "metrics.json").read_text())
        bins = record["reliability"]["test"]
        assert set(bins) == {"click", "buy"}  # the binary tasks
        for task, values in bins.items():
            assert len(values["count"]) == 5 and sum(values["count"]) == saved["tasks"][task]["n"]
            probs = np.array([p for p in values["mean_predicted"] if p is not None])
            rates = np.array([r for r in values["observed_rate"] if r is not None])
            filled = np.array([c for c in values["count"] if c]) / saved["tasks"][task]["n"]
            assert saved["tasks"][task]["ece"] == pytest.approx(np.sum(filled * np.abs(probs - rates)), rel=1e-6)
    assert reliability_plot(records, project / "cmp" / "reliability.png")


EVAL_SCRIPT = """
import json, sys
from plerec.config import load_experiment
from plerec.distributed import init_distributed, shutdown
from plerec.train import evaluate_split, load_checkpoint, prepare_data
exp = load_experiment(sys.argv[1], sys.argv[4:])
model, encoder, _ = load_checkpoint(sys.argv[2])
ctx = init_distributed("cpu")
data = prepare_data(exp, encoder)
out = {split: evaluate_split(model, data, split, exp, ctx)[0] for split in ("valid", "test")}
if ctx.is_main:
    open(sys.argv[3], "w").write(json.dumps(out))
shutdown(ctx)
"""


def test_gauc_under_ddp_with_streaming_equals_one_process_in_memory(tmp_path):
    # Each rank scores its share of the row groups, read in slices: the group codes travel with the rows.
    experiment = write_splits(tmp_path, 101, epochs=1, extra='[evaluate]\ngroup = "c1"\ncalibration_bins = 4')
    fit(load_experiment(experiment), out_dir=tmp_path / "one")
    checkpoint = tmp_path / "one" / "best.pt"
    (tmp_path / "eval.py").write_text(EVAL_SCRIPT)
    overrides = ["data.streaming=true", "train.eval_batch_size=5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(tmp_path / "eval.py"), str(experiment), str(checkpoint), str(tmp_path / "ddp.json"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    distributed = json.loads((tmp_path / "ddp.json").read_text())
    exp = load_experiment(experiment)  # one process, in memory
    model, encoder, _ = load_checkpoint(checkpoint)
    one = {split: evaluate_split(model, prepare_data(exp, encoder), split, exp)[0] for split in ("valid", "test")}
    for split in ("valid", "test"):
        assert {"gauc", "gauc_groups", "pcoc", "ece"} <= set(one[split]["click"])
        assert "gauc" not in one[split]["watch"]  # regression
        assert distributed[split]["click"] == pytest.approx(one[split]["click"], rel=1e-6, abs=1e-7)


def test_bad_inputs_are_errors_naming_what_was_expected(project):
    with pytest.raises(ValueError, match="Expected `groups` to be integer codes of the same length"):
        gauc(np.array([0.0, 1.0]), np.array([0.1, 0.2]), np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"Expected `groups` to have shape \(3,\)"):
        task_metrics("binary", np.zeros(3), np.zeros(3), np.ones(3, bool), groups=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="Expected `labels` to be 0 or 1"):
        gauc(np.array([0.5, 1.0]), np.array([0.1, 0.2]), np.array([1, 1]))
    (project / "exp.toml").write_text(EXPERIMENT.replace('group = "user"', 'group = " user"'))
    with pytest.raises(ValueError, match=r"\[evaluate\] `group` to be a column name without surrounding spaces"):
        load_experiment(project / "exp.toml")
    (project / "exp.toml").write_text(EXPERIMENT)
    grouped = load_experiment(project / "exp.toml")
    ungrouped = load_experiment(project / "exp.toml", ["evaluate.group="])
    data = prepare_data(ungrouped)
    model = fit(ungrouped, data).model
    with pytest.raises(ValueError, match=r"encoded with the \[evaluate\] group column 'user'.*carries ''"):
        evaluate_split(model, data, "test", grouped)
    with pytest.raises(ValueError, match=r"carry the group codes of the \[evaluate\] group column 'user'"):
        evaluate(model, data.splits["test"], grouped)
    with_groups = prepare_data(grouped)
    assert (
        evaluate(model, with_groups.splits["test"], grouped) == evaluate_split(model, with_groups, "test", grouped)[0]
    )
    assert "gauc" not in evaluate(model, with_groups.splits["test"], ungrouped)["click"]  # asked for none
