"""Output paths: plerec replaces only a regular file or a new path, atomically and through a temporary
file that nobody can redirect; a full disk leaves the previous file and no debris; one trainer per folder."""

import builtins
import errno
import fcntl
import io
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import plerec
from plerec.checkpoint import read_checkpoint_file, write_checkpoint_file
from plerec.cli import main
from plerec.compare import write_experts_csv, write_results_csv
from plerec.config import load_experiment, write_experiment
from plerec.data.stream import save_encoder
from plerec.data.synth import SynthConfig, write_parquet
from plerec.export import export_model
from plerec.jsonio import write_json
from plerec.rank import write_ranked
from plerec.report.html import write_report
from plerec.report.plots import experts_plot
from plerec.train import fit, load_checkpoint

SRC = Path(plerec.__file__).parent

EXPERIMENT = """\
seed = 3

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
name = "mmoe"
embedding_dim = 2
expert_dims = [4]
tower_dims = [4]

[train]
epochs = EPOCHS
batch_size = 32
progress = false
"""


def _project(root: Path, epochs: int = 1, train_rows: int = 120, single: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for name, rows in (("train", train_rows), ("valid", 40), ("test", 40)):
        a, b = rng.normal(size=rows), rng.normal(size=rows)
        frame = pd.DataFrame({"a": a, "b": b, "cat": rng.choice(["x", "y"], rows)})
        frame["click"] = (a + rng.normal(size=rows) > 0).astype(int)
        frame["watch"] = 2 * b + rng.normal(size=rows)
        frame.to_csv(root / f"{name}.csv", index=False)
    text = EXPERIMENT.replace("EPOCHS", str(epochs))
    if single:  # the single-task baseline: one network per task, no experts
        text = text.replace('name = "mmoe"', 'name = "single"').replace("expert_dims = [4]\n", "")
    (root / "exp.toml").write_text(text)
    return root / "exp.toml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safe")
    assert main(["train", str(_project(root)), "--out", str(root / "run"), "--quiet"]) == 0
    return root


def _plant(kind: str, path: Path) -> Path:
    """A device node, a link to another file or a folder at `path`; returns the link's target."""
    victim = path.with_name("victim.txt")
    victim.write_text("victim")
    if kind == "device":
        try:  # the numbers of /dev/full: harmless even if something wrote to it
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 7))
        except PermissionError:
            os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(victim)
    else:
        path.mkdir()
    return victim


def _still(kind: str, path: Path, victim: Path) -> None:
    mode = os.lstat(path).st_mode
    if kind == "device":
        assert stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)
    elif kind == "symlink":
        assert stat.S_ISLNK(mode) and os.readlink(path) == str(victim)
    else:
        assert stat.S_ISDIR(mode) and not any(path.iterdir())
    assert victim.read_text() == "victim"
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]


WHAT = {"device": r"(a character device|a FIFO \(named pipe\))", "symlink": "a symbolic link", "folder": "a folder"}


@pytest.mark.parametrize("kind", ["device", "symlink", "folder"])
def test_evaluate_refuses_an_out_that_is_not_a_regular_file(trained, tmp_path, capsys, kind):
    target = tmp_path / "metrics.json"
    victim = _plant(kind, target)
    run = trained / "run"
    capsys.readouterr()
    code = main(["evaluate", str(trained / "exp.toml"), "--checkpoint", str(run / "best.pt"), "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert re.search(
        rf"Expected the output {re.escape(str(target))} to be a regular file or a new path, but it is {WHAT[kind]}: "
        "plerec never replaces one",
        err,
    ), err
    _still(kind, target, victim)


def _writers(trained: Path) -> dict:
    exp = load_experiment(trained / "run" / "experiment.toml")
    model, encoder, _ = load_checkpoint(trained / "run" / "best.pt")
    table = pd.DataFrame({"user": [1], "score": [0.5]})
    return {
        "write_json": lambda p: write_json(p, {"a": 1}),
        "write_checkpoint_file": lambda p: write_checkpoint_file(p, {"w": torch.zeros(2)}),
        "write_experiment": lambda p: write_experiment(exp, p),
        "write_ranked": lambda p: write_ranked(table, p),
        "write_parquet": lambda p: write_parquet(SynthConfig(rows=8, dim=2, num_sines=1), p),
        "write_report": lambda p: write_report(p, "title", "text", []),
        "write_results_csv": lambda p: write_results_csv([], p),
        "write_experts_csv": lambda p: write_experts_csv([], p),
        "experts_plot": lambda p: experts_plot([], p),
        "save_encoder": lambda p: save_encoder(encoder, p.parent),
        "export_model": lambda p: export_model(model, encoder, exp, "torchscript", p.with_suffix("")),
    }


TARGET = {"save_encoder": "encoder.json", "export_model": "out.json"}  # export: the sidecar is the node


WRITERS = [
    "write_json",
    "write_checkpoint_file",
    "write_experiment",
    "write_ranked",
    "write_parquet",
    "write_report",
    "write_results_csv",
    "write_experts_csv",
    "experts_plot",
    "save_encoder",
    "export_model",
]


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_refuses_a_device_node(trained, tmp_path, writer):
    write = _writers(trained)[writer]
    target = tmp_path / TARGET.get(writer, "out.csv")
    victim = _plant("device", target)
    with pytest.raises(ValueError, match=rf"Expected the output {re.escape(str(target))} to be a regular file"):
        write(target)
    _still("device", target, victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, victim.name])  # nothing else written
    fresh = tmp_path / "fresh" / target.name
    fresh.parent.mkdir()
    write(fresh)  # a new path
    write(fresh)  # a regular file
    assert fresh.is_file() and fresh.stat().st_size > 0
    assert not [p.name for p in fresh.parent.iterdir() if p.name.endswith(".tmp")]


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays


