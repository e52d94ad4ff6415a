"""TensorBoard event files and MLflow runs of a training run (plerec.tracking), read back with their own readers."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from parquet_splits import write_splits
from tiny_experiments import experiment, write_table

from plerec.config import experiment_to_dict
from plerec.observe import RunObserver
from plerec.tracking import MLflowObserver, TensorBoardObserver, flat_params
from plerec.train import fit

STEPS = 3  # 300 rows, 60% train = 180 rows, batch 64
EPOCHS = 2
TRAIN_ROWS = 180


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tracking") / "table.csv"
    write_table(path, 300, 0)
    return path


def _experiment(path, *, model: dict | None = None, tasks: list | None = None, **train):
    return experiment(path, model=model, tasks=tasks, **{"epochs": EPOCHS, **train})


def _scalars(folder: Path) -> dict[str, list]:
    """Every scalar tag of the event files under `folder`: its events (step, value), as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


class Crash(Exception):
    """Stands in for the process dying at a given step."""


class CrashAt(RunObserver):
    def __init__(self, step: int):
        self.at = step

    def step(self, run, task_losses):
        if run.progress.step == self.at:
            raise Crash


# ---------------------------------------------------------------------------------------------
# TensorBoard

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="the tensorboard extra is not installed"
)


@needs_tensorboard
def test_event_files_hold_every_step_and_epoch_of_a_gated_model(table_path, tmp_path):
    result = fit(_experiment(table_path, tensorboard=True), out_dir=tmp_path)
    scalars = _scalars(tmp_path / "tensorboard")
    every_step, epoch_ends = list(range(1, EPOCHS * STEPS + 1)), [STEPS * e for e in range(1, EPOCHS + 1)]
    for task in ("click", "watch"):
        assert [s for s, _ in scalars[f"train/loss/{task}"]] == every_step
        assert [v for _, v in scalars[f"train/weight/{task}"]] == [1.0] * len(every_step)
        assert [s for s, _ in scalars[f"train/epoch_loss/{task}"]] == epoch_ends
        epoch_losses = [r["train_loss"][task] for r in result.history]
        assert [v for _, v in scalars[f"train/epoch_loss/{task}"]] == pytest.approx(epoch_losses, rel=1e-6)
        # the epoch loss is the mean of its steps' losses
        steps = [v for _, v in scalars[f"train/loss/{task}"]]
        assert np.mean(steps[:STEPS]) == pytest.approx(epoch_losses[0], rel=1e-5)
    aucs = [r["valid"]["click"]["auc"] for r in result.history]
    assert [v for _, v in scalars["valid/click/auc"]] == pytest.approx(aucs, rel=1e-6)
    assert [s for s, _ in scalars["valid/watch/mse"]] == epoch_ends
    speeds = [TRAIN_ROWS / r["epoch_seconds"] for r in result.history]
    assert [v for _, v in scalars["train/samples_per_second"]] == pytest.approx(speeds, rel=1e-5)
    assert [v for _, v in scalars["train/epoch"]] == [1.0, 2.0]

    # every gate, named by task, with its experts' mean weights (summing to 1) and the entropy of its weights
    gates = result.model.gate_experts()
    assert len(gates) == 5  # two levels: two task gates each, one shared gate below the last level
    for gate, experts in gates.items():
        name = gate.replace("task0", "click").replace("task1", "watch")
        means = [scalars[f"gate/{name}/{e.replace('task0', 'click').replace('task1', 'watch')}"] for e in experts]
        for epoch in range(EPOCHS):
            assert sum(m[epoch][1] for m in means) == pytest.approx(1.0, abs=1e-5)
        entropy = scalars[f"gate/{name}/entropy"]
        assert [s for s, _ in entropy] == epoch_ends
        assert all(0 < v <= math.log(len(experts)) + 1e-6 for _, v in entropy)


