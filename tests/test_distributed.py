"""DDP on CPU with gloo (2 processes under torchrun) against one process; streaming Parquet input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from parquet_splits import frame, write_splits

from plerec.checkpoint import read_checkpoint_file
from plerec.cli import main
from plerec.config import experiment_from_dict, load_experiment
from plerec.data.batches import InMemoryBatches
from plerec.data.fitter import fit_encoder_chunked
from plerec.data.stream import ParquetBatches, local_eval_chunks, row_groups
from plerec.data.tables import EncodedTable
from plerec.distributed import DistContext, check_batch_size, init_distributed, shard_bounds
from plerec.train import evaluate_split, fit, load_checkpoint, prepare_data


@pytest.fixture
def experiment(tmp_path):
    return write_splits(tmp_path, 101)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("sparse", [False, True])
def test_ddp_parameters_equal_one_process_on_the_same_global_batches(experiment, tmp_path, sparse):
    overrides = [f"train.sparse_embeddings={str(sparse).lower()}"]
    _torchrun(
        ["-m", "plerec", "train", str(experiment), "--out", str(tmp_path / "ddp"), "--quiet"]
        + [arg for o in overrides for arg in ("--set", o)],
        tmp_path,
    )
    single = fit(load_experiment(experiment, overrides), ctx=DistContext())
    # The checkpoint holds the unwrapped model and loads in a single process.
    ddp_model, _, ddp_exp = load_checkpoint(tmp_path / "ddp" / "best.pt")
    assert ddp_exp.train.batch_size == 8
    ddp_state, single_state = ddp_model.state_dict(), single.model.state_dict()
    assert set(ddp_state) == set(single_state)
    moved = 0.0
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-5, atol=1e-5, msg=key)
    # and training really moved the weights (a test that cannot fail proves nothing)
    fresh = fit(load_experiment(experiment, [*overrides, "train.lr=1e-9"]), ctx=DistContext()).model.state_dict()
    moved = max((fresh[k] - single_state[k]).abs().max().item() for k in fresh)
    assert moved > 1e-3
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["tasks"]["click"]["n"] == 41  # every test row once
    # The logged training loss is the global one, not rank 0's share of it.
    ddp_history = json.loads((tmp_path / "ddp" / "history.json").read_text())["epochs"]
    assert len(ddp_history) == len(single.history)
    for ddp_epoch, one_epoch in zip(ddp_history, single.history, strict=True):
        for task, value in one_epoch["train_loss"].items():
            assert ddp_epoch["train_loss"][task] == pytest.approx(value, rel=1e-5), task


@pytest.mark.parametrize("streaming", [False, True])
def test_a_ddp_run_resumed_under_torchrun_equals_an_uninterrupted_one(experiment, tmp_path, streaming):
    """Two epochs straight against one epoch, then `--resume` with epochs = 2: both under 2 gloo ranks."""
    common = ["-m", "plerec", "train", str(experiment), "--quiet", "--set", f"data.streaming={str(streaming).lower()}"]
    _torchrun([*common, "--out", str(tmp_path / "whole")], tmp_path)
    _torchrun([*common, "--out", str(tmp_path / "cut"), "--set", "train.epochs=1"], tmp_path)
    first = read_checkpoint_file(tmp_path / "cut" / "last.pt")["progress"]
    assert (first["epoch"], first["step"]) == (1, 13)  # 101 rows, global batch 8
    _torchrun([*common, "--out", str(tmp_path / "cut"), "--resume"], tmp_path)
    whole, cut = (read_checkpoint_file(tmp_path / run / "last.pt") for run in ("whole", "cut"))
    assert cut["progress"]["step"] == whole["progress"]["step"] == 26
    for key, value in whole["model"].items():
        assert torch.equal(cut["model"][key], value), key
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text())["tasks"] for run in ("whole", "cut"))
    assert a == b


EVAL_SCRIPT = """
import json, sys
from plerec.config import load_experiment
from plerec.distributed import init_distributed, shutdown
from plerec.train import evaluate_split, load_checkpoint, prepare_data
exp = load_experiment(sys.argv[1], sys.argv[4:])
model, encoder, _ = load_checkpoint(sys.argv[2])
ctx = init_distributed("cpu")
data = prepare_data(exp, encoder)
out = {{split: evaluate_split(model, data, split, exp, ctx) for split in ("valid", "test")}}
if ctx.is_main:
    open(sys.argv[3], "w").write(json.dumps(out))
