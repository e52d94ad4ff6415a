"""Faults: checkpoints, exact resumption (also after SIGKILL), non-finite stops, safe and verified loading."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from parquet_splits import write_splits

import plerec.train as train_module
from plerec.checkpoint import HEADER, read_checkpoint_file, write_checkpoint_file
from plerec.cli import main
from plerec.config import load_experiment
from plerec.train import NonFiniteError, fit, load_checkpoint


def _write(root: Path, train_rows: int) -> Path:
    return write_splits(root, train_rows, seed=3, epochs=3, ids=50, extra="checkpoint_every = 5")


@pytest.fixture
def experiment(tmp_path):
    return _write(tmp_path, 101)  # 13 steps per epoch; checkpoints at steps 5, 10, 15, … and epoch ends


class Crash(Exception):
    """Stands in for the process dying at a given step."""


def _crash_at(monkeypatch, step: int) -> None:
    """Make the run die at the start of optimiser step `step` (1-based): loss_weights runs once per step."""
    calls = {"n": 0}
    real = train_module.loss_weights

    def dying(exp, t):
        calls["n"] += 1
        if calls["n"] == step:
            raise Crash(f"killed at step {step}")
        return real(exp, t)

    monkeypatch.setattr(train_module, "loss_weights", dying)


def _assert_same_run(a, b) -> None:
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert a.metrics == b.metrics
    assert a.best_epoch == b.best_epoch
    timings = ("seconds", "epoch_seconds")
    strip = [{k: v for k, v in r.items() if k not in timings} for r in a.history]
    assert strip == [{k: v for k, v in r.items() if k not in timings} for r in b.history]


@pytest.mark.parametrize("streaming", [False, True])
# 13 steps per epoch, a checkpoint every 5 steps and at epoch ends: crashing at step 20 resumes from step 15
# (mid-epoch 2), at 26 from 25 (the last batch of epoch 2 still to do), at 27 from 26 (the end of epoch 2).
@pytest.mark.parametrize(("crash_step", "checkpoint_step"), [(20, 15), (26, 25), (27, 26)])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(
    experiment, tmp_path, monkeypatch, streaming, crash_step, checkpoint_step
):
    exp = load_experiment(experiment, [f"data.streaming={str(streaming).lower()}"])
    whole = fit(exp, out_dir=tmp_path / "whole")

    with monkeypatch.context() as patch:
        _crash_at(patch, crash_step)
        with pytest.raises(Crash):
            fit(exp, out_dir=tmp_path / "cut")
    saved = read_checkpoint_file(tmp_path / "cut" / "last.pt")["progress"]
    assert saved["step"] == checkpoint_step  # the steps since the last checkpoint were lost: they are redone
    resumed = fit(exp, out_dir=tmp_path / "cut", resume=True)

    _assert_same_run(whole, resumed)
    for name in ("metrics.json", "history.json"):
        a, b = (json.loads((tmp_path / run / name).read_text()) for run in ("whole", "cut"))
        if name == "metrics.json":
            a.pop("train_seconds"), b.pop("train_seconds")
        else:
            for record in a["epochs"] + b["epochs"]:
                record.pop("seconds"), record.pop("epoch_seconds")
        assert a == b
    best_a, best_b = (load_checkpoint(tmp_path / run / "best.pt")[0].state_dict() for run in ("whole", "cut"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_a_resumed_run_with_batch_norm_ends_like_an_uninterrupted_one(experiment, tmp_path, monkeypatch):
    # The norms' running estimates are buffers: a resume that restored the weights but not them (or counted
    # the batches again) would predict differently from the uninterrupted run.
    exp = load_experiment(experiment, ["data.streaming=false", 'model.batch_norm=["gates", "experts", "towers"]'])
    whole = fit(exp, out_dir=tmp_path / "whole")
    assert any(k.endswith("running_mean") for k in whole.model.state_dict())
    with monkeypatch.context() as patch:
        _crash_at(patch, 20)
        with pytest.raises(Crash):
            fit(exp, out_dir=tmp_path / "cut")
    _assert_same_run(whole, fit(exp, out_dir=tmp_path / "cut", resume=True))


def test_a_finished_run_can_be_extended_by_more_epochs(experiment, tmp_path):
    exp = load_experiment(experiment, ["data.streaming=false"])
    fit(exp, out_dir=tmp_path / "run")
    longer = load_experiment(experiment, ["data.streaming=false", "train.epochs=4"])
    extended = fit(longer, out_dir=tmp_path / "run", resume=True)
    assert len(extended.history) == 4
    _assert_same_run(fit(longer, out_dir=tmp_path / "fresh"), extended)


def test_resuming_with_a_changed_experiment_is_refused_naming_the_keys(experiment, tmp_path):
    exp = load_experiment(experiment)
    fit(exp, out_dir=tmp_path / "run")
    changed = load_experiment(experiment, ["train.lr=0.01", "model.expert_dims=[7]"])
    with pytest.raises(ValueError, match=r"train\.lr: 0\.001 -> 0\.01.*|model\.expert_dims: \[6\] -> \[7\]") as err:
        fit(changed, out_dir=tmp_path / "run", resume=True)
    assert "train.lr: 0.001 -> 0.01" in str(err.value) and "model.expert_dims: [6] -> [7]" in str(err.value)


def test_a_fresh_run_never_overwrites_a_checkpoint(experiment, tmp_path):
    exp = load_experiment(experiment)
    fit(exp, out_dir=tmp_path / "run")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a training checkpoint \(last\.pt\): pass --resume"):
        fit(exp, out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_resume_without_a_checkpoint_starts_afresh(experiment, tmp_path):
    exp = load_experiment(experiment)
    _assert_same_run(fit(exp, out_dir=tmp_path / "a", resume=True), fit(exp, out_dir=tmp_path / "b"))


# ---------------------------------------------------------------------------------------------
# SIGKILL at a random moment, then `plerec train --resume`


def _cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "plerec", *args], cwd=cwd, env=env, **kwargs)


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    path = _write(tmp_path, 3000)  # 375 steps per epoch
    common = ["--quiet", "--set", "train.epochs=2", "--set", "train.checkpoint_every=25"]
    whole = _cli(["train", str(path), "--out", str(tmp_path / "whole"), *common], tmp_path)
    assert whole.wait(timeout=300) == 0

    cut = tmp_path / "cut"
    victim = _cli(["train", str(path), "--out", str(cut), *common], tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        if (cut / "last.pt").exists():
            progress = read_checkpoint_file(cut / "last.pt")["progress"]
            if progress["epoch"] == 1 and progress["batch"] > 0:  # inside the second epoch
                break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed mid-epoch"
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert not (cut / "metrics.json").exists()

    resumed = _cli(["train", str(path), "--out", str(cut), *common, "--resume"], tmp_path, stderr=subprocess.PIPE)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    a, b = (load_checkpoint(tmp_path / run / "best.pt")[0].state_dict() for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    last_a, last_b = (read_checkpoint_file(tmp_path / run / "last.pt")["model"] for run in ("whole", "cut"))
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text())["tasks"] for run in ("whole", "cut")]
    assert metrics[0] == metrics[1]


# ---------------------------------------------------------------------------------------------
# Non-finite losses and gradients


def test_a_non_finite_loss_stops_the_run_naming_step_and_task(experiment, tmp_path, monkeypatch):
    exp = load_experiment(experiment, ["train.checkpoint_every=4"])
    calls = {"n": 0}
    real = train_module.masked_task_losses

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        return losses * torch.tensor([1.0, float("nan")]) if calls["n"] == 10 else losses

    monkeypatch.setattr(train_module, "masked_task_losses", poisoned)
    with pytest.raises(NonFiniteError, match=r"epoch 1, batch 10 of 13 \(step 10\): the loss of task `watch` = nan"):
        fit(exp, out_dir=tmp_path / "run")
    last = read_checkpoint_file(tmp_path / "run" / "last.pt")
    assert last["progress"]["step"] == 8  # the last good checkpoint, never one with NaN weights
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    model, _, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_gradient_stops_the_run_naming_the_parameter(experiment, tmp_path, monkeypatch):
    exp = load_experiment(experiment)
    real = train_module.build_model
    steps = {"n": 0}

    def hooked(*args, **kwargs):
        model = real(*args, **kwargs)
        weight = dict(model.named_parameters())["body.towers.mlp.weights.0"]

        def poison(grad):
            steps["n"] += 1
            return grad * float("inf") if steps["n"] == 3 else grad

        weight.register_hook(poison)
        return model

    monkeypatch.setattr(train_module, "build_model", hooked)
    with pytest.raises(
        NonFiniteError, match=r"step 3\): the gradient of `body\.towers\.mlp\.weights\.0`.*no checkpoint"
    ):
        fit(exp, out_dir=tmp_path / "run")


def test_the_cli_reports_a_diverging_run_and_exits_2(experiment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        train_module, "masked_task_losses", lambda *a, **k: torch.tensor([float("inf"), 0.5], requires_grad=True)
    )
    assert main(["train", str(experiment), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "plerec: error: Training stopped at epoch 1, batch 1 of 13 (step 1): the loss of task `click` = inf" in (
        capsys.readouterr().err
    )


# ---------------------------------------------------------------------------------------------
# Verified, safe loading


@pytest.fixture
def trained(experiment, tmp_path):
    fit(load_experiment(experiment), out_dir=tmp_path / "run")
    return tmp_path / "run"


def test_a_truncated_checkpoint_is_refused_with_a_clear_message(trained, experiment, capsys):
    best = trained / "best.pt"
    best.write_bytes(best.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"best\.pt is truncated or padded: its header announces \d+ bytes"):
        load_checkpoint(best)
    assert main(["evaluate", str(experiment), "--checkpoint", str(best)]) == 2
    assert "is truncated" in capsys.readouterr().err
    last = trained / "last.pt"
    last.write_bytes(last.read_bytes()[: HEADER.size + 10])
    with pytest.raises(ValueError, match=r"last\.pt is truncated"):
        fit(load_experiment(experiment), out_dir=trained, resume=True)


def test_a_corrupted_checkpoint_is_detected_by_its_checksum(trained):
    best = trained / "best.pt"
    raw = bytearray(best.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the weights
    best.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"best\.pt is corrupted: the SHA-256 checksum"):
        load_checkpoint(best)


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    write_checkpoint_file(tmp_path / "evil.pt", {"format": "plerec-checkpoint-1", "state_dict": Payload()})
    raw = (tmp_path / "evil.pt").read_bytes()  # a well-formed file: its checksum matches, so only the
    _, length, digest = HEADER.unpack_from(raw)  # weights-only reader stands between it and the code
    assert length == len(raw) - HEADER.size and hashlib.sha256(raw[HEADER.size :]).digest() == digest
    with pytest.raises(ValueError, match=r"evil\.pt could not be read safely \(weights only\)"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_files_that_are_not_plerec_checkpoints_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt to be a plerec checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_the_described_model_are_refused(trained, tmp_path):
    payload = read_checkpoint_file(trained / "best.pt")
    payload["state_dict"].pop("body.towers.mlp.weights.0")
    payload["state_dict"]["input.embedding.weight"] = torch.zeros(3, 3)
    write_checkpoint_file(tmp_path / "edited.pt", payload)
    with pytest.raises(
        ValueError, match=r"do not fit the model.*missing body\.towers\.mlp\.weights\.0.*shape \(3, 3\)"
    ):
        load_checkpoint(tmp_path / "edited.pt")


def test_evaluate_refuses_a_checkpoint_of_another_model_or_schema(trained, experiment, capsys):
    args = ["evaluate", str(experiment), "--checkpoint", str(trained / "best.pt")]
    assert main([*args, "--set", "model.name=mmoe", "--set", 'features.numeric=["f0"]']) == 2
    err = capsys.readouterr().err
    assert "holds a `ple` model" in err and "describes `mmoe`" in err and "experiment.toml" in err
    assert "model.name: 'ple' -> 'mmoe'" in err and "features.numeric: ['f*'] -> ['f0']" in err
    assert main(args) == 0


def test_evaluate_takes_a_checkpoint_whose_weights_began_from_another_initialisation(trained, experiment, capsys):
    """How the weights were initialised does not decide what the checkpoint scores (its weights replace them)."""
    args = ["evaluate", str(experiment), "--checkpoint", str(trained / "best.pt")]
    assert main([*args, "--set", 'model.dense_init="he"', "--set", "model.embedding_init_std=0.01"]) == 0
    assert "differs" not in capsys.readouterr().err