@needs_tensorboard
def test_a_model_without_gates_writes_no_gate_tags(table_path, tmp_path):
    model = {"name": "shared_bottom", "bottom_dims": [4], "tower_dims": [4], "embedding_dim": 2}
    fit(_experiment(table_path, model=model, tensorboard=True), out_dir=tmp_path)
    scalars = _scalars(tmp_path / "tensorboard")
    assert "train/loss/click" in scalars and "valid/click/auc" in scalars
    assert not [tag for tag in scalars if tag.startswith("gate/")]


@needs_tensorboard
def test_step_weights_follow_the_schedule_and_the_balancing_method(table_path, tmp_path):
    tasks = [
        {"name": "click", "kind": "binary", "label": "click", "weight": 2.0, "gamma": 0.5},
        {"name": "watch", "kind": "regression", "label": "watch"},
    ]
    fit(_experiment(table_path, tasks=tasks, tensorboard=True, weight_schedule="step"), out_dir=tmp_path / "eq10")
    weights = _scalars(tmp_path / "eq10" / "tensorboard")["train/weight/click"]
    assert weights == [(s, pytest.approx(2.0 * 0.5 ** (s - 1))) for s in range(1, EPOCHS * STEPS + 1)]

    learned = fit(_experiment(table_path, tensorboard=True, balancing="uncertainty"), out_dir=tmp_path / "unc")
    scalars = _scalars(tmp_path / "unc" / "tensorboard")
    for record in learned.history:  # after an epoch's last step: the weights history.json records
        at_end = dict(scalars["train/weight/watch"])[record["epoch"] * STEPS]
        assert at_end == pytest.approx(record["balancing"]["weights"]["watch"], rel=1e-6)
    assert len({v for _, v in scalars["train/weight/watch"]}) > 1  # they were learned


@needs_tensorboard
def test_every_n_steps_writes_the_mean_loss_of_those_steps(table_path, tmp_path):
    exp = _experiment(table_path)
    fit(exp, out_dir=tmp_path / "each", observers=[TensorBoardObserver(tmp_path / "each_tb")])
    fit(exp, out_dir=tmp_path / "two", observers=[TensorBoardObserver(tmp_path / "two_tb", every=2)])
    each, two = _scalars(tmp_path / "each_tb")["train/loss/click"], _scalars(tmp_path / "two_tb")["train/loss/click"]
    assert [s for s, _ in two] == [2, 3, 4, 6]  # and each epoch's last step
    losses = dict(each)
    expected = [(losses[1] + losses[2]) / 2, losses[3], losses[4], (losses[5] + losses[6]) / 2]
    assert [v for _, v in two] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="Expected `every` >= 1"):
        TensorBoardObserver(tmp_path, every=0)


@needs_tensorboard
def test_a_resumed_run_continues_the_step_axis_once(table_path, tmp_path):
    """The first process dies at step 6 with its last checkpoint at step 4: it wrote step 5 already. The resumed
    process writes steps 5 and 6 again, and TensorBoard reads each step once, the resumed one's value."""
    exp = _experiment(table_path, tensorboard=True, checkpoint_every=4)
    with pytest.raises(Crash):
        fit(exp, out_dir=tmp_path / "cut", observers=[CrashAt(6)])
    first = _scalars(tmp_path / "cut" / "tensorboard")
    assert [s for s, _ in first["train/loss/click"]] == [1, 2, 3, 4, 5]
    time.sleep(1.1)  # event file names begin with the second they were opened: the resumed one sorts after
    fit(exp, out_dir=tmp_path / "cut", resume=True)
    fit(exp, out_dir=tmp_path / "whole")
    resumed, whole = _scalars(tmp_path / "cut" / "tensorboard"), _scalars(tmp_path / "whole" / "tensorboard")
    assert [s for s, _ in resumed["train/loss/click"]] == list(range(1, EPOCHS * STEPS + 1))
    assert [s for s, _ in resumed["valid/click/auc"]] == [3, 6]
    for tag in ("train/loss/click", "train/loss/watch", "valid/click/auc", "train/epoch_loss/watch"):
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in whole[tag]], rel=1e-6), tag


