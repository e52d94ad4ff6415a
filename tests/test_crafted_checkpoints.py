"""Crafted checkpoints and prepared encoders: files with a valid checksum whose experiment or encoder describes a
model too large to build, or that lack a key. Each is refused with one line naming the file, within a second
and a few MiB, before anything is allocated; the measured cases run in a subprocess with a capped address space,
so that a regression fails the test instead of exhausting the machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from plerec import train
from plerec.checkpoint import read_checkpoint, read_checkpoint_file, write_checkpoint_file
from plerec.cli import main
from plerec.config import experiment_from_dict, experiment_to_dict
from plerec.data.encode import Encoder
from plerec.data.stream import load_encoder
from plerec.models import build_model
from plerec.train import load_checkpoint

RAW = {
    "data": {"train": "train.csv", "valid": "valid.csv"},
    "features": {"categorical": ["cat"], "numeric": ["a"]},
    "tasks": [
        {"name": "click", "kind": "binary", "label": "click"},
        {"name": "watch", "kind": "regression", "label": "watch"},
    ],
    "model": {"name": "ple", "embedding_dim": 3, "expert_dims": [4], "tower_dims": [4]},
}
TOML = """\
[data]
train = "train.csv"
valid = "valid.csv"

[features]
categorical = ["cat"]
numeric = ["a"]

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
embedding_dim = 3
expert_dims = [4]
tower_dims = [4]
"""


def _parts() -> tuple[dict, dict, dict]:
    exp = experiment_from_dict(RAW)
    encoder = Encoder(
        categorical=["cat"],
        numeric=["a"],
        vocabs={"cat": ["x", "y", "z"]},
        means={"a": 0.0},
        stds={"a": 1.0},
        tasks=[
            {"name": t.name, "kind": t.kind, "label": t.label, "condition": "", "space": "present"} for t in exp.tasks
        ],
    )
    model = build_model(exp.model_name, exp.model, encoder.vocab_sizes, len(encoder.dense_names), len(exp.tasks))
    return experiment_to_dict(exp), encoder.state_dict(), model.state_dict()


def model_payload() -> dict:
    experiment, encoder, weights = _parts()
    return {
        "format": train.CHECKPOINT_FORMAT,
        "model_name": "ple",
        "experiment": experiment,
        "encoder": encoder,
        "state_dict": weights,
        "epoch": 1,
    }


def state_payload() -> dict:
    experiment, encoder, weights = _parts()
    return {
        "format": train.STATE_FORMAT,
        "experiment": experiment,
        "encoder": encoder,
        "model": weights,
        "optimizers": [],
        "best_state": None,
        "progress": {},
        "running": torch.zeros(2),
        "source": {},
        "rng": torch.get_rng_state(),
    }


def huge_vocabulary(p: dict) -> None:
    p["encoder"]["hash_buckets"] = {"cat": 2**31 - 1}  # 2^31 rows x 3: 24 GiB of float32


def huge_width(p: dict) -> None:
    p["experiment"]["model"]["embedding_dim"] = 2**33  # 17 TB per row block


def huge_level_count(p: dict) -> None:
    p["experiment"]["model"]["num_levels"] = 10**6


def more_than_the_file_holds(p: dict) -> None:
    p["encoder"]["hash_buckets"] = {"cat": 2**26}  # 768 MiB of embeddings, within the limits, in a small file


CRAFTED = {
    "huge_vocabulary": (huge_vocabulary, r"at most 4294967296 parameters"),
    "huge_width": (huge_width, r"`embedding_dim` to hold integers of at most 65536"),
    "huge_level_count": (huge_level_count, r"`num_levels` to hold integers of at most 64"),
    "more_than_the_file_holds": (more_than_the_file_holds, r"cannot hold the model .* but the file holds \d+ bytes"),
    "missing_key": (lambda p: p.pop("encoder"), r"incomplete: its key `encoder` is missing"),
}


def crafted(tmp_path: Path, case: str, payload=model_payload) -> Path:
    p = payload()
    CRAFTED[case][0](p)
    path = tmp_path / f"{case}.pt"
    write_checkpoint_file(path, p)
    return path


def test_an_uncrafted_checkpoint_and_training_state_load(tmp_path):
    for name, payload in (("best.pt", model_payload), ("last.pt", state_payload)):
        write_checkpoint_file(tmp_path / name, payload())
        model, encoder, exp = load_checkpoint(tmp_path / name)
        assert encoder.vocab_sizes == [4] and [t.name for t in exp.tasks] == ["click", "watch"]
        assert model(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1)).shape == (2, 2)


MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    from plerec.train import load_checkpoint
    from plerec.checkpoint import read_checkpoint_file
    load_checkpoint(sys.argv[1])  # warm: every import and first-call cost paid before measuring
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + 2**31, hard))  # a regression fails, it cannot swamp the host
    results = {}
    for path in sys.argv[2:]:
        for read in (load_checkpoint, read_checkpoint_file):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            try:
                read(path)
                outcome = "loaded"
            except Exception as err:
                outcome = f"{type(err).__name__}: {err}"
            seconds = time.perf_counter() - start
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
            results[f"{path} {read.__name__}"] = [outcome, seconds, grown]
    print(json.dumps(results))
    """
)