shutdown(ctx)
"""


@pytest.mark.parametrize("streaming", [False, True])
def test_distributed_evaluation_equals_single_process(experiment, tmp_path, streaming):
    assert main(["train", str(experiment), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    checkpoint = tmp_path / "one" / "best.pt"
    script = tmp_path / "eval.py"
    script.write_text(textwrap.dedent(EVAL_SCRIPT.format()))
    overrides = [f"data.streaming={str(streaming).lower()}", "train.eval_batch_size=5"]
    _torchrun([str(script), str(experiment), str(checkpoint), str(tmp_path / "ddp.json"), *overrides], tmp_path)
    distributed = json.loads((tmp_path / "ddp.json").read_text())
    exp = load_experiment(experiment, overrides)
    model, encoder, _ = load_checkpoint(checkpoint)
    data = prepare_data(exp, encoder)
    for split, rows in (("valid", 33), ("test", 41)):
        metrics, n = evaluate_split(model, data, split, exp)
        d_metrics, d_n = distributed[split]
        assert n == d_n == rows  # every row counted once, no padded duplicates
        for task, values in metrics.items():
            assert d_metrics[task]["n"] == values["n"]
            for key, value in values.items():
                assert d_metrics[task][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (split, task, key)


def test_shards_are_disjoint_and_cover_every_row():
    for n in (0, 1, 7, 33):
        bounds = shard_bounds(n, DistContext(rank=0, world_size=3))
        covered = [i for start, stop in bounds for i in range(start, stop)]
        assert covered == list(range(n))


def test_in_memory_batches_follow_the_seeded_permutation_and_ranks_split_each_batch():
    """An epoch is the generator's int64 permutation cut into global batches (the order checkpoints written
    by earlier versions replay), each cut into one contiguous slice per rank."""
    n, batch_size = 23, 6
    ids = torch.arange(n, dtype=torch.int32).unsqueeze(1)
    table = EncodedTable(ids, torch.zeros(n, 1), torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool))
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(5))  # int64, as before
    one = [b.sparse[:, 0] for b in InMemoryBatches(table, batch_size, seed=5).epoch()]
    assert torch.equal(torch.cat(one).long(), expected)
    assert [len(b) for b in one] == [6, 6, 6, 5]
    ranks = [list(InMemoryBatches(table, batch_size, 5, DistContext(rank=r, world_size=2)).epoch()) for r in (0, 1)]
    for step, whole in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][step].sparse[:, 0], ranks[1][step].sparse[:, 0]]), whole)


def test_streaming_batches_read_each_row_once_and_ranks_are_disjoint(experiment):
    exp = load_experiment(experiment, ["data.streaming=true"])
    encoder = fit_encoder_chunked(exp, exp.data.train)
    groups = row_groups([Path(exp.data.train)])
    assert [g.num_rows for g in groups] == [17] * 5 + [16]
    # One process: every row exactly once per epoch, the order reshuffled between epochs.
    source = ParquetBatches(exp.data.train, encoder, 8, seed=0)
    first = torch.cat([b.dense[:, 0] for b in source.epoch()])
    second = torch.cat([b.dense[:, 0] for b in source.epoch()])
    everything = torch.cat([chunk.dense[:, 0] for chunk in local_eval_chunks(exp.data.train, encoder)])
    assert sorted(first.tolist()) == sorted(everything.tolist()) == sorted(second.tolist())
    assert first.tolist() != second.tolist()
    # Two and four ranks: disjoint rows that add up to every row, the same number of steps on every
    # rank (a rank that runs out takes empty steps), at most batch / world rows per step.
    for world in (2, 4):
        seen, steps = [], set()
        for rank in range(world):
            ctx = DistContext(rank=rank, world_size=world)
            ranked = ParquetBatches(exp.data.train, encoder, 8, seed=0, ctx=ctx)
            batches = list(ranked.epoch())
            steps.add(len(batches))
            assert len(batches) == ranked.steps(0)
            assert all(len(b) <= 8 // world for b in batches)
            seen.append([v for b in batches for v in b.dense[:, 0].tolist()])
        assert len(steps) == 1
        assert sorted(v for part in seen for v in part) == sorted(everything.tolist())


def test_streaming_batches_are_each_group_shuffled_then_cut_whatever_the_read_slice(experiment, monkeypatch):
    """An epoch's batches are: the row groups in the epoch's order, each group's rows permuted by its own
    generator, all concatenated and cut into batches. Row groups are read and encoded a slice at a time
    (here 5 rows of groups of 16–17) and batches are gathered across groups: neither may change a batch."""
    import numpy as np
    import pyarrow.parquet as pq

    from plerec.data import stream

    exp = load_experiment(experiment, ["data.streaming=true"])
    encoder = fit_encoder_chunked(exp, exp.data.train)
    monkeypatch.setattr(stream, "SLICE_ROWS", 5)
    source = ParquetBatches(exp.data.train, encoder, 8, seed=3)
    for epoch in range(2):
        got = list(source.epoch())
        parts = []
        for position, group in source._assignment(epoch)[0]:
            frame = pq.ParquetFile(group.file).read_row_group(group.index).to_pandas()
            table = encoder.transform(frame)
            order = np.random.default_rng([3, epoch, position]).permutation(len(table))
            parts.append(table.batch(torch.from_numpy(order)))
        expected = [torch.cat([getattr(p, f) for p in parts]) for f in ("sparse", "dense", "labels", "label_mask")]
        assert sum(len(b) for b in got) == len(expected[0]) == 101
        assert [len(b) for b in got] == [8] * 12 + [5]
        for name, column in zip(("sparse", "dense", "labels", "label_mask"), expected, strict=True):
            assert torch.equal(torch.cat([getattr(b, name) for b in got]), column), name
    # evaluation chunks are the slices, every row once in file order
    chunks = list(local_eval_chunks(exp.data.train, encoder))
    assert max(len(c) for c in chunks) == 5
    whole = encoder.transform(pq.read_table(exp.data.train).to_pandas())
    assert torch.equal(torch.cat([c.dense for c in chunks]), whole.dense)


def test_streaming_encoder_equals_in_memory_encoder(experiment):
    exp = load_experiment(experiment)
    in_memory = prepare_data(exp).encoder
    streamed = fit_encoder_chunked(exp, exp.data.train)
    assert streamed.vocabs == in_memory.vocabs
    for col in in_memory.means:
        assert streamed.means[col] == pytest.approx(in_memory.means[col], rel=1e-12)
        assert streamed.stds[col] == pytest.approx(in_memory.stds[col], rel=1e-12)


def test_prepare_then_train_reuses_the_vocabularies(experiment, tmp_path, capsys):
    assert main(["prepare", str(experiment), "--out", str(tmp_path / "prep"), "--set", "data.streaming=true"]) == 0
    assert (tmp_path / "prep" / "encoder.json").exists()
    saved = json.loads((tmp_path / "prep" / "encoder.json").read_text())
    code = main(
        ["train", str(experiment), "--out", str(tmp_path / "run"), "--quiet"]
        + ["--set", "data.streaming=true", "--set", f"data.prepared={tmp_path / 'prep'}"]
    )
    assert code == 0
    _, encoder, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    assert encoder.vocabs == saved["vocabs"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tasks"]["click"]["n"] == 41


def test_streaming_training_matches_in_memory_metrics_shape(experiment):
    exp = load_experiment(experiment, ["data.streaming=true"])
    result = fit(exp, ctx=DistContext())
    assert set(result.metrics) == {"valid", "test"}
    assert result.metrics["valid"]["click"]["n"] == 33


def test_world_size_must_divide_the_batch_size():
    with pytest.raises(ValueError, match=r"batch_size \(10\) to be divisible by the world size \(3\)"):
        check_batch_size(10, DistContext(rank=0, world_size=3))
    assert check_batch_size(12, DistContext(rank=1, world_size=3)) == 4


def test_missing_rendezvous_variable_is_named():
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "29500"}
    with pytest.raises(ValueError, match="rendezvous variable\\(s\\) MASTER_ADDR are not set"):
        init_distributed("cpu", env=env)
    assert not init_distributed("cpu", env={}).enabled


def test_a_rank_of_the_command_ends_by_os_exit_with_its_code_and_a_lone_process_returns(monkeypatch, capsys):
    """gloo's threads outlive the process group once DDP has wrapped a model, and the interpreter's teardown
    under them aborted a finished rank now and then (SIGABRT in the sparse DDP test): a process that joined a
    group ends with `os._exit(code)`, its output flushed; any other returns the code as before."""
    import plerec.cli
    import plerec.distributed as distributed

    ended = []
    monkeypatch.setattr(plerec.cli.os, "_exit", ended.append)
    assert main([]) == 2  # no command: the help, exit status 2
    assert ended == []  # no group joined: main returns
    monkeypatch.setattr(distributed, "_joined", True)
    main([])
    assert ended == [2]
    assert "usage: plerec" in capsys.readouterr().out


def test_joining_a_process_group_is_what_makes_a_process_end_by_os_exit(monkeypatch):
    import plerec.distributed as distributed

    monkeypatch.setattr(distributed, "_joined", False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    backends = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: backends.append(backend))
    init_distributed("cpu", env={})  # one process: no group
    assert not distributed.joined()
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert init_distributed("cpu", env=env).rank == 1
    assert backends == ["gloo"]
    assert distributed.joined()


def test_parquet_folder_with_disagreeing_schemas_is_an_error(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    rng = np.random.default_rng(1)
    frame(10, rng).to_parquet(folder / "a.parquet")
    other = frame(10, rng)
    other["c0"] = other["c0"].astype(str)
    other.to_parquet(folder / "b.parquet")
    with pytest.raises(
        ValueError, match=r"disagree on schema: .*b.parquet differs from .*a.parquet.*`c0` (large_)?string vs int64"
    ):
        row_groups(sorted(folder.glob("*.parquet")))
    extra = frame(10, rng).assign(extra=1.0)
    extra.to_parquet(folder / "b.parquet")
    with pytest.raises(ValueError, match=r"only in b.parquet: \['extra'\]"):
        row_groups(sorted(folder.glob("*.parquet")))


def test_streaming_needs_separate_files():
    with pytest.raises(ValueError, match="streaming = true to read separate `train` and `valid`"):
        experiment_from_dict(
            {
                "data": {"path": "x.parquet", "streaming": True},
                "features": {"numeric": ["f0"]},
                "tasks": [{"name": "a", "kind": "binary", "label": "a"}],
            }
        )