@needs_tensorboard
def test_streamed_data_logs_the_same_tags(tmp_path):
    path = write_splits(tmp_path, 101, extra="tensorboard = true")
    from plerec.config import load_experiment

    exp = load_experiment(path, ["data.streaming=true"])
    result = fit(exp, out_dir=tmp_path / "out")
    scalars = _scalars(tmp_path / "out" / "tensorboard")
    assert [s for s, _ in scalars["train/loss/click"]] == list(range(1, 27))  # 101 rows, batch 8: 13 a epoch
    speeds = [101 / r["epoch_seconds"] for r in result.history]
    assert [v for _, v in scalars["train/samples_per_second"]] == pytest.approx(speeds, rel=1e-5)
    assert [s for s, _ in scalars["gate/L0.click/entropy"]] == [13, 26]


@needs_tensorboard
def test_a_given_folder_serves_a_run_without_output_folder(table_path, tmp_path):
    fit(_experiment(table_path, tensorboard=True, tensorboard_dir=str(tmp_path / "tb")))
    assert len(_scalars(tmp_path / "tb")["train/loss/click"]) == EPOCHS * STEPS
    with pytest.raises(ValueError, match="set train.tensorboard_dir"):
        fit(_experiment(table_path, tensorboard=True))


def test_a_missing_package_names_the_extra(table_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name))
    with pytest.raises(ValueError, match=r"pip install 'plerec\[tensorboard\]'"):
        TensorBoardObserver.for_run(_experiment(table_path, tensorboard=True), Path("out"))


@needs_tensorboard
def test_under_torchrun_only_rank_0_writes_event_files(tmp_path):
    """And only rank 0 opens an MLflow run, where the mlflow extra is installed."""
    with_mlflow = importlib.util.find_spec("mlflow") is not None
    path = write_splits(tmp_path, 101, extra="tensorboard = true" + ("\nmlflow = true" if with_mlflow else ""))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "plerec", "train", str(path), "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].parent == Path("ddp/tensorboard"), files
    scalars = _scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss/click"]] == list(range(1, 27))  # global batch 8: 13 steps a epoch
    history = json.loads((out / "history.json").read_text())["epochs"]
    assert [v for _, v in scalars["train/epoch_loss/click"]] == pytest.approx(
        [r["train_loss"]["click"] for r in history], rel=1e-6
    )  # the global epoch loss, not rank 0's share
    speeds = [101 / r["epoch_seconds"] for r in history]  # every rank's rows, not rank 0's
    assert [v for _, v in scalars["train/samples_per_second"]] == pytest.approx(speeds, rel=1e-5)
    if with_mlflow:
        [run] = _runs((out / "mlruns").as_uri())
        assert run.info.status == "FINISHED"
        assert len(_client((out / "mlruns").as_uri()).get_metric_history(run.info.run_id, "train/loss/click")) == 26


# ---------------------------------------------------------------------------------------------
# MLflow


def _client(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str = "plerec") -> list:
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []


class WritesReport(RunObserver):
    """Stands in for `plerec train` writing report.html before the observers' finish."""

    def finish(self, run, result):
        (run.out / "report.html").write_text("<html></html>")