def _block_device(path: Path) -> None:
    try:  # the numbers of /dev/loop0; nothing opens it
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    except PermissionError:
        pytest.skip("making a block device needs root")


@pytest.mark.parametrize(
    ("make", "kind"),
    [(_fifo, "a FIFO (named pipe)"), (_socket, "a socket"), (_block_device, "a block device")],
    ids=["fifo", "socket", "block-device"],
)
def test_the_refusal_names_what_the_path_is(tmp_path, make, kind):
    target = tmp_path / "m.json"
    make(target)
    mode = os.lstat(target).st_mode
    with pytest.raises(
        ValueError,
        match=re.escape(f"Expected the output {target} to be a regular file or a new path, but it is {kind}"),
    ):
        write_json(target, {"a": 1})
    assert os.lstat(target).st_mode == mode
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


OLD_TEMP_NAMES = [".last.pt.tmp", ".best.pt.tmp", "metrics.json.tmp", "history.json.tmp"]


def test_a_link_planted_at_a_temporary_name_cannot_redirect_a_write(tmp_path, capsys):
    """Temporary files are created exclusively under names no one can guess; links there are left alone."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    for name in OLD_TEMP_NAMES:
        (out / name).symlink_to(victim)
    assert main(["train", str(_project(tmp_path)), "--out", str(out), "--quiet"]) == 0
    assert victim.read_text() == "victim"
    for name in OLD_TEMP_NAMES:
        assert (out / name).is_symlink() and os.readlink(out / name) == str(victim)
    assert read_checkpoint_file(out / "last.pt")["format"] == "plerec-training-state-1"
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == sorted(OLD_TEMP_NAMES)


def test_a_second_trainer_on_the_same_folder_is_refused_and_the_first_finishes(tmp_path, capsys):
    exp = _project(tmp_path, epochs=15, train_rows=600)
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "plerec", "train", str(exp), "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = out / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()):
            if first.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the first trainer took no lock on {out}")
            time.sleep(0.05)
        capsys.readouterr()
        assert main(["train", str(exp), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert first.poll() is None, "the first trainer ended before the second one tried"
        assert (
            f"plerec: error: {out} is in use by another plerec training (lock held on {lock}, pid {first.pid}): "
            "wait for it or choose another --out"
        ) in err
        _stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert (out / "metrics.json").is_file()
    # The lock file stays behind; the process that held it is gone, so it blocks nothing.
    assert main(["train", str(exp), "--out", str(out), "--quiet", "--resume"]) == 0


@pytest.mark.parametrize("held", [".", "tasks/click"])
def test_the_single_task_baseline_locks_its_folder_and_each_task_folder(tmp_path, capsys, held):
    exp = _project(tmp_path, single=True)
    out = tmp_path / "run"
    lock = out / held / ".lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as handle:  # another trainer, as the kernel sees it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        code = main(["train", str(exp), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"is in use by another plerec training (lock held on {lock}, pid {os.getpid()})" in err
    assert not (out / "metrics.json").exists()


def test_the_lock_is_released_when_training_fails(tmp_path):
    exp = _project(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(exp), "--out", str(out), "--quiet"]) == 0
    with pytest.raises(ValueError, match="already holds a training checkpoint") as refused:
        fit(load_experiment(exp), out_dir=out)
    assert refused.traceback  # the failed call's frames are still alive, and yet its lock is released
    with open(out / ".lock", "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


class _FullDisk:
    """A file on a disk with room for `room` more bytes: the write past it fails with ENOSPC, as write(2) does."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data):
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _full_disk(monkeypatch) -> None:
    real = io.open

    def full_open(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        return _FullDisk(handle, room=10) if any(c in mode for c in "wax+") else handle

    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr(builtins, "open", full_open)


FULL = {
    "last.pt": lambda p: write_checkpoint_file(p, {"w": torch.arange(1000.0)}),
    "experiment.toml": lambda p: write_experiment(load_experiment(p.parent.parent / "exp.toml"), p),
    "model.pt.json": lambda p: write_json(p, {"format": "sidecar", "names": list(range(100))}),
}


@pytest.mark.parametrize("previous", [True, False], ids=["replacing", "new"])
@pytest.mark.parametrize("name", list(FULL))
def test_a_full_disk_leaves_the_previous_file_and_no_temporary_file(tmp_path, monkeypatch, name, previous):
    _project(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    target = folder / name
    if previous:
        write_checkpoint_file(target, {"w": torch.zeros(3)}) if name == "last.pt" else target.write_text("old\n")
    before = target.read_bytes() if previous else None
    with monkeypatch.context() as m:
        _full_disk(m)
        with pytest.raises(OSError) as caught:
            FULL[name](target)
    assert caught.value.errno == errno.ENOSPC
    kept = f"the previous {name} is intact" if previous else f"no {name} was written"
    assert str(caught.value) == f"Could not write {target}: No space left on device; {kept}"
    assert sorted(p.name for p in folder.iterdir()) == ([name] if previous else [])
    if previous:
        assert target.read_bytes() == before


WRITES = re.compile(
    r"\.write_text\(|\.write_bytes\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']|os\.replace\(|os\.rename\(|\.to_parquet\("
    r"|\.to_csv\(|np\.savez|\.savefig\(|write_table\(|\bjit\.save\(|\.save\(str\("
)


def test_every_file_plerec_writes_goes_through_safe_io():
    """Writers hand `atomic_write` a callback on its temporary file (`handle`); nothing opens a target itself."""
    direct = [
        f"{path.relative_to(SRC)}:{i}: {line.strip()}"
        for path in SRC.rglob("*.py")
        if path.name != "safe_io.py"
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if WRITES.search(line) and "handle" not in line
    ]
    assert direct == []