def test_crafted_files_are_refused_quickly_in_little_memory(tmp_path):
    write_checkpoint_file(tmp_path / "good.pt", model_payload())
    paths = {}
    for kind, payload in (("checkpoint", model_payload), ("state", state_payload)):
        (tmp_path / kind).mkdir()
        paths.update({(kind, case): crafted(tmp_path / kind, case, payload) for case in CRAFTED})
    run = subprocess.run(  # one process for all: importing torch takes seconds on a busy machine
        [sys.executable, "-c", MEASURE, str(tmp_path / "good.pt"), *map(str, paths.values())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    for case, path in paths.items():
        for reader in ("load_checkpoint", "read_checkpoint_file"):
            outcome, seconds, grown = results[f"{path} {reader}"]
            assert outcome.startswith("ValueError: "), (case, reader, outcome)
            assert str(path) in outcome and "\n" not in outcome, (case, outcome)
            assert seconds < 1.0, (case, reader, seconds)
            assert grown < 8 * 2**20, (case, reader, grown)


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_each_crafted_checkpoint_names_its_problem(tmp_path, case):
    path = crafted(tmp_path, case)
    with pytest.raises(ValueError, match=CRAFTED[case][1]):
        load_checkpoint(path)


@pytest.mark.parametrize("key", ["format", "model_name", "experiment", "encoder", "state_dict"])
def test_every_missing_key_is_named(tmp_path, key):
    p = model_payload()
    del p[key]
    write_checkpoint_file(tmp_path / "cut.pt", p)
    with pytest.raises(ValueError, match=rf"cut\.pt.*`{key}`"):
        load_checkpoint(tmp_path / "cut.pt")


@pytest.mark.parametrize("key", ["experiment", "encoder", "model", "optimizers", "progress", "running", "rng"])
def test_every_missing_key_of_a_training_state_is_named(tmp_path, key):
    p = state_payload()
    del p[key]
    write_checkpoint_file(tmp_path / "last.pt", p)
    with pytest.raises(ValueError, match=rf"last\.pt is incomplete: its key `{key}` is missing"):
        read_checkpoint_file(tmp_path / "last.pt")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.update(state_dict=[]), r"key `state_dict` of checkpoint .* to be dict, but got list"),
        (lambda p: p.update(experiment="ple"), r"key `experiment` of checkpoint .* to be dict, but got str"),
        (lambda p: p.update(model_name="mmoe"), r"`model_name` .* experiment's model 'ple', but got 'mmoe'"),
        (lambda p: p["experiment"].pop("tasks"), r"key `experiment`: Expected a \[tasks\] section"),
        (lambda p: p["encoder"].pop("categorical"), r"key `encoder`: .* key `categorical`, but it is missing"),
        (lambda p: p["encoder"]["vocabs"].pop("cat"), r"key `encoder`: .* `vocabs` to hold a list for .* `cat`"),
        (lambda p: p["encoder"].update(hash_buckets={"cat": 2**40}), r"`hash_buckets` `cat` .* \[1, 2\^31\)"),
        (lambda p: p["encoder"]["stds"].update(a=float("nan")), r"`stds` of the numeric column `a`"),
        (
            lambda p: p["state_dict"].update(output_scale=torch.ones(2, dtype=torch.float64)),
            r"key `state_dict`\) do not fit .* output_scale has dtype torch.float64, expected torch.float32",
        ),
        (
            lambda p: p["state_dict"].update({"input.embedding.weight": torch.zeros(9, 3)}),
            r"input\.embedding\.weight has shape \(9, 3\), expected \(4, 3\)",
        ),
        (lambda p: p["state_dict"].update(extra=torch.zeros(1)), r"unexpected 'extra'"),
        (lambda p: p["state_dict"].update(output_shift=[0.0, 0.0]), r"output_shift is a list, expected a dense"),
    ],
)
def test_mistyped_keys_and_weights_are_named(tmp_path, edit, message):
    p = model_payload()
    edit(p)
    write_checkpoint_file(tmp_path / "edited.pt", p)
    with pytest.raises(ValueError, match=message):
        read_checkpoint(tmp_path / "edited.pt")


