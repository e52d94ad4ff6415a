"""`plerec compare` and `plerec sweep`: files, columns, resume, gains, utilisation, errors."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as scipy_t

from plerec import compare as compare_module
from plerec.cli import main
from plerec.compare import compare, expert_utilisation, parse_models, sweep, write_comparison
from plerec.config import experiment_from_dict
from plerec.data.synth import SynthConfig, write_parquet
from plerec.models import MODELS
from plerec.report.summary import summarize
from plerec.train import prepare_data


def _table(path, rows=240, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    frame = pd.DataFrame(
        {
            "f0": x[:, 0],
            "f1": x[:, 1],
            "cat": rng.choice(["a", "b", "c"], size=rows),
            "click": (x[:, 0] + rng.normal(size=rows) > 0).astype(int),
            "watch": x[:, 1] * 2 + rng.normal(scale=0.1, size=rows),
        }
    )
    frame.to_csv(path, index=False)
    return path


def _experiment(path, **train):
    return experiment_from_dict(
        {
            "seed": 0,
            "data": {"path": str(path), "split": [0.6, 0.2, 0.2]},
            "features": {"numeric": ["f0", "f1"], "categorical": ["cat"]},
            "tasks": [
                {"name": "click", "kind": "binary", "label": "click"},
                {"name": "watch", "kind": "regression", "label": "watch"},
            ],
            "model": {"name": "ple", "embedding_dim": 2, "expert_dims": [4], "tower_dims": [3]},
            "train": {"epochs": 2, "batch_size": 64, "progress": False, **train},
        }
    )


@pytest.fixture
def tiny(tmp_path):
    return _experiment(_table(tmp_path / "log.csv"))


def test_compare_writes_every_file_with_documented_columns(tiny, tmp_path):
    out = tmp_path / "cmp"
    runs = compare(tiny, ["mmoe", "ple", "cross_stitch"], 2, out)
    write_comparison(runs, tiny, out)
    assert sorted((r.model, r.seed) for r in runs) == sorted(
        (m, s) for m in ("single", "mmoe", "ple", "cross_stitch") for s in (0, 1)
    )
    files = ("results.csv", "summary.md", "report.html", "seesaw.png", "experts.csv", "experts.png", "curves.png")
    for name in (*files, "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == ["model", "seed", "task", "metric", "split", "value"]
    assert set(results["split"]) == {"test", "valid"}
    measured = results[~results.metric.str.startswith(("gain_", "p_"))]
    assert set(measured.loc[measured.task == "click", "metric"]) == {"auc", "logloss", "pcoc", "ece"}
    assert set(measured.loc[measured.task == "watch", "metric"]) == {"mse"}
    # one row per (model, seed, task, metric, split)
    assert not results.duplicated(["model", "seed", "task", "metric", "split"]).any()
    assert len(measured) == 4 * 2 * 5 * 2
    # MTL gains on the primary metric: per seed, then seed "all" with mean, sd and the interval
    per_seed = results[results.seed != "all"]
    assert set(per_seed.loc[per_seed.metric.str.startswith("gain_"), "metric"]) == {"gain_auc", "gain_mse"}
    assert (per_seed.metric.str.startswith("gain_")).sum() == 3 * 2 * 2
    tested = all(
        (out / "runs" / m / f"seed{s}" / "test_predictions.npz").exists() for m, s in ((r.model, r.seed) for r in runs)
    )
    assert set(per_seed.loc[per_seed.metric.str.startswith("p_"), "metric"]) == (
        {"p_delong", "p_bootstrap"} if tested else set()
    )
    aggregate = results[results.seed == "all"]
    assert len(aggregate) == 3 * 2 * 4 and set(aggregate.model) == {"mmoe", "ple", "cross_stitch"}
    row = aggregate[(aggregate.model == "ple") & (aggregate.task == "click")].set_index("metric")["value"]
    gains = per_seed[(per_seed.model == "ple") & (per_seed.task == "click") & (per_seed.metric == "gain_auc")]
    assert row["gain_auc_mean"] == pytest.approx(gains.value.mean())
    assert row["gain_auc_sd"] == pytest.approx(gains.value.std(ddof=1))
    half = scipy_t.ppf(0.975, 1) * row["gain_auc_sd"] / np.sqrt(2)  # two seeds: one degree of freedom
    assert (row["gain_auc_ci_low"], row["gain_auc_ci_high"]) == pytest.approx(
        (row["gain_auc_mean"] - half, row["gain_auc_mean"] + half)
    )
    experts = pd.read_csv(out / "experts.csv")
    assert list(experts.columns) == ["model", "seed", "gate", "expert", "mean", "std"]
    assert set(experts["model"]) == {"mmoe", "ple"}  # the gated models only
    ple_gates = set(experts.loc[experts.model == "ple", "gate"])
    assert {"L0.click", "L0.watch", "L0.shared", "L1.click", "L1.watch"} == ple_gates  # tasks by name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # seesaw, experts, curves, reliability
    summary = (out / "summary.md").read_text()
    assert "MTL gain" in summary and "Verdict rule" in summary and "Verdicts (seesaw check)" in summary
    # Runs of every model share one split: identical test row counts.
    n = {(r.model, r.seed): r.metrics["test"]["click"]["n"] for r in runs}
    assert len(set(n.values())) == 1


def test_rerun_trains_nothing_new(tiny, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    first = compare(tiny, ["mmoe"], 1, out)

    def no_training(*args, **kwargs):
        raise AssertionError("compare retrained a finished run")

    monkeypatch.setattr(compare_module, "fit", no_training)
    again = compare(tiny, ["mmoe"], 1, out)
    assert [(r.model, r.seed, r.metrics) for r in again] == [(r.model, r.seed, r.metrics) for r in first]


def test_interrupted_compare_resumes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    compare(tiny, ["mmoe"], 1, out)
    (out / "runs" / "mmoe" / "seed0" / "run.json").unlink()  # as if killed before finishing
    trained = []
    real_fit = compare_module.fit
    monkeypatch.setattr(
        compare_module, "fit", lambda exp, *a, **k: trained.append(exp.model_name) or real_fit(exp, *a, **k)
    )
    compare(tiny, ["mmoe"], 1, out)
    assert trained == ["mmoe"]


def test_expert_utilisation_sums_to_one_per_gate(tiny):
    data = prepare_data(tiny)
    from plerec.train import fit

    for name in ("mmoe", "ple", "omoe", "ml_mmoe", "cgc"):
        result = fit(tiny.with_model(name, {"expert_dims": [4], "tower_dims": [3]}), data)
        rows = expert_utilisation(result.model, data.splits["test"])
        gates = {r["gate"] for r in rows}
        assert gates == set(result.model.gate_experts())
        for gate in gates:
            total = sum(r["mean"] for r in rows if r["gate"] == gate)
            assert total == pytest.approx(1.0, abs=1e-6), (name, gate)
            assert all(r["std"] >= 0 for r in rows if r["gate"] == gate)


def _run(model, seed, click_auc, watch_mse):
    return SimpleNamespace(
        model=model,
        seed=seed,
        metrics={"test": {"click": {"auc": click_auc, "logloss": 0.5}, "watch": {"mse": watch_mse}}},
    )


def test_gain_signs_for_auc_and_mse_and_untested_verdicts():
    kinds = {"click": "binary", "watch": "regression"}
    runs = [
        _run("single", 0, 0.70, 1.00),
        _run("single", 1, 0.72, 1.20),
        _run("mmoe", 0, 0.75, 1.10),  # better AUC, worse MSE: a seesaw
        _run("mmoe", 1, 0.77, 1.30),
        _run("ple", 0, 0.71, 0.90),  # better on both
        _run("ple", 1, 0.73, 1.00),
    ]
    summary = summarize(runs, kinds)
    assert summary.gains["mmoe", "click"].mean == pytest.approx(0.05)
    assert summary.gains["mmoe", "watch"].mean == pytest.approx(-0.10)  # single - model for MSE
    assert summary.gains["ple", "watch"].mean == pytest.approx(0.15)
    assert summary.gains["mmoe", "click"].n == 2
    assert summary.metrics["single", "click", "auc"].std == pytest.approx(np.std([0.70, 0.72], ddof=1))
    # The intervals over seeds (paired by seed); the per-seed tests need the test predictions, and a
    # comparison without them claims nothing: a mean below zero is not yet a seesaw.
    click = summary.tests["mmoe", "click"]
    assert click.gains == pytest.approx((0.05, 0.05)) and click.interval.half_width == pytest.approx(0.0)
    assert click.p_values == (None, None) and click.test == "delong"
    assert summary.tests["mmoe", "watch"].test == "bootstrap"
    assert {t.verdict for t in summary.tests.values()} == {"untested"}
    assert summary.verdict("mmoe") == "untested: no per-seed test (test predictions missing)"
    assert summary.verdict("single") == ""


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown model `mmo` in --models. Did you mean `mmoe`") as err:
        parse_models("single,mmo")
    for name in MODELS:
        assert name in str(err.value)
    assert parse_models("ple,mmoe,ple") == ["single", "ple", "mmoe"]


def test_seesaw_task_that_does_not_exist_is_an_error(tiny, tmp_path, capsys):
    toml = tmp_path / "exp.toml"
    from plerec.config import write_experiment

    write_experiment(tiny, toml)
    code = main(
        [
            "compare",
            str(toml),
            "--models",
            "mmoe",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--seesaw",
            "click,wach",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "Seesaw task `wach`" in err[0] and "Did you mean `watch`" in err[0]
    assert not (tmp_path / "o" / "runs").exists()  # failed before training anything


def test_compare_cli_end_to_end(tiny, tmp_path, capsys):
    toml = tmp_path / "exp.toml"
    from plerec.config import write_experiment

    write_experiment(tiny, toml)
    out = tmp_path / "o"
    code = main(["compare", str(toml), "--models", "shared_bottom", "--seeds", "1", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "shared_bottom" in printed and "MTL gain" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"single", "shared_bottom"}


def test_sweep_needs_synthetic_data(tiny, tmp_path):
    with pytest.raises(ValueError, match="has no correlation parameter"):
        sweep(tiny, [0.0, 0.5], ["mmoe"], 1, tmp_path / "sw")


def test_sweep_on_synthetic_data(tmp_path):
    base = tmp_path / "base.parquet"
    write_parquet(SynthConfig(rows=300, dim=6, correlation=0.5, seed=1), base)
    exp = experiment_from_dict(
        {
            "data": {"path": str(base), "split": [0.6, 0.2, 0.2]},
            "features": {"numeric": ["x*"]},
            "tasks": [
                {"name": "y1", "kind": "regression", "label": "y1"},
                {"name": "y2", "kind": "regression", "label": "y2"},
            ],
            "model": {"name": "mmoe", "expert_dims": [4], "tower_dims": [3]},
            "train": {"epochs": 1, "batch_size": 64, "progress": False},
        }
    )
    rows = sweep(exp, [0.0, 1.0], ["mmoe"], 1, tmp_path / "sw")
    assert {(r["correlation"], r["model"], r["task"]) for r in rows} == {
        (p, "mmoe", t) for p in (0.0, 1.0) for t in ("y1", "y2")
    }
    for name in ("sweep.csv", "sweep.png", "sweep.md", "corr0/summary.md", "corr1/report.html"):
        assert (tmp_path / "sw" / name).exists(), name
    table = pd.read_csv(tmp_path / "sw" / "sweep.csv")
    assert list(table.columns) == [
        "correlation",
        "model",
        "task",
        "gain_mean",
        "gain_std",
        "gain_ci_low",
        "gain_ci_high",
        "seeds",
        "verdict",
        "model_verdict",
    ]
    assert table.gain_ci_low.isna().all()  # one seed: no interval over seeds; the per-seed test decides
    assert set(table.verdict) <= {"gain", "loss", "n.s."}
    assert "(1 seed, no interval)" in (tmp_path / "sw" / "sweep.md").read_text()
    meta = pq_metadata(tmp_path / "sw" / "data" / "corr1.parquet")
    assert meta["correlation"] == 1.0 and meta["dim"] == 6 and meta["rows"] == 300


def pq_metadata(path):
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[b"plerec.synth"])


def test_the_single_task_structure_follows_the_experts_or_the_baseline_section(tmp_path):
    from plerec.compare import model_params

    path = _table(tmp_path / "log.csv")
    exp = _experiment(path)
    assert model_params(exp, "single") == {
        "embedding_dim": 2,
        "embedding_init_std": 1e-4,
        "tower_dims": (3,),
        "dense_init": "uniform",  # every model's key: carried as it is
        "batch_norm": (),
        "bottom_dims": (4,),
    }
    raw = {
        "data": {"path": str(path), "split": [0.6, 0.2, 0.2]},
        "features": {"numeric": ["f0", "f1"]},
        "tasks": [{"name": "click", "kind": "binary", "label": "click"}],
        "model": {"name": "ple", "expert_dims": [4], "tower_dims": [3]},
        "baseline": {"bottom_dims": [], "tower_dims": [8, 5]},
    }
    params = model_params(experiment_from_dict(raw), "single")
    assert params["bottom_dims"] == () and params["tower_dims"] == (8, 5)
    with pytest.raises(ValueError, match=r"Unknown key `bottom` in \[baseline\]"):
        experiment_from_dict({**raw, "baseline": {"bottom": [3]}})


def test_finished_only_tables_the_finished_runs_and_names_a_missing_one(tiny, tmp_path, monkeypatch):
    """`--finished-only`: the seeds done so far give their tables with nothing trained; a seed not run yet is an
    error naming its folder, before anything is trained or set aside."""
    out = tmp_path / "cmp"
    compare(tiny, ["single", "mmoe"], 1, out)
    monkeypatch.setattr(compare_module, "fit", lambda *a, **k: pytest.fail("--finished-only trained a run"))
    runs = compare(tiny, ["single", "mmoe"], 1, out, finished_only=True)
    assert sorted((r.model, r.seed) for r in runs) == [("mmoe", 0), ("single", 0)]
    with pytest.raises(ValueError, match=r"Expected a finished run of single seed 1 in .*seed1.*it has no run.json"):
        compare(tiny, ["single", "mmoe"], 2, out, finished_only=True)
    changed = _experiment(tiny.data.path, lr=0.01)
    with pytest.raises(ValueError, match=r"changed since it ran \(train.lr: 0.001 -> 0.01\)"):
        compare(changed, ["single", "mmoe"], 1, out, finished_only=True)
    assert not list(out.rglob("*.previous"))  # nothing set aside
