"""Runs remember what they were computed from (compare reruns, --resume refuses), and data that cannot be
read as written is an error naming the file: short CSV rows, empty numeric columns, broken gzip and Parquet."""

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plerec.cli import main
from plerec.compare import compare
from plerec.config import CsvOptions, load_experiment
from plerec.data.synth import SynthConfig, write_parquet
from plerec.data.table import read_table
from plerec.rank import write_ranked
from plerec.train import fit

EXPERIMENT = """
seed = 0
[data]
{data}
[features]
numeric = ["f0", "f1"]
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
num_experts = 2
expert_dims = [4]
tower_dims = [3]
[train]
epochs = 2
batch_size = 32
progress = false
[rank]
group = "user"
item = "item"
"""


def _frame(rows: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 2))
    return pd.DataFrame(
        {
            "f0": x[:, 0],
            "f1": x[:, 1],
            "cat": rng.choice(["a", "b", "c"], size=rows),
            "click": (x[:, 0] + rng.normal(size=rows) > 0).astype(int),
            "watch": 2 * x[:, 1] + rng.normal(scale=0.1, size=rows),
            "user": rng.integers(0, 5, rows),
            "item": np.arange(rows),
        }
    )


def _experiment(root: Path, **data: str) -> Path:
    """exp.toml over `path` (one file cut 60/20/20) or over `train` and `valid` files."""
    lines = [f'{key} = "{value}"' for key, value in data.items()]
    if "path" in data:
        lines.append("split = [0.6, 0.2, 0.2]")
    path = root / "exp.toml"
    path.write_text(EXPERIMENT.format(data="\n".join(lines)))
    return path


def _cli_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("plerec: error: "), err
    return err[0]


# --- compare: a rerun with another experiment or other data trains again ------------------------------


@pytest.fixture
def csv_experiment(tmp_path):
    _frame().to_csv(tmp_path / "log.csv", index=False)
    return _experiment(tmp_path, path=str(tmp_path / "log.csv"))


def _results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").sort_values(["model", "seed", "task", "metric", "split"], ignore_index=True)