def test_a_bad_best_state_in_a_training_state_is_refused(tmp_path):
    p = state_payload()
    p["best_state"] = {**p["model"], "output_scale": torch.zeros(7)}
    write_checkpoint_file(tmp_path / "last.pt", p)
    with pytest.raises(ValueError, match=r"key `best_state`\) do not fit .* output_scale has shape \(7,\)"):
        read_checkpoint_file(tmp_path / "last.pt")


@pytest.mark.parametrize("case", ["huge_width", "missing_key", "more_than_the_file_holds"])
def test_export_and_evaluate_exit_2_with_one_line(tmp_path, capsys, case):
    path = crafted(tmp_path, case)
    (tmp_path / "exp.toml").write_text(TOML)
    for argv in (
        ["export", str(path), "--format", "torchscript", "--out", str(tmp_path / "model.pt")],
        ["evaluate", str(tmp_path / "exp.toml"), "--checkpoint", str(path)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("plerec: error: ") and err.count("\n") == 1 and str(path) in err, err
    assert not (tmp_path / "model.pt").exists()


def test_train_resume_refuses_a_crafted_training_state(tmp_path, capsys):
    (tmp_path / "exp.toml").write_text(TOML)
    (tmp_path / "run").mkdir()
    p = state_payload()
    huge_vocabulary(p)
    write_checkpoint_file(tmp_path / "run" / "last.pt", p)
    assert main(["train", str(tmp_path / "exp.toml"), "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.pt describes a model that cannot be built" in err, err


def _prepared(tmp_path: Path, state) -> Path:
    folder = tmp_path / "prepared"
    folder.mkdir(exist_ok=True)
    (folder / "encoder.json").write_text(state if isinstance(state, str) else json.dumps(state))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["hash_buckets"].update(cat=2**31 - 1), r"encoder\.json describes a model that cannot be built"),
        (lambda s: s.pop("tasks"), r"encoder\.json is not valid: .* key `tasks`, but it is missing"),
        (lambda s: s.update(categorical="cat"), r"encoder\.json is not valid: .* `categorical` to be a list"),
    ],
)
def test_a_crafted_prepared_encoder_is_refused(tmp_path, edit, message):
    exp = experiment_from_dict(RAW)
    state = _parts()[1]
    edit(state)
    with pytest.raises(ValueError, match=message):
        load_encoder(_prepared(tmp_path, state), exp)


def test_a_deeply_nested_prepared_encoder_is_one_error(tmp_path):
    folder = _prepared(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"encoder\.json is not valid: its values are nested too deeply"):
        load_encoder(folder, experiment_from_dict(RAW))