def test_an_mlflow_run_holds_the_experiment_metrics_and_files(table_path, tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    exp = _experiment(table_path, mlflow=True)
    result = fit(exp, out_dir=tmp_path, observers=[WritesReport()])
    [run] = _runs((tmp_path / "mlruns").as_uri())
    client = _client((tmp_path / "mlruns").as_uri())
    assert run.info.status == "FINISHED" and run.info.run_name == "ple-seed0"
    assert run.data.tags["plerec.model"] == "ple" and run.data.tags["plerec.seed"] == "0"

    params = run.data.params
    assert params == flat_params(exp)
    assert params["model.name"] == "ple" and params["train.lr"] == str(exp.train.lr)
    assert params["model.expert_dims"] == "[4]" and params["tasks.1.name"] == "watch"
    assert len(params) > 50  # every key of the resolved experiment, sent in batches

    history = client.get_metric_history(run.info.run_id, "train/loss/click")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS * STEPS + 1))
    aucs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "valid/click/auc")}
    assert aucs == {STEPS * (i + 1): pytest.approx(r["valid"]["click"]["auc"]) for i, r in enumerate(result.history)}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gate/L1.watch/entropy")] == [3, 6]
    assert run.data.metrics["final/test/click/auc"] == pytest.approx(result.metrics["test"]["click"]["auc"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.json", "best.pt", "report.html"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "down")))
    assert json.loads(local.read_text()) == json.loads((tmp_path / "metrics.json").read_text())


def test_a_run_that_fails_is_marked_failed(table_path, tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    with pytest.raises(Crash):
        fit(_experiment(table_path, mlflow=True), out_dir=tmp_path, observers=[CrashAt(4)])
    [run] = _runs((tmp_path / "mlruns").as_uri())
    assert run.info.status == "FAILED"
    steps = [
        m.step for m in _client((tmp_path / "mlruns").as_uri()).get_metric_history(run.info.run_id, "train/loss/click")
    ]
    assert steps == [1, 2, 3]  # what it did before it failed is kept


def test_a_resumed_run_continues_its_mlflow_run(table_path, tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    exp = _experiment(table_path, mlflow=True, checkpoint_every=4)
    with pytest.raises(Crash):
        fit(exp, out_dir=tmp_path, observers=[CrashAt(6)])
    [failed] = _runs((tmp_path / "mlruns").as_uri())
    assert failed.info.status == "FAILED"
    fit(exp, out_dir=tmp_path, resume=True)
    [run] = _runs((tmp_path / "mlruns").as_uri())
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    client = _client((tmp_path / "mlruns").as_uri())
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss/click"))
    assert steps == [1, 2, 3, 4, 5, 5, 6]  # step 5 once before the interruption and once after the checkpoint
    assert "best.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_store_deleted_and_trained_into_again_in_one_process(table_path, tmp_path):
    """MLflow keeps a store object per URI for the process: a run folder removed and trained again (a notebook)
    must not meet the old one's missing folders."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    exp = _experiment(table_path, mlflow=True, epochs=1)
    fit(exp, out_dir=tmp_path / "run")
    shutil.rmtree(tmp_path / "run")
    fit(exp, out_dir=tmp_path / "run")
    [run] = _runs((tmp_path / "run" / "mlruns").as_uri())
    assert run.info.status == "FINISHED"


def test_runs_of_several_models_share_one_experiment(table_path, tmp_path):
    """How `plerec compare` logs: one store and experiment name, a run per model and seed."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    uri = (tmp_path / "store").as_uri()
    for name in ("ple", "mmoe"):
        model = {"name": name, "expert_dims": [4], "tower_dims": [4], "embedding_dim": 2}
        if name == "mmoe":
            model["num_experts"] = 2
        exp = _experiment(table_path, model=model, mlflow_uri=uri, mlflow_experiment="census")
        observer = MLflowObserver.for_run(exp, None, run_name=f"{name}/1", tags={"plerec.compare": "yes"})
        fit(exp, observers=[observer])  # no output folder: metrics and parameters, no files
    runs = _runs(uri, "census")
    assert [r.info.run_name for r in runs] == ["ple/1", "mmoe/1"]
    assert all(r.data.tags["plerec.compare"] == "yes" and r.info.status == "FINISHED" for r in runs)
    assert [r.data.params["model.name"] for r in runs] == ["ple", "mmoe"]
    assert not _client(uri).list_artifacts(runs[0].info.run_id)


def test_mlflow_without_output_folder_or_uri_says_what_to_set(table_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    with pytest.raises(ValueError, match="set train.mlflow_uri"):
        MLflowObserver.for_run(_experiment(table_path, mlflow=True), None)


def test_flat_params_are_the_resolved_experiment_in_dotted_keys(table_path):
    exp = _experiment(table_path)
    params = flat_params(exp)
    resolved = experiment_to_dict(exp)
    assert params["train.batch_size"] == "64" and params["seed"] == "0"
    assert params["tasks.0.label"] == resolved["tasks"][0]["label"] == "click"
    assert params["data.split"] == "[0.6, 0.2, 0.2]"
    assert len(params) == len(set(params))
    assert all(isinstance(v, str) for v in params.values())


def test_metric_names_mlflow_refuses_are_made_valid():
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric_name

    from plerec.tracking import _metric_key

    with pytest.raises(MlflowException, match="Names may only contain"):
        _validate_metric_name("valid/ctr+1/auc")
    for key in ("valid/ctr+1/auc", "train/loss/点击", "gate/L0.a-b/L0.shared0"):
        _validate_metric_name(_metric_key(key))
    assert _metric_key("valid/ctr+1/auc") == "valid/ctr_1/auc"
    assert _metric_key("gate/L0.a-b/L0.shared0") == "gate/L0.a-b/L0.shared0"


@needs_tensorboard
def test_the_single_task_baseline_writes_one_set_of_event_files_per_task(table_path, tmp_path):
    model = {"name": "single", "bottom_dims": [4], "tower_dims": [4], "embedding_dim": 2}
    fit(_experiment(table_path, model=model, tensorboard=True), out_dir=tmp_path)
    folders = sorted(p.parent.relative_to(tmp_path) for p in tmp_path.rglob("events.out.tfevents.*"))
    assert folders == [Path("tasks/click/tensorboard"), Path("tasks/watch/tensorboard")]
    for task in ("click", "watch"):
        scalars = _scalars(tmp_path / "tasks" / task / "tensorboard")
        assert [tag for tag in scalars if tag.startswith("train/loss/")] == [f"train/loss/{task}"]
        assert len(scalars[f"train/loss/{task}"]) == EPOCHS * STEPS


def test_compare_logs_one_run_per_model_seed_and_task_in_one_experiment(table_path, tmp_path):
    """`plerec compare` with [train] mlflow: one store (OUT/mlruns) and experiment, a named run per model and
    seed (the single-task baseline: per task), and no second run in each run's own folder."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from plerec.compare import compare

    exp = _experiment(table_path, mlflow=True, epochs=1)
    out = tmp_path / "cmp"
    compare(exp, ["single", "shared_bottom"], 2, out)
    runs = _runs((out / "mlruns").resolve().as_uri(), "compare cmp")
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(
        ["shared_bottom-seed0", "shared_bottom-seed1"]
        + [f"single-seed{s}-{task}" for s in (0, 1) for task in ("click", "watch")]
    )
    assert all(r.info.status == "FINISHED" and r.data.tags["plerec.compare"] == str(out.resolve()) for r in runs)
    assert not list((out / "runs").rglob("mlruns"))  # not also in each run's folder


def test_history_json_is_written_after_every_epoch(table_path, tmp_path):
    """A run that dies keeps its curves: at each epoch's end history.json already holds that epoch."""

    class ReadsHistory(RunObserver):
        def __init__(self):
            self.seen = []

        def epoch(self, run, record):
            held = json.loads((run.out / "history.json").read_text())
            self.seen.append([r["epoch"] for r in held["epochs"]])

    watcher = ReadsHistory()
    fit(_experiment(table_path, epochs=3), out_dir=tmp_path / "run", observers=[watcher])
    assert watcher.seen == [[1], [1, 2], [1, 2, 3]]