def test_compare_rerun_with_a_changed_lr_trains_again_and_results_follow(csv_experiment, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", str(csv_experiment), "--models", "mmoe", "--seeds", "1", "--out", str(out)]
    assert main(argv) == 0
    first = _results(out)
    capsys.readouterr()

    assert main([*argv, "--set", "train.lr=0.05"]) == 0
    log = capsys.readouterr().err
    for name in ("single", "mmoe"):
        assert f"{name} seed 0: the experiment or data changed since it ran (train.lr: 0.001 -> 0.05), training" in log
    assert "already done" not in log
    assert "resumed from" not in log  # the old checkpoints were set aside, not continued
    assert (out / "runs" / "single" / "seed0.previous" / "tasks" / "click" / "last.pt").exists()
    again = _results(out)

    fresh = tmp_path / "fresh"
    assert main([*argv[:-1], str(fresh), "--set", "train.lr=0.05"]) == 0
    assert not again["value"].equals(first["value"])
    pd.testing.assert_frame_equal(again, _results(fresh))  # exactly what a comparison at lr = 0.05 gives

    capsys.readouterr()
    assert main([*argv, "--set", "train.lr=0.05"]) == 0  # and now nothing changed: nothing is retrained
    log = capsys.readouterr().err
    assert "mmoe seed 0: already done, skipped" in log and "single seed 0: already done, skipped" in log


def test_compare_trains_again_when_the_data_changed(tmp_path):
    _frame().to_csv(tmp_path / "log.csv", index=False)
    exp = load_experiment(_experiment(tmp_path, path=str(tmp_path / "log.csv")))
    compare(exp, ["mmoe"], 1, tmp_path / "cmp")
    _frame(seed=1).to_csv(tmp_path / "log.csv", index=False)  # same columns and rows, other values
    said = []
    compare(exp, ["mmoe"], 1, tmp_path / "cmp", log=said.append)
    changed = [m for m in said if "changed since it ran" in m]
    assert len(changed) == 2, said
    assert f"data file {tmp_path / 'log.csv'}: " in changed[1]


def test_a_run_without_a_fingerprint_or_interrupted_under_another_experiment_starts_afresh(csv_experiment, tmp_path):
    exp = load_experiment(csv_experiment)
    out = tmp_path / "cmp"
    compare(exp, ["mmoe"], 1, out)
    run = out / "runs" / "mmoe" / "seed0"
    record = json.loads((run / "run.json").read_text())
    del record["fingerprint"]  # as written by an older plerec
    (run / "run.json").write_text(json.dumps(record))
    (run / "fingerprint.json").unlink()
    said = []
    compare(exp, ["mmoe"], 1, out, log=said.append)
    assert any("mmoe seed 0: the experiment or data changed" in m and "older plerec" in m for m in said), said

    (run / "run.json").unlink()  # interrupted: last.pt is there, and the experiment changes before the rerun
    other = load_experiment(csv_experiment, ["train.weight_decay=0.01"])
    said = []
    compare(other, ["mmoe"], 1, out, log=said.append)  # would be "Cannot resume" if last.pt were resumed from
    assert any("mmoe seed 0: the experiment or data changed" in m and "train.weight_decay" in m for m in said)
    assert not any("resumed from" in m for m in said)


def _drop_keys(record: dict, keys: list[tuple[str, ...]]) -> dict:
    """An experiment record as a plerec without those keys wrote it."""
    for path in keys:
        node = record
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
    return record


NEWER_KEYS = [
    ("features", "lists"),
    ("features", "embedding_dims"),
    ("data", "csv", "comment"),
    ("model", "dense_init"),
]


def test_a_run_recorded_before_a_key_existed_is_kept_while_the_key_is_at_its_default(csv_experiment, tmp_path):
    exp = load_experiment(csv_experiment)
    out = tmp_path / "cmp"
    compare(exp, ["mmoe"], 1, out)
    run = out / "runs" / "mmoe" / "seed0"
    record = json.loads((run / "run.json").read_text())
    _drop_keys(record["fingerprint"]["experiment"], NEWER_KEYS)
    for task in record["fingerprint"]["experiment"]["tasks"]:
        del task["standardize"]
    (run / "run.json").write_text(json.dumps(record))
    said = []
    compare(exp, ["mmoe"], 1, out, log=said.append)
    assert any("mmoe seed 0: already done, skipped" in m for m in said), said
    assert not (out / "runs" / "mmoe" / "seed0.previous").exists()
    # set to another value than the default, the key is a change
    wider = load_experiment(csv_experiment, ["features.embedding_dims={cat = 3}"])
    said = []
    compare(wider, ["mmoe"], 1, out, log=said.append)
    assert any("changed since it ran (features.embedding_dims: (absent, so {}) -> {'cat': 3})" in m for m in said), said
    he = load_experiment(csv_experiment, ['model.dense_init="he"'])
    said = []
    compare(he, ["mmoe"], 1, out, log=said.append)
    assert any("model.dense_init: 'uniform' -> 'he'" in m for m in said), said  # the run above recorded the key


def test_resume_from_a_checkpoint_written_before_a_key_existed(csv_experiment, tmp_path):
    from plerec.checkpoint import read_checkpoint_file, write_checkpoint_file

    exp = load_experiment(csv_experiment)
    fit(exp, out_dir=tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    state = read_checkpoint_file(last)
    _drop_keys(state["experiment"], NEWER_KEYS)
    write_checkpoint_file(last, state)
    # an absent key means its default: resuming under another value is refused, naming what it meant
    with pytest.raises(ValueError, match=r"model.dense_init: \(absent, so 'uniform'\) -> 'he'"):
        fit(
            load_experiment(csv_experiment, ["train.epochs=3", 'model.dense_init="he"']),
            out_dir=tmp_path / "run",
            resume=True,
        )
    longer = load_experiment(csv_experiment, ["train.epochs=3"])
    assert len(fit(longer, out_dir=tmp_path / "run", resume=True).history) == 3


# --- --resume: refused when the data changed ------------------------------------------------------------


def test_resume_after_the_data_file_changed_is_refused_naming_it(csv_experiment, tmp_path, capsys):
    data = tmp_path / "log.csv"
    out = tmp_path / "run"
    assert main(["train", str(csv_experiment), "--out", str(out), "--quiet"]) == 0
    assert main(["train", str(csv_experiment), "--out", str(out), "--quiet", "--resume"]) == 0  # unchanged: fine
    original = data.read_bytes()
    pd.concat([_frame(), _frame(30, seed=5)]).to_csv(data, index=False)
    err = _cli_error(["train", str(csv_experiment), "--out", str(out), "--quiet", "--resume"], capsys)
    assert f"the data file {data} changed since the checkpoint (size {len(original)} -> {data.stat().st_size} " in err

    raw = bytearray(original)  # the same size, one digit changed
    at = raw.index(b".", len(raw) // 2) + 1
    raw[at] = ord("1") if raw[at] != ord("1") else ord("2")
    data.write_bytes(bytes(raw))
    err = _cli_error(["train", str(csv_experiment), "--out", str(out), "--quiet", "--resume"], capsys)
    assert f"the data file {data} changed since the checkpoint" in err and "content differs" in err


def test_resume_of_the_single_task_baseline_checks_the_data_of_each_task_run(tmp_path):
    rows = _frame()
    rows.iloc[:72].to_parquet(tmp_path / "train.parquet")
    rows.iloc[72:].to_parquet(tmp_path / "valid.parquet")
    toml = _experiment(tmp_path, train=str(tmp_path / "train.parquet"), valid=str(tmp_path / "valid.parquet"))
    toml.write_text(toml.read_text().replace('"mmoe"', '"single"').replace("num_experts = 2\nexpert_dims = [4]\n", ""))
    exp = load_experiment(toml)
    fit(exp, out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "tasks" / "click" / "last.pt").exists()
    rows.iloc[:60].to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"tasks/click/last.pt: the data file .*train.parquet changed .*rows 72 -> 60"):
        fit(exp, out_dir=tmp_path / "run", resume=True)


# --- data that is not what was written: one line naming the file, exit 2 ------------------------------


def test_a_csv_row_with_too_few_fields_is_an_error_naming_file_and_row(tmp_path, capsys):
    path = tmp_path / "log.csv"
    _frame().to_csv(path, index=False)
    lines = path.read_text().splitlines()
    lines[6] = lines[6].rsplit(",", 1)[0]  # data row 5 loses its last field
    path.write_text("\n".join(lines) + "\n")
    err = _cli_error(["train", str(_experiment(tmp_path, path=str(path))), "--out", str(tmp_path / "o")], capsys)
    assert f"Reading {path}, row 5: expected 7 fields (one per column), but the row has 6" in err


def test_short_rows_are_found_in_gzipped_csv_read_in_chunks_and_with_quoted_newlines(tmp_path, capsys):
    frame = _frame()
    frame["cat"] = frame["cat"].where(frame.index % 7 != 0, 'two,\n"lines"')  # quoted separators and newlines
    for name in ("train", "valid"):
        frame.to_csv(tmp_path / f"{name}.csv.gz", index=False)
    good = _experiment(tmp_path, train=str(tmp_path / "train.csv.gz"), valid=str(tmp_path / "valid.csv.gz"))
    assert main(["train", str(good), "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    text = (frame.to_csv(index=False)).splitlines()
    text[-1] = text[-1].rsplit(",", 2)[0]  # the last row loses two fields
    with gzip.open(tmp_path / "valid.csv.gz", "wt") as f:
        f.write("\n".join(text) + "\n")
    err = _cli_error(["train", str(good), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert f"Reading {tmp_path / 'valid.csv.gz'}, row 119: expected 7 fields" in err and "has 5" in err


def test_short_rows_are_found_with_skipinitialspace_where_a_quoted_value_follows_a_blank(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text('a,b,c\n1, "x\ny",3\n\n4,5\n')  # the csv module's pass: Arrow has no skipinitialspace
    options = CsvOptions(skipinitialspace=True)
    with pytest.raises(ValueError, match=r"log.csv, row 1: expected 3 fields .* has 2: '4,5'.*1 in all"):
        read_table(path, options)
    path.write_text('a,b,c\n1, "x\ny",3\n\n4,5,6\n')
    assert read_table(path, options)["b"].tolist() == ["x\ny", "5"]


def test_an_all_empty_numeric_column_is_an_error_naming_file_and_column(tmp_path, capsys):
    path = tmp_path / "log.csv"
    _frame().assign(f1=np.nan).to_csv(path, index=False)
    err = _cli_error(["train", str(_experiment(tmp_path, path=str(path))), "--out", str(tmp_path / "o")], capsys)
    assert f"Numeric column `f1` of {path} (train split): expected some values, but all 72 training rows" in err


@pytest.mark.parametrize("layout", ["path", "train"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_broken_gzip_file_is_an_error_naming_it(tmp_path, capsys, layout, damage):
    path = tmp_path / "train.csv.gz"
    _frame(2000).to_csv(path, index=False)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(raw[:200] + bytes(b ^ 0x5A for b in raw[200:400]) + raw[400:])
    _frame().to_csv(tmp_path / "valid.csv", index=False)
    data = {"path": str(path)} if layout == "path" else {"train": str(path), "valid": str(tmp_path / "valid.csv")}
    err = _cli_error(["train", str(_experiment(tmp_path, **data)), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert f"Reading {path}: " in err


def test_rank_input_that_is_a_truncated_gzip_file_is_an_error_naming_it(csv_experiment, tmp_path, capsys):
    assert main(["train", str(csv_experiment), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    candidates = tmp_path / "candidates.csv.gz"
    _frame(2000).to_csv(candidates, index=False)
    candidates.write_bytes(candidates.read_bytes()[:-300])
    argv = ["rank", str(csv_experiment), "--checkpoint", str(tmp_path / "run" / "best.pt"), "--input", str(candidates)]
    err = _cli_error([*argv, "--out", str(tmp_path / "ranked.csv")], capsys)
    assert f"Reading {candidates}: " in err and "truncated" in err


@pytest.mark.parametrize("layout", ["path", "train", "streaming"])
@pytest.mark.parametrize("content", [b"", b"not a parquet file at all" * 10])
def test_an_empty_or_corrupt_parquet_file_is_an_error_naming_it(tmp_path, capsys, layout, content):
    path = tmp_path / "train.parquet"
    path.write_bytes(content)
    _frame().to_parquet(tmp_path / "valid.parquet")
    data = {"path": str(path)} if layout == "path" else {"train": str(path), "valid": str(tmp_path / "valid.parquet")}
    extra = ["--set", "data.streaming=true"] if layout == "streaming" else []
    toml = _experiment(tmp_path, **data)
    err = _cli_error(["train", str(toml), "--out", str(tmp_path / "o"), "--quiet", *extra], capsys)
    assert f"Reading {path}: " in err


def _flip_in_data_page(path: Path, column: str) -> None:
    """Flip the lowest bit of the last value of the column's first data page (not its header, not the footer)."""
    meta = pq.ParquetFile(path).metadata
    index = meta.schema.to_arrow_schema().names.index(column)
    chunk = meta.row_group(0).column(index)
    at = chunk.data_page_offset + chunk.total_compressed_size - 8  # the last float64's lowest mantissa byte
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("layout", ["path", "train", "streaming"])
def test_a_flipped_bit_in_a_checksummed_parquet_page_is_an_error_naming_the_file(tmp_path, capsys, layout):
    path = tmp_path / "train.parquet"
    table = pa.Table.from_pandas(_frame(), preserve_index=False)
    pq.write_table(table, path, compression="none", use_dictionary=False, write_page_checksum=True)
    _flip_in_data_page(path, "f0")
    assert pq.read_table(path)["f0"].to_pylist() != table["f0"].to_pylist()  # unverified, it reads another value
    _frame().to_parquet(tmp_path / "valid.parquet")
    data = {"path": str(path)} if layout == "path" else {"train": str(path), "valid": str(tmp_path / "valid.parquet")}
    extra = ["--set", "data.streaming=true"] if layout == "streaming" else []
    toml = _experiment(tmp_path, **data)
    err = _cli_error(["train", str(toml), "--out", str(tmp_path / "o"), "--quiet", *extra], capsys)
    assert f"Reading {path}" in err and "checksum" in err


def test_the_parquet_files_plerec_writes_carry_page_checksums(tmp_path):
    synth = write_parquet(SynthConfig(rows=300, dim=4), tmp_path / "synth.parquet")
    ranked = write_ranked(_frame(), tmp_path / "ranked.parquet")
    for path, column in ((synth, "x0"), (ranked, "f0")):
        _flip_in_data_page(path, column)
        with pytest.raises(OSError, match="CRC checksum verification failed"):
            pq.read_table(path, page_checksum_verification=True)
