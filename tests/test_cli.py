"""The `plerec` command: train / evaluate outputs, errors as one line and exit 2, synth, models."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import plerec.train as train_module
from plerec.cli import _parser, _watch_overrides, main
from plerec.config import load_experiment
from plerec.data.synth import read_synth_metadata
from plerec.models import MODELS

EXPERIMENT = """\
seed = 7

[data]
train = "train.csv"
valid = "valid.csv"
test = "test.csv"

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
epochs = 2
batch_size = 64
progress = false
"""


def _frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    frame = pd.DataFrame({"a": a, "b": b, "cat": rng.choice(["x", "y", "z"], rows)})
    frame["click"] = (a + 0.5 * rng.normal(size=rows) > 0).astype(int)
    frame["watch"] = np.where(rng.random(rows) < 0.25, np.nan, 2 * b)  # a quarter outside the space
    return frame


@pytest.fixture
def project(tmp_path) -> Path:
    """An experiment file next to its train / valid / test tables."""
    for name, rows, seed in (("train", 200, 0), ("valid", 60, 1), ("test", 60, 2)):
        _frame(rows, seed).to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    return tmp_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One `plerec train` run shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("cli")
    for name, rows, seed in (("train", 200, 0), ("valid", 60, 1), ("test", 60, 2)):
        _frame(rows, seed).to_csv(root / f"{name}.csv", index=False)
    (root / "exp.toml").write_text(EXPERIMENT)
    assert main(["train", str(root / "exp.toml"), "--out", str(root / "run"), "--quiet"]) == 0
    return root


def test_train_writes_metrics_json_checkpoint_and_experiment(trained, capsys):
    out = trained / "run"
    record = json.loads((out / "metrics.json").read_text())
    assert set(record) == {"model", "seed", "split", "tasks", "splits", "train_seconds"}
    assert (record["model"], record["seed"], record["split"]) == ("ple", 7, "test")
    # No split disappears: `tasks` is the test split, `splits` every held-out split.
    assert list(record["splits"]) == ["valid", "test"] and record["splits"]["test"] == record["tasks"]
    assert record["splits"]["valid"]["click"]["n"] == 60 and record["splits"]["valid"] != record["tasks"]
    assert isinstance(record["train_seconds"], float) and record["train_seconds"] > 0
    assert set(record["tasks"]) == {"click", "watch"}
    click, watch = record["tasks"]["click"], record["tasks"]["watch"]
    assert set(click) == {"auc", "logloss", "pcoc", "ece", "n"}
    assert set(watch) == {"mse", "n"}
    test = pd.read_csv(trained / "test.csv")
    assert click["n"] == len(test) == 60
    assert watch["n"] == int(test["watch"].notna().sum()) < 60
    assert 0 <= click["auc"] <= 1 and click["logloss"] > 0 and watch["mse"] > 0

    assert (out / "best.pt").is_file()
    written = load_experiment(out / "experiment.toml")
    original = load_experiment(trained / "exp.toml")
    assert written.model_name == "ple"
    assert written.model == original.model
    assert written.tasks == original.tasks
    assert written.data == original.data
    assert written.seed == 7


def test_train_prints_the_metrics_table(project, capsys):
    assert main(["train", str(project / "exp.toml"), "--out", str(project / "run"), "--quiet"]) == 0
    captured = capsys.readouterr()
    record = json.loads((project / "run" / "metrics.json").read_text())
    assert "| ple |" in captured.out
    assert f"{record['tasks']['click']['auc']:.4f}" in captured.out
    assert f"{record['tasks']['watch']['mse']:.4f}" in captured.out
    assert captured.err == ""  # --quiet: no progress or per-epoch lines


def test_off_a_terminal_there_is_no_progress_bar_and_one_line_per_epoch(project, capsys):
    """`progress = true` as in a user's experiment; stderr is captured, as in a log file or a pipe."""
    text = EXPERIMENT.replace("progress = false", "progress = true").replace("epochs = 2", "epochs = 3")
    (project / "exp.toml").write_text(text)
    assert main(["train", str(project / "exp.toml"), "--out", str(project / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redraws
    lines = err.splitlines()
    epochs = [line.split(" (")[0] for line in lines if line.startswith("epoch ")]
    assert epochs == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert [line.split()[0] for line in lines[:4]] == ["rows:", "features:", "task", "task"] and len(lines) == 4 + 3


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({}, (None, "'1000'")),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ("'ACTIVE'", None)),
        ({"OMP_WAIT_POLICY": ""}, ("''", None)),
        ({"GOMP_SPINCOUNT": "5"}, (None, "'5'")),
    ],
)
def test_openmp_threads_spin_briefly_while_they_wait_unless_the_user_says_otherwise(setting, expected):
    """libgomp's long spinning made a short training several times slower next to busy processes
    (benchmarks/contention.py). libgomp reads the setting once, when torch loads it: so it is made when plerec
    is imported, and importing plerec's CLI does not import torch."""
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in names}  # this process imported plerec
    env.update(setting)
    code = (
        "import os, sys, plerec.cli; "
        "print(*[repr(os.environ.get(n)) for n in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')], 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [str(e) for e in expected] + ["False"], done.stderr


def test_json_log_format_makes_every_stderr_line_a_json_object(project, capsys):
    text = EXPERIMENT.replace("progress = false", "progress = true").replace("epochs = 2", "epochs = 3")
    (project / "exp.toml").write_text(text)
    assert main(["train", str(project / "exp.toml"), "--out", str(project / "run"), "--log-format", "json"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "| ple |" in captured.out  # stdout keeps the metrics table
    events = [json.loads(line) for line in captured.err.splitlines()]
    assert [e["event"] for e in events] == ["data", "epoch", "epoch", "epoch"]
    data = events[0]
    assert data["rows"] == {"train": 200, "valid": 60, "test": 60}
    assert [t["name"] for t in data["tasks"]] == ["click", "watch"] and data["tasks"][1]["positive_rate"] is None
    for epoch, event in enumerate(events[1:], start=1):
        assert event["epoch"] == epoch and event["epochs"] == 3 and event["seconds"] > 0
        assert set(event["valid"]) == {"click", "watch"} and "auc" in event["valid"]["click"]
        assert event["monitor"]["name"] and isinstance(event["monitor"]["value"], float)
    assert load_experiment(project / "run" / "experiment.toml").train.log_format == "json"


def test_json_log_format_holds_for_the_single_task_baseline(project, capsys):
    """`single` trains one fit per task: their epoch lines stay JSON, each naming its task."""
    run = ["train", str(project / "exp.toml"), "--out", str(project / "run"), "--log-format", "json"]
    assert main([*run, "--set", "model.name=single"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [(e["task"], e["epoch"]) for e in epochs] == [("click", 1), ("click", 2), ("watch", 1), ("watch", 2)]
    assert set(epochs[0]["valid"]) == {"click"} and set(epochs[2]["valid"]) == {"watch"}


def test_json_log_format_writes_errors_as_json_too(project, capsys):
    args = ["train", str(project / "exp.toml"), "--out", str(project / "run"), "--log-format", "json"]
    assert main([*args, "--set", "train.bogus=1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    error = json.loads(line)
    assert error["event"] == "error" and "`bogus`" in error["text"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"tensorboard": False, "tensorboard_dir": "", "mlflow": False, "mlflow_uri": "", "log_format": "text"}),
        (["--tensorboard"], {"tensorboard": True, "tensorboard_dir": ""}),
        (["--tensorboard", "tb logs/2024-01-01"], {"tensorboard": True, "tensorboard_dir": "tb logs/2024-01-01"}),
        (["--tensorboard", "123"], {"tensorboard_dir": "123"}),  # a folder, not the number 123
        (["--mlflow"], {"mlflow": True, "mlflow_uri": ""}),
        (["--mlflow-uri", "http://host:5000"], {"mlflow": True, "mlflow_uri": "http://host:5000"}),
        (["--mlflow-uri", 'file:/a "b"'], {"mlflow": True, "mlflow_uri": 'file:/a "b"'}),
        (["--log-format", "json"], {"log_format": "json"}),
    ],
)
def test_watch_flags_set_their_train_keys(project, monkeypatch, flags, expected):
    monkeypatch.chdir(project)
    args = _parser().parse_args(["train", "exp.toml", "--out", "run", *flags])
    train = load_experiment(project / "exp.toml", _watch_overrides(args)).train
    for key, value in expected.items():
        if key == "tensorboard_dir" and value:  # a relative folder is the one where the command ran
            value = str(project / value)
        assert getattr(train, key) == value, key


def _interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C at the start of optimiser step `step` (1-based): loss_weights runs once per step."""
    calls = {"n": 0}
    real = train_module.loss_weights

    def pressed(exp, t):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(exp, t)

    monkeypatch.setattr(train_module, "loss_weights", pressed)


def test_ctrl_c_says_how_to_resume_and_the_command_finishes_the_run(project, capsys, monkeypatch):
    exp, out = str(project / "exp.toml"), str(project / "run")
    args = ["train", exp, "--out", out, "--quiet", "--set", "train.lr=0.002"]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 6)  # 4 steps an epoch: in epoch 2, after epoch 1's checkpoint
        assert main(args) == 130
    (line,) = capsys.readouterr().err.splitlines()
    command = f"plerec train {exp} --out {out} --set train.lr=0.002 --quiet --resume"
    assert line.startswith("plerec: interrupted") and line.endswith(f"Resume with: {command}")
    assert (project / "run" / "last.pt").is_file() and not (project / "run" / "metrics.json").exists()
    assert main(shlex.split(command)[1:]) == 0
    assert json.loads((project / "run" / "metrics.json").read_text())["model"] == "ple"


def test_ctrl_c_before_a_checkpoint_says_nothing_was_saved(project, capsys, monkeypatch):
    _interrupt_at(monkeypatch, 2)
    code = main(["train", str(project / "exp.toml"), "--out", str(project / "run"), "--log-format", "json"])
    assert code == 130
    last = json.loads(capsys.readouterr().err.splitlines()[-1])
    assert last["event"] == "interrupted" and last["resume"] is None and last["checkpoints"] == []
    assert "nothing was saved yet" in last["text"]


PLE_ONLY = EXPERIMENT.replace("tower_dims = [4]\n", "tower_dims = [4]\nnum_levels = 1\nnum_task_experts = 2\n")


def test_set_model_name_drops_the_keys_of_the_other_model(project, capsys):
    (project / "exp.toml").write_text(PLE_ONLY)
    out = project / "run"
    args = ["train", str(project / "exp.toml"), "--out", str(out), "--quiet", "--set", "model.name=mmoe"]
    assert main([*args, "--set", "model.num_experts=3"]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        "--set model.name=mmoe: dropped the [model] keys of ple that do not apply to mmoe: num_levels, num_task_experts"
    )
    written = load_experiment(out / "experiment.toml")
    assert written.model_name == "mmoe" and written.model.num_experts == 3  # set for the new model: kept
    assert written.model.expert_dims == (4,) and written.model.tower_dims == (4,)  # keys both models have: kept


@pytest.mark.parametrize(
    ("text", "extra", "names"),
    [
        (PLE_ONLY.replace("num_levels = 1", "num_expert = 2"), [], ["`num_expert`", "Did you mean `num_experts`"]),
        (PLE_ONLY, ["--set", "model.num_levels=2"], ["`num_levels`", "[model] for `mmoe`"]),  # asked for: kept
    ],
    ids=["a key of no model", "a key set for a model that lacks it"],
)
def test_set_model_name_still_refuses_keys_it_cannot_drop(project, capsys, text, extra, names):
    (project / "exp.toml").write_text(text)
    args = ["train", str(project / "exp.toml"), "--out", str(project / "run"), "--set", "model.name=mmoe", *extra]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("plerec: error: ") and all(name in line for name in names), line


def test_evaluate_names_the_experiment_of_a_compare_run(project, capsys):
    exp, out = project / "exp.toml", project / "cmp"
    flags = ["--models", "mmoe", "--seeds", "1", "--quiet", "--set", "train.epochs=1"]
    assert main(["compare", str(exp), "--out", str(out), *flags]) == 0
    run = out / "runs" / "mmoe" / "seed7"
    capsys.readouterr()
    assert main(["evaluate", str(exp), "--checkpoint", str(run / "best.pt")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"holds a `mmoe` model, but {exp} describes `ple`" in line
    assert f"plerec evaluate {run / 'experiment.toml'} --checkpoint {run / 'best.pt'}" in line
    assert main(["evaluate", str(run / "experiment.toml"), "--checkpoint", str(run / "best.pt")]) == 0
    assert (
        json.loads((run / "metrics-test.json").read_text())["tasks"]
        == json.loads((run / "metrics.json").read_text())["tasks"]
    )


@pytest.mark.skipif(importlib.util.find_spec("plerec.report.run") is None, reason="plerec.report.run not written yet")
def test_report_writes_the_run_report_and_prints_its_path(trained, capsys, tmp_path):
    out = tmp_path / "report.html"
    capsys.readouterr()
    assert main(["report", str(trained / "run"), "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0
    assert str(out) in capsys.readouterr().out


def test_train_writes_the_run_report_unless_told_not_to(trained, project, capsys):
    page = trained / "run" / "report.html"
    assert page.is_file() and "<img" in page.read_text()  # the trained fixture's `plerec train`
    capsys.readouterr()
    out = project / "bare"
    assert main(["train", str(project / "exp.toml"), "--out", str(out), "--quiet", "--no-report"]) == 0
    assert not (out / "report.html").exists() and "report.html" not in capsys.readouterr().out


def test_set_model_name_changes_the_model(project):
    out = project / "run"
    assert main(["train", str(project / "exp.toml"), "--out", str(out), "--quiet", "--set", "model.name=mmoe"]) == 0
    assert json.loads((out / "metrics.json").read_text())["model"] == "mmoe"
    assert load_experiment(out / "experiment.toml").model_name == "mmoe"


def test_evaluate_reproduces_the_test_metrics(trained, capsys, tmp_path):
    out = trained / "run"
    expected = json.loads((out / "metrics.json").read_text())["tasks"]
    capsys.readouterr()
    args = ["evaluate", str(trained / "exp.toml"), "--checkpoint", str(out / "best.pt"), "--split", "test"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "metrics-test.json").read_text())
    assert written == {"model": "ple", "seed": 7, "split": "test", "tasks": expected, "splits": {"test": expected}}
    assert f"{expected['click']['auc']:.4f}" in printed and f"{expected['watch']['mse']:.4f}" in printed

    assert main([*args[:-1], "valid", "--out", str(tmp_path / "valid.json")]) == 0
    valid = json.loads((tmp_path / "valid.json").read_text())
    assert valid["split"] == "valid"
    assert valid["tasks"]["click"]["n"] == 60 and valid["tasks"] != expected


def test_evaluate_refuses_a_split_that_differs_from_training(tmp_path, capsys):
    frame = pd.concat([_frame(200, 0), _frame(100, 1)], ignore_index=True)
    frame.to_csv(tmp_path / "all.csv", index=False)
    text = EXPERIMENT.replace('train = "train.csv"\nvalid = "valid.csv"\ntest = "test.csv"', 'path = "all.csv"')
    (tmp_path / "exp.toml").write_text(text)
    exp, out = str(tmp_path / "exp.toml"), tmp_path / "run"
    assert main(["train", exp, "--out", str(out), "--quiet", "--set", "seed=3"]) == 0
    capsys.readouterr()
    assert main(["evaluate", exp, "--checkpoint", str(out / "best.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plerec: error:") and "training rows" in err
    assert main(["evaluate", str(out / "experiment.toml"), "--checkpoint", str(out / "best.pt")]) == 0
    assert (
        json.loads((out / "metrics-test.json").read_text())["tasks"]
        == json.loads((out / "metrics.json").read_text())["tasks"]
    )


def _bad_label(project: Path) -> list[str]:
    frame = pd.read_csv(project / "train.csv")
    frame["click"] = frame["click"].astype(float)
    frame.loc[17, "click"] = 3.5
    frame.to_csv(project / "train.csv", index=False)
    return []


def _edit(old: str, new: str):
    def apply(project: Path) -> list[str]:
        path = project / "exp.toml"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))
        return []

    return apply


ERRORS = [
    ("unknown config key", _edit("epochs = 2", "epoch = 2"), ["`epoch`", "Did you mean `epochs`"]),
    ("unknown override key", lambda p: ["--set", "train.bogus=1"], ["`bogus`", "[train]"]),
    ("missing column", _edit('numeric = ["a", "b"]', 'numeric = ["a", "bb"]'), ["`bb`", "Did you mean `b`"]),
    ("label outside {0,1}", _bad_label, ["`click`", "3.5", "0 or 1"]),
    ("unknown model name", _edit('name = "ple"', 'name = "plee"'), ["`plee`", "Did you mean `ple`"]),
    ("unknown model name via --set", lambda p: ["--set", "model.name=mmo"], ["`mmo`", "Did you mean `mmoe`"]),
    ("missing experiment file", lambda p: (p / "exp.toml").unlink() or [], ["exp.toml", "does not exist"]),
]


@pytest.mark.parametrize(("case", "mutate", "names"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_one_line_and_exit_2(project, capsys, case, mutate, names):
    extra = mutate(project)
    code = main(["train", str(project / "exp.toml"), "--out", str(project / "run"), *extra])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("plerec: error: ")
    for name in names:
        assert name in lines[0]
    assert not (project / "run" / "metrics.json").exists()


def test_synth_writes_parquet(tmp_path, capsys):
    out = tmp_path / "synth.parquet"
    assert main(["synth", "--out", str(out), "--rows", "50", "--dim", "8", "--correlation", "0.3"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 50
    assert table.column_names == [f"x{i}" for i in range(8)] + ["y1", "y2"]
    config = read_synth_metadata(out)
    assert (config.rows, config.dim, config.correlation) == (50, 8, 0.3)
    assert str(out) in capsys.readouterr().out


def test_synth_rejects_a_bad_threshold(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path / "s.parquet"), "--rows", "5", "--dim", "4", "--binary"]
    assert main([*args, "--threshold", "high"]) == 2
    assert capsys.readouterr().err.strip() == (
        "plerec: error: Expected --threshold to be 'median' or a number, but got 'high'"
    )


def test_models_lists_every_model_with_its_hyperparameters(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    blocks: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("    "):
            blocks[current].append(line.strip().split(" = ")[0])
        else:
            current = line.split(":")[0]
            blocks[current] = []
    assert list(blocks) == list(MODELS)
    assert {"single", "shared_bottom", "omoe", "mmoe", "cgc", "ple"} <= set(blocks)
    for name in blocks:
        assert {"embedding_dim", "tower_dims"} <= set(blocks[name])
    assert {"num_experts", "expert_dims"} <= set(blocks["mmoe"])
    assert {"num_levels", "num_task_experts", "num_shared_experts", "expert_dims", "levels"} <= set(blocks["ple"])
    assert "bottom_dims" in blocks["single"] and "bottom_dims" in blocks["shared_bottom"]
    assert "    num_levels = 2" in out


def test_console_script_exits_2_with_one_error_line(project):
    script = Path(sys.executable).with_name("plerec")
    assert script.is_file(), f"the plerec console script is not installed next to {sys.executable}"
    (project / "exp.toml").write_text(EXPERIMENT.replace("epochs = 2", "epoch = 2"))
    done = subprocess.run(
        [str(script), "train", str(project / "exp.toml"), "--out", str(project / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("plerec: error: ") and "Unknown key `epoch` in [train]" in lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "65536"], r"--port in \[0, 65535\] \(0 picks a free port\), but got 65536"),
        (["--port", "-1"], r"--port in \[0, 65535\].* but got -1"),
        (["--threads", "100000"], r"--threads in \[0, 1024\] \(0 = torch's default\), but got 100000"),
    ],
)
def test_serve_refuses_a_port_or_thread_count_out_of_range_before_loading(tmp_path, capsys, flags, message):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
