"""Input validation (issue 6, item 1): every bad input stops with a ValueError naming the file, the
column, the first bad rows (counted from 0 at the first data row of the file) and what was expected,
on every data path: one file split by fractions, separate files read in chunks, and streaming Parquet."""

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from plerec.cli import main
from plerec.config import experiment_from_dict
from plerec.data.coverage import LabelCounts
from plerec.data.encode import Encoder, encode_file
from plerec.data.fitter import fit_encoder_chunked
from plerec.data.stream import ParquetBatches, count_labels, load_encoder, local_eval_chunks, save_encoder
from plerec.data.table import iter_frames, load_splits, read_table
from plerec.data.vocab import category_key, stable_bucket
from plerec.train import prepare_data


def make_exp(data: dict, features: dict | None = None, tasks: list | None = None, **sections):
    return experiment_from_dict(
        {
            "data": data,
            "features": features or {"numeric": ["x"], "categorical": ["c"]},
            "tasks": tasks or [{"name": "ctr", "kind": "binary", "label": "y"}],
            **sections,
        }
    )


def table(rows: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"x": rng.normal(size=rows).round(3), "c": rng.choice(["a", "b", "c"], rows), "y": rng.integers(0, 2, rows)}
    )


def write(frame: pd.DataFrame, path: Path) -> str:
    if path.suffix == ".parquet":
        parquet_ready(frame).to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return str(path)


def parquet_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns of mixed Python values as Parquet can hold them: text among numbers as text, as a CSV would be."""
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == object:
            if any(isinstance(v, str) for v in frame[col]):
                frame[col] = frame[col].map(lambda v: None if v is None else str(v))
            else:
                frame[col] = pd.to_numeric(frame[col])
    return frame


def with_value(frame: pd.DataFrame, column: str, rows: list[int], value) -> pd.DataFrame:
    frame = frame.copy()
    frame[column] = frame[column].astype(object)
    for row in rows:
        frame.at[row, column] = value
    return frame


def paths(tmp_path: Path, train: pd.DataFrame, valid: pd.DataFrame | None = None, suffix: str = ".csv") -> dict:
    valid = table(10, seed=1) if valid is None else valid
    return {"train": write(train, tmp_path / f"train{suffix}"), "valid": write(valid, tmp_path / f"valid{suffix}")}


# The three ways data comes in; each takes the training table and gives an experiment's [data].
def single_file(tmp_path, train):
    return {"path": write(train, tmp_path / "all.csv"), "split": [0.9, 0.1, 0.0]}


def separate_csv(tmp_path, train):
    return paths(tmp_path, train)


def separate_parquet(tmp_path, train):
    return paths(tmp_path, train, suffix=".parquet")


def streaming(tmp_path, train):
    return {**paths(tmp_path, train, suffix=".parquet"), "streaming": True}


ALL_PATHS = [single_file, separate_csv, separate_parquet, streaming]


def source_pattern(data: dict) -> str:
    return r"all\.csv \(train split\)" if "path" in data else r"train\.(csv|parquet)"


# --- missing columns ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ALL_PATHS, ids=lambda f: f.__name__)
def test_a_missing_feature_column_is_named_with_the_file_and_a_hint(tmp_path, layout):
    data = layout(tmp_path, table().rename(columns={"x": "xx"}))
    with pytest.raises(ValueError, match=rf"Column `x` .* is not in .*{source_pattern(data)}\. Did you mean `xx`"):
        prepare_data(make_exp(data))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_column_missing_from_the_valid_file_is_named(tmp_path, suffix):
    data = paths(tmp_path, table(), table(10, seed=1).drop(columns=["c"]), suffix)
    with pytest.raises(ValueError, match=rf"Column `c` used by a feature is not in .*valid\{suffix}\. Columns: x, y"):
        prepare_data(make_exp(data))


def test_streaming_reports_a_column_missing_from_the_valid_files(tmp_path):
    data = {**paths(tmp_path, table(), table(10, seed=1).drop(columns=["y"]), ".parquet"), "streaming": True}
    exp = make_exp(data)
    # At start-up, from the Parquet metadata: not after the first training epoch.
    with pytest.raises(ValueError, match=r"Expected .*valid\.parquet to have the column\(s\) 'y' \(features, labels"):
        prepare_data(exp)
    encoder = prepare_data(replace(exp, data=replace(exp.data, valid=data["train"]))).encoder
    with pytest.raises(ValueError, match=r"Column `y` used by task `ctr` is not in .*valid\.parquet \(row group 0\)"):
        list(local_eval_chunks(data["valid"], encoder))


# --- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ALL_PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad, shown", [(2, "2"), (-1, "-1"), ("yes", "'yes'"), (0.5, "0.5")])
def test_binary_labels_outside_0_1_or_unparseable_are_listed_by_row(tmp_path, layout, bad, shown):
    train = with_value(table(), "y", [3, 11], bad)
    data = layout(tmp_path, train)
    with pytest.raises(ValueError) as err:
        if layout is streaming:
            exp = make_exp(data)
            next(ParquetBatches(data["train"], Encoder.fit(exp, table()), 4, seed=0).epoch())
        else:
            prepare_data(make_exp(data))
    message = str(err.value)
    assert "Label column `y` of task `ctr`" in message and "expected 0 or 1" in message
    assert "counted from 0 = the first data row" in message
    if "path" in data:  # the split keeps the file's row numbers: whichever of rows 3, 11 fell into train
        assert f"but got {shown}" in message and "of the 18 rows read" in message
    else:
        assert f"row 3: expected 0 or 1 (or empty for rows outside the task), but got {shown}" in message
        assert f"Bad rows (counted from 0 = the first data row of the file): 3 ({shown}), 11 ({shown}); 2 of" in message


def test_bad_rows_are_numbered_in_the_file_across_csv_chunks(tmp_path):
    train = with_value(table(40), "y", [17, 19, 20, 21, 25, 29, 31, 35], 7)
    path = write(train, tmp_path / "train.csv")
    exp = make_exp({"train": path, "valid": path})
    with pytest.raises(
        ValueError,
        match=r"train\.csv, row 17: expected 0 or 1 .*but got 7\..*Bad rows \(counted from 0 = the first data row "
        r"of the file\): 17 \(7\), 19 \(7\), 20 \(7\), 21 \(7\), 25 \(7\), …; 7 of the 16 rows read\.",
    ):
        fit_encoder_chunked(exp, path, chunk_rows=16)  # the second chunk (rows 16-31) holds 7 bad rows


def test_bad_rows_are_numbered_in_the_file_across_parquet_files_and_row_groups(tmp_path):
    folder = tmp_path / "valid"
    folder.mkdir()
    write(table(10).astype({"y": str}), folder / "part0.parquet")  # one schema across the files: y is text
    bad = pa.Table.from_pandas(parquet_ready(with_value(table(12), "y", [9], "no")), preserve_index=False)
    pq.write_table(bad, folder / "part1.parquet", row_group_size=4)
    train = write(table(), tmp_path / "train.csv")
    exp = make_exp({"train": train, "valid": str(folder)})
    encoder = fit_encoder_chunked(exp, train)
    with pytest.raises(ValueError, match=r"part1\.parquet, row 9: expected 0 or 1.*but got 'no'.*: 9 \('no'\); 1 of"):
        encode_file(str(folder), encoder, chunk_rows=4)
    with pytest.raises(ValueError, match=r"part1\.parquet \(row group 2\), row 9: expected 0 or 1"):
        list(local_eval_chunks(str(folder), encoder))


def test_regression_labels_must_fit_in_float32(tmp_path):
    train = table().assign(w=1.0)
    train.loc[4, "w"] = 1e39
    exp = make_exp(paths(tmp_path, train), tasks=[{"name": "watch", "kind": "regression", "label": "w"}])
    message = (
        r"`w` of task `watch` in .*train\.csv, row 4: expected a finite number, but got 1e\+39\. "
        r"Regression labels must be finite and within float32's range"
    )
    with pytest.raises(ValueError, match=message):
        prepare_data(exp)


@pytest.mark.parametrize("layout", ALL_PATHS, ids=lambda f: f.__name__)
def test_a_task_with_no_labelled_training_row_is_an_error(tmp_path, layout):
    train = table().assign(z=np.nan)
    data = layout(tmp_path, train)
    if "valid" in data:  # the valid file needs the column too
        write(table(10, seed=1).assign(z=1.0), Path(data["valid"]))
    tasks = [{"name": "ctr", "kind": "binary", "label": "y"}, {"name": "buy", "kind": "binary", "label": "z"}]
    with pytest.raises(
        ValueError,
        match=rf"Task `buy` has no labelled row in the training data .*{source_pattern(data)}: expected some of its "
        r"\d+ rows to have a value in column `z`, but none has",
    ):
        prepare_data(make_exp(data, tasks=tasks))


def test_a_sample_space_that_selects_no_training_row_is_an_error(tmp_path):
    tasks = [{"name": "cvr", "kind": "binary", "label": "y", "space": "z > 100"}]
    data = paths(tmp_path, table().assign(z=1.0), table(10, seed=1).assign(z=200.0))
    with pytest.raises(ValueError, match=r"Task `cvr` has no labelled row .*column `y` and meets `space` \(z > 100\)"):
        prepare_data(make_exp(data, tasks=tasks))


# --- every task can be trained and evaluated on every split --------------------------------------


def set_in_split(data: dict, split: str, column: str, value) -> dict:
    """`column` = `value` (a value, or one per row) on every row of `split`: its own file, or the rows that
    the split of one file by fractions puts there (found with the library's own split)."""
    path = Path(data.get("path") or data[split])
    frame = read_table(path)
    if "path" in data:
        exp = make_exp(data)
        frame.loc[load_splits(exp.data, exp.seed)[split].index, column] = value
    else:
        frame[column] = value
    write(frame, path)
    return data


def split_file(data: dict, split: str) -> str:
    return r"all\.csv" if "path" in data else rf"{split}\.(csv|parquet)"


@pytest.mark.parametrize("layout", ALL_PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("label", [0, 1])
def test_a_binary_task_with_one_class_in_the_valid_split_is_an_error(tmp_path, layout, label):
    data = set_in_split(layout(tmp_path, table()), "valid", "y", label)
    rows = 2 if "path" in data else 10
    counts = f"0 positive and {rows} negative" if label == 0 else f"{rows} positive and 0 negative"
    with pytest.raises(
        ValueError,
        match=rf"Task `ctr` has {counts} rows in the valid split \(.*{split_file(data, 'valid')}\): expected both "
        r"classes to compute AUC; check the values of label column `y` in that file",
    ):
        prepare_data(make_exp(data))


@pytest.mark.parametrize("layout", ALL_PATHS, ids=lambda f: f.__name__)
def test_a_binary_task_with_one_class_in_the_train_split_is_an_error(tmp_path, layout):
    data = layout(tmp_path, table().assign(y=1))
    rows = 18 if "path" in data else 20
    with pytest.raises(
        ValueError,
        match=rf"Task `ctr` has {rows} positive and 0 negative rows in the train split "
        rf"\(.*{split_file(data, 'train')}\): expected both classes to learn to tell them apart",
    ):
        prepare_data(make_exp(data))


@pytest.mark.parametrize("suffix, stream", [(".csv", False), (".parquet", False), (".parquet", True)])
def test_a_condition_that_no_test_row_meets_names_the_condition(tmp_path, suffix, stream):
    """The UCI census test file spells its labels `>50K.`, the training file `>50K`."""

    def census(rows: int, seed: int, dot: str = "") -> pd.DataFrame:
        frame = table(rows, seed)
        return frame.assign(income=np.where(frame.y == 1, ">50K", "<=50K")).assign(income=lambda f: f.income + dot)

    data = {**paths(tmp_path, census(20, 0), census(10, 1), suffix), "streaming": stream}
    data["test"] = write(census(12, 2, dot="."), tmp_path / f"test{suffix}")
    tasks = [{"name": "income", "kind": "binary", "condition": 'income == ">50K"'}]
    with pytest.raises(
        ValueError,
        match=r"Task `income` has 0 positive and 12 negative rows in the test split \(.*test\.(csv|parquet)\): "
        r"expected both classes to compute AUC; check `condition` \(income == \">50K\"\) .* `>50K\.`",
    ):
        prepare_data(make_exp(data, tasks=tasks))


@pytest.mark.parametrize("layout", ALL_PATHS, ids=lambda f: f.__name__)
def test_a_task_with_no_row_in_the_valid_split_is_an_error(tmp_path, layout):
    data = layout(tmp_path, table().assign(w=np.arange(20.0)))
    if "valid" in data:
        write(table(10, seed=1).assign(w=1.0), Path(data["valid"]))
    data = set_in_split(data, "valid", "w", np.nan)
    rows = 2 if "path" in data else 10
    tasks = [{"name": "watch", "kind": "regression", "label": "w"}]
    with pytest.raises(
        ValueError,
        match=rf"Task `watch` has 0 rows in its sample space in the valid split \(.*{split_file(data, 'valid')}\): "
        rf"expected some of its {rows} rows to have a value in column `w`, to evaluate the task on",
    ):
        prepare_data(make_exp(data, tasks=tasks))


def test_a_sample_space_that_selects_no_valid_row_is_an_error(tmp_path):
    tasks = [{"name": "cvr", "kind": "binary", "label": "y", "space": "z > 100"}]
    data = paths(tmp_path, table().assign(z=np.arange(20.0) * 10), table(10, seed=1).assign(z=1.0))
    with pytest.raises(
        ValueError,
        match=r"Task `cvr` has 0 rows in its sample space in the valid split \(.*valid\.csv\): expected some of its "
        r"10 rows to have a value in column `y` and to meet `space` \(z > 100\)",
    ):
        prepare_data(make_exp(data, tasks=tasks))


def test_streamed_label_counts_are_those_training_sees(tmp_path):
    """One pass over the label columns of a folder of Parquet files counts what the encoded rows hold."""
    folder = tmp_path / "valid"
    folder.mkdir()
    for i in range(2):
        frame = table(23, seed=i).assign(z=np.where(np.arange(23) % 3 == 0, np.nan, np.arange(23.0)))
        frame = with_value(frame, "y", [4], None)  # a missing label: outside the task
        pq.write_table(
            pa.Table.from_pandas(parquet_ready(frame), preserve_index=False), folder / f"{i}.parquet", row_group_size=5
        )
    tasks = [
        {"name": "ctr", "kind": "binary", "label": "y"},
        {"name": "cvr", "kind": "binary", "label": "y", "space": "z > 5"},
    ]
    exp = make_exp({"train": str(folder / "0.parquet"), "valid": str(folder), "streaming": True}, tasks=tasks)
    encoder = prepare_data(exp).encoder
    chunks = list(local_eval_chunks(folder, encoder))
    expected = LabelCounts.of(torch.cat([c.labels for c in chunks]), torch.cat([c.label_mask for c in chunks]))
    counted = count_labels(folder, encoder)
    assert counted.rows == expected.rows == 46
    assert counted.labelled.tolist() == expected.labelled.tolist() and counted.labelled[0] == 44
    assert counted.positives.tolist() == expected.positives.tolist()
    assert 0 < counted.labelled[1] < counted.labelled[0]


# --- numeric features --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ALL_PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad, shown", [(np.inf, "inf"), (-np.inf, "-inf"), ("12 kg", "'12 kg'")])
@pytest.mark.parametrize("missing_numeric", ["impute", "error"])
def test_infinite_or_text_numeric_values_are_errors_even_with_imputation(tmp_path, layout, bad, shown, missing_numeric):
    data = layout(tmp_path, with_value(table(), "x", [2, 5, 6], bad))
    exp = make_exp({**data, "missing_numeric": missing_numeric})
    with pytest.raises(ValueError) as err:
        if layout is streaming:
            next(ParquetBatches(data["train"], Encoder.fit(exp, table()), 4, seed=0).epoch())
        else:
            prepare_data(exp)
    message = str(err.value)
    assert re.search(rf"Numeric column `x` of .*: expected a finite number, but got {re.escape(shown)}", message)
    if "path" not in data:
        assert (
            f"Bad rows (counted from 0 = the first data row of the file): 2 ({shown}), 5 ({shown}), 6 ({shown})"
            in message
        )


@pytest.mark.parametrize("layout", ALL_PATHS, ids=lambda f: f.__name__)
def test_missing_numeric_values_are_an_error_when_configured(tmp_path, layout):
    data = layout(tmp_path, with_value(table(), "x", [1, 4], None))
    if "path" in data:  # the 2 validation rows of the one file: both classes, or the split is an error
        set_in_split(data, "valid", "y", [0, 1])
    with pytest.raises(ValueError, match=r"Numeric column `x` of .*: value is missing .*missing_numeric = 'error'"):
        prepare_data(make_exp({**data, "missing_numeric": "error"}))
    imputed = prepare_data(make_exp({**data, "missing_numeric": "impute"}))
    assert imputed.encoder.dense_names == ["x", "x__missing"]
    for split in imputed.splits.values():
        assert torch.isfinite(split.dense).all()


def test_values_whose_standardised_form_overflows_float32_are_errors():
    exp = make_exp({"path": "unused.csv"})
    train = table(4).assign(x=[0.0, 1e-30, 0.0, 1e-30])  # standard deviation 5e-31
    encoder = Encoder.fit(exp, train)
    probe = table(3).assign(x=[0.0, 1e10, 2e10])
    probe.attrs["source"] = "valid.csv"
    overflow = (
        r"Numeric column `x` of valid\.csv, row 1: expected a value whose standardised form .* fits in float32, "
        r"but got 10000000000\.0.*Bad rows .*: 1 \(10000000000\.0\), 2 \(20000000000\.0\)"
    )
    with pytest.raises(ValueError, match=overflow):
        encoder.transform(probe)
    huge = r"Numeric column `x` of the training data: expected values whose mean and standard deviation are finite"
    with pytest.raises(ValueError, match=huge):
        Encoder.fit(exp, table(2).assign(x=[1.7e308, 1.7e308]))


# --- empty tables and splits -------------------------------------------------------------------


def test_empty_files_and_splits(tmp_path):
    header_only = write(table(0), tmp_path / "header.csv")
    (tmp_path / "blank.csv").write_text("")
    empty_parquet = write(table(0), tmp_path / "empty.parquet")
    good = write(table(), tmp_path / "good.csv")
    two = write(table(2), tmp_path / "two.csv")
    cases = [
        ({"path": header_only}, r"Expected \[data\] path .*header\.csv to have data rows, but it has none"),
        ({"path": str(tmp_path / "blank.csv")}, r"Reading .*blank\.csv: the file is empty \(no header, no rows\)"),
        ({"path": two}, r"The valid split of .*two\.csv is empty \(2 rows, split \[0\.8, 0\.1, 0\.1\]\)"),
        ({"train": header_only, "valid": good}, r"Expected the training data .*header\.csv to have data rows"),
        ({"train": good, "valid": header_only}, r"Expected .*header\.csv to have data rows, but it has none"),
        ({"train": good, "valid": empty_parquet}, r"Expected .*empty\.parquet to have data rows, but it has none"),
        ({"train": empty_parquet, "valid": good}, r"Expected the training data .*empty\.parquet to have data rows"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            prepare_data(make_exp(data))


def test_streaming_refuses_empty_parquet_inputs(tmp_path):
    empty = write(table(0), tmp_path / "empty.parquet")
    good = write(table(), tmp_path / "good.parquet")
    exp = make_exp({"train": empty, "valid": good, "streaming": True})
    with pytest.raises(ValueError, match=r"Expected the training data .*empty\.parquet to have data rows"):
        prepare_data(exp)
    encoder = Encoder.fit(exp, table())
    for read in (lambda: ParquetBatches(empty, encoder, 4, seed=0), lambda: list(local_eval_chunks(empty, encoder))):
        with pytest.raises(ValueError, match=r"Expected .*empty\.parquet to have data rows, but it has none"):
            read()


# --- column names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, message",
    [
        ("x,c,x,y", r"distinct column names in the header of .*t\.csv, but got `x` at columns 0, 2 \(counted from 0\)"),
        ("x,c,y,c,c", r"but got `c` at columns 1, 3, 4"),
        (
            ",x,c,y",
            r"every column of the header of .*t\.csv to have a name, but column 0 \(counted from 0\) has an",
        ),
        ("x,c,y,", r"but column 3 \(counted from 0\) has an empty name"),
    ],
)
def test_duplicate_or_empty_names_in_a_csv_header_are_errors(tmp_path, header, message):
    width = header.count(",") + 1
    (tmp_path / "t.csv").write_text(header + "\n" + ",".join(["1"] * width) + "\n")
    for read in (lambda p: read_table(p), lambda p: list(iter_frames(p))):
        with pytest.raises(ValueError, match=message):
            read(tmp_path / "t.csv")


def test_pandas_would_have_renamed_a_duplicate_silently(tmp_path):
    (tmp_path / "t.csv").write_text("x,c,x\n1,a,2\n")
    assert list(pd.read_csv(tmp_path / "t.csv").columns) == ["x", "c", "x.1"]  # what the check prevents


def test_duplicate_or_empty_names_in_parquet_are_errors(tmp_path):
    columns = [pa.array([1.0]), pa.array(["a"]), pa.array([2.0])]
    pq.write_table(pa.table(columns, names=["x", "c", "x"]), tmp_path / "dup.parquet")
    pq.write_table(pa.table([pa.array([1.0]), pa.array(["a"])], names=["x", ""]), tmp_path / "blank.parquet")
    for path, message in [
        (tmp_path / "dup.parquet", r"distinct column names in .*dup\.parquet, but got `x` at columns 0, 2"),
        (tmp_path / "blank.parquet", r"every column of .*blank\.parquet to have a name, but column 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            read_table(path)
        with pytest.raises(ValueError, match=message):
            list(iter_frames(path))
        with pytest.raises(ValueError, match=message):
            prepare_data(make_exp({"train": str(path), "valid": str(path), "streaming": True}))


def test_a_header_shorter_than_its_rows_is_an_error_not_a_shifted_table(tmp_path):
    (tmp_path / "t.csv").write_text("x,y\n1,a,0\n2,b,1\n")
    with pytest.raises(ValueError, match=r"Reading .*t\.csv: the first data row has more fields than there are column"):
        read_table(tmp_path / "t.csv")
    (tmp_path / "u.csv").write_text("x,y\n1,0\n2,b,1\n")
    with pytest.raises(ValueError, match=r"Reading .*u\.csv: Error tokenizing .*Expected 2 fields in line 3, saw 3"):
        list(iter_frames(tmp_path / "u.csv"))


# --- categorical vocabularies and hashing ------------------------------------------------------


def ids_table(rows: int = 30) -> pd.DataFrame:
    return pd.DataFrame(
        {"user": [f"u{i}" for i in range(rows)], "x": np.arange(rows, dtype=float), "y": np.arange(rows) % 2}
    )


def test_a_vocabulary_over_max_vocab_is_an_error_suggesting_hash_buckets(tmp_path):
    path = write(ids_table(), tmp_path / "train.csv")
    exp = make_exp({"train": path, "valid": path}, {"categorical": ["user"], "max_vocab": 25})
    with pytest.raises(
        ValueError,
        match=r"Categorical column `user` of .*train\.csv: expected at most \[features\] max_vocab = 25 distinct "
        r"values, but got 30 .*\[features\] hash_buckets = \{ user = 16 \}",
    ):
        prepare_data(exp)
    with pytest.raises(ValueError, match=r"max_vocab = 25 distinct values, but got 26 in the training rows read so"):
        fit_encoder_chunked(exp, path, chunk_rows=13)  # stops at the second chunk, before reading on
    assert prepare_data(make_exp({"train": path, "valid": path}, {"categorical": ["user"], "max_vocab": 30}))


def test_hash_buckets_map_values_to_fixed_ids_and_keep_0_for_missing(tmp_path):
    train = ids_table()
    train.loc[[3, 7], "user"] = None
    path = write(train, tmp_path / "train.csv")
    exp = make_exp({"train": path, "valid": path}, {"categorical": ["user"], "hash_buckets": {"user": 8}})
    data = prepare_data(exp)
    assert data.encoder.vocab_sizes == [9] and "user" not in data.encoder.vocabs
    ids = data.splits["train"].sparse[:, 0].tolist()
    for i, value in enumerate(train["user"]):
        if pd.isna(value):
            assert ids[i] == 0
        else:  # the bucket is recomputed here from the value's text with BLAKE2b
            digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
            assert ids[i] == 1 + int.from_bytes(digest, "little") % 8
    unseen = pd.DataFrame({"user": ["never seen"], "x": [0.0], "y": [1]})
    assert 1 <= data.encoder.transform(unseen).sparse[0, 0] <= 8  # unseen values still get a bucket


def test_hashed_ids_are_the_same_in_memory_chunked_streaming_and_after_save_load(tmp_path):
    train = ids_table(40)
    csv, parquet = write(train, tmp_path / "t.csv"), tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pandas(train, preserve_index=False), parquet, row_group_size=7)
    features = {"categorical": ["user"], "numeric": ["x"], "hash_buckets": {"user": 5}}
    exp = make_exp({"train": csv, "valid": csv}, features)
    whole = Encoder.fit(exp, read_table(csv))
    expected = whole.transform(read_table(csv)).sparse
    assert torch.equal(encode_file(csv, fit_encoder_chunked(exp, csv, chunk_rows=6), chunk_rows=6).sparse, expected)
    assert torch.equal(encode_file(str(parquet), whole, chunk_rows=9).sparse, expected)
    save_encoder(whole, tmp_path / "prep")
    loaded = load_encoder(tmp_path / "prep", exp)
    assert loaded == whole and loaded.hash_buckets == {"user": 5}
    streamed = torch.cat([t.sparse for t in local_eval_chunks(str(parquet), loaded)])
    assert torch.equal(streamed, expected)


def test_hashed_ids_do_not_depend_on_the_process_hash_seed():
    values = ("a", "é", "42", "user 1")
    script = f"from plerec.data.vocab import stable_bucket; print([stable_bucket(v, 1000) for v in {values!r}])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # this process has another (random) seed
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str([stable_bucket(v, 1000) for v in values])
    assert len({stable_bucket(v, 1000) for v in values}) > 1


def test_category_keys_make_7_7_0_and_text_7_one_category_across_chunks(tmp_path):
    assert category_key(7) == category_key(7.0) == category_key(np.int16(7)) == category_key("7") == "7"
    assert category_key("7.0") == category_key(" 7") == category_key("7e0") == "7"  # as pandas would read them
    assert category_key(7.5) == category_key("7.5") == "7.5" and category_key(True) == category_key("true") == "True"
    assert category_key("kiwi") == "kiwi" and category_key("1_000") == "1_000" and category_key("nan") == "nan"
    # The first chunk holds only numbers (read as int), the second also text (read as strings).
    values = ["7", "3", "7", "3", "7", "3", "kiwi", "7", "3", "kiwi"]
    frame = pd.DataFrame({"code": values, "x": 1.0, "y": [0, 1] * 5})
    path = write(frame, tmp_path / "t.csv")
    chunks = [f["code"].dtype for f in iter_frames(path, chunk_rows=6)]
    assert pd.api.types.is_integer_dtype(chunks[0]) and not pd.api.types.is_integer_dtype(chunks[1])
    exp = make_exp({"train": path, "valid": path}, {"categorical": ["code"]})
    chunked = fit_encoder_chunked(exp, path, chunk_rows=6)
    assert [category_key(v) for v in chunked.vocabs["code"]] == ["3", "7", "kiwi"]
    whole = Encoder.fit(exp, read_table(path))
    assert torch.equal(encode_file(path, chunked, chunk_rows=6).sparse, whole.transform(read_table(path)).sparse)


def test_a_nested_parquet_column_is_not_a_category(tmp_path):
    columns = [pa.array([0.5, 1.5, 2.5]), pa.array([["a"], ["b", "c"], []]), pa.array([0, 1, 1])]
    pq.write_table(pa.table(columns, names=["x", "c", "y"]), tmp_path / "t.parquet")
    path = str(tmp_path / "t.parquet")
    nested = r"Categorical column `c` of .*t\.parquet, row 0: expected a single value .*but got ndarray"
    with pytest.raises(ValueError, match=nested):
        prepare_data(make_exp({"train": path, "valid": path}))


def test_hash_buckets_must_name_a_categorical_feature(tmp_path):
    path = write(ids_table(), tmp_path / "t.csv")
    data = {"train": path, "valid": path}
    not_a_feature = r"Column `usr` in \[features\] hash_buckets is not a categorical feature of .*t\.csv\. Did you"
    with pytest.raises(ValueError, match=not_a_feature):
        prepare_data(make_exp(data, {"categorical": ["user"], "hash_buckets": {"usr": 4}}))
    with pytest.raises(ValueError, match=r"Column `x` in \[features\] hash_buckets is listed as numeric"):
        prepare_data(make_exp(data, {"categorical": ["user"], "numeric": ["x"], "hash_buckets": {"x": 4}}))
    auto = prepare_data(make_exp(data, {"auto": True, "hash_buckets": {"x": 4}}))  # auto: x would be numeric
    assert "x" in auto.encoder.categorical and auto.encoder.inferred["x"] == "categorical"


# --- out-of-range settings ---------------------------------------------------------------------


def base() -> dict:
    return {
        "data": {"path": "/tmp/rows.csv"},
        "features": {"numeric": ["x"]},
        "tasks": [{"name": "ctr", "kind": "binary", "label": "click"}],
    }


SETTINGS = [
    ("train", "lr", -1e-3, r"\[train\] finite lr > 0.*lr=-0\.001"),
    ("train", "lr", float("nan"), r"\[train\] finite lr > 0.*lr=nan"),
    ("train", "lr", float("inf"), r"\[train\] finite lr > 0.*lr=inf"),
    ("train", "weight_decay", -0.1, r"weight_decay >= 0.*weight_decay=-0\.1"),
    ("train", "batch_size", 0, r"\[train\] `batch_size` >= 1, but got 0"),
    ("train", "eval_batch_size", -4, r"\[train\] `eval_batch_size` >= 1, but got -4"),
    ("train", "patience", -1, r"patience >= 0.*patience=-1"),
    ("model", "num_levels", 0, r"`num_levels` to hold positive integers, but got \[0\]"),
    ("model", "num_task_experts", -1, r"`num_task_experts` to be an integer >= 0, but got -1"),
    ("model", "num_task_experts", 1.5, r"`num_task_experts` to be an integer >= 0, but got 1\.5"),
    ("model", "expert_dims", [], r"`expert_dims` to list at least one width, but got \[\]"),
    ("model", "expert_dims", 64, r"\[model\] `expert_dims` to be a list of integers, but got 64"),
    ("model", "embedding_dim", "8", r"\[model\] `embedding_dim` to be an integer, but got '8'"),
    ("model", "embedding_init_std", float("inf"), r"`embedding_init_std` to be finite and > 0, but got inf"),
    ("model", "tower_dims", [16, 0], r"`tower_dims` to hold positive integers, but got \[16, 0\]"),
    ("model", "levels", 2, r"\[model\] `levels` to be a list of tables, but got 2"),
    ("data", "split", [0.5, 0.3, 0.1], r"`split` to be three fractions \(train, valid, test\) summing to 1"),
    ("data", "split", [0.5, float("nan"), 0.5], r"`split` to be three fractions"),
    ("data", "split_seed", -3, r"\[data\] `split_seed` >= 0, but got -3"),
    ("features", "max_vocab", 0, r"\[features\] `max_vocab` >= 1, but got 0"),
    (
        "features",
        "hash_buckets",
        {"user": 0},
        r"`hash_buckets` to map column names to a number of buckets .*'user' = 0\b",
    ),
    ("features", "hash_buckets", {"user": "many"}, r"\[features\] `hash_buckets` `user` to be an integer"),
    ("features", "hash_buckets", 1024, r"\[features\] `hash_buckets` to be a table like \{ name = value \}"),
    ("features", "auto_max_int_categories", -1, r"`auto_max_int_categories` >= 0, but got -1"),
]


@pytest.mark.parametrize("section, key, value, message", SETTINGS, ids=[f"{s[0]}.{s[1]}={s[2]}" for s in SETTINGS])
def test_out_of_range_settings_name_the_key(section, key, value, message):
    raw = base()
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(raw)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw.update(seed=-1), r"`seed` >= 0, but got -1"),
        (lambda raw: raw["tasks"][0].update(weight=float("nan")), r"weight >= 0 and gamma > 0, but got weight=nan"),
        (lambda raw: raw["tasks"][0].update(gamma=float("inf")), r"gamma > 0, but got weight=1\.0, gamma=inf"),
        (
            lambda raw: raw["data"].update(csv={"names": ["x", "x", ""]}),
            r"\[data\.csv\] `names` to be distinct, "
            r"non-empty column names, but got empty names at positions \[2\]; repeated names \['x'\]",
        ),
        (lambda raw: raw["data"].update(csv={"sep": ""}), r"\[data\.csv\] `sep` to be a separator"),
        (
            lambda raw: raw.update(model={"name": "asymmetric", "source_task": -1}),
            r"`source_task` to be an integer >= 0",
        ),
        (
            lambda raw: raw.update(model={"levels": [{"num_shared_experts": "2"}]}),
            r"\[model\] levels\[0\] `num_shared_experts` to be an integer, but got '2'",
        ),
    ],
)
def test_other_out_of_range_settings(change, message):
    raw = base()
    change(raw)
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(raw)


def test_new_feature_keys_round_trip_through_toml(tmp_path):
    from plerec.config import load_experiment, write_experiment

    raw = base()
    raw["features"].update(max_vocab=5000, hash_buckets={"user id": 64, "item": 128})
    exp = experiment_from_dict(raw)
    write_experiment(exp, tmp_path / "e.toml")
    again = load_experiment(tmp_path / "e.toml")
    assert again.features.hash_buckets == {"user id": 64, "item": 128} and again.features.max_vocab == 5000
    overridden = load_experiment(tmp_path / "e.toml", ["features.hash_buckets.item=7"])
    assert overridden.features.hash_buckets == {"user id": 64, "item": 7}


# --- the command line --------------------------------------------------------------------------

EXPERIMENT = """\
[data]
train = "train.csv"
valid = "valid.csv"

[features]
numeric = ["x"]
categorical = ["c"]

[[tasks]]
name = "ctr"
kind = "binary"
label = "y"

[model]
name = "mmoe"
num_experts = 2
expert_dims = [4]
tower_dims = [4]

[train]
epochs = 1
progress = false
"""


def _header(text: str):
    def apply(root: Path) -> None:
        body = (root / "train.csv").read_text().split("\n", 1)[1]
        (root / "train.csv").write_text(text + "\n" + body)

    return apply


CLI_ERRORS = [
    ("duplicate column", _header("x,c,x"), ["header of", "train.csv", "`x` at columns 0, 2"]),
    ("empty column name", _header("x,,y"), ["train.csv", "column 1 (counted from 0) has an empty name"]),
    ("label 2", lambda r: write(with_value(table(), "y", [6], 2), r / "train.csv"), ["row 6", "but got 2", "6 (2)"]),
    ("inf feature", lambda r: write(with_value(table(), "x", [1], np.inf), r / "train.csv"), ["`x`", "row 1", "inf"]),
    ("empty valid", lambda r: write(table(0), r / "valid.csv"), ["valid.csv", "to have data rows"]),
    ("unlabelled task", lambda r: write(table().assign(y=None), r / "train.csv"), ["Task `ctr`", "column `y`"]),
    (
        "one class in valid",
        lambda r: write(table(10, seed=1).assign(y=0), r / "valid.csv"),
        ["Task `ctr`", "has 0 positive and 10 negative rows in the valid split", "valid.csv", "compute AUC"],
    ),
]


@pytest.mark.parametrize("case, mutate, parts", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_cli_data_errors_exit_2_with_one_line(tmp_path, capsys, case, mutate, parts):
    write(table(), tmp_path / "train.csv")
    write(table(10, seed=1), tmp_path / "valid.csv")
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    mutate(tmp_path)
    code = main(["train", str(tmp_path / "exp.toml"), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("plerec: error: "), err
    for part in parts:
        assert part in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_rejects_out_of_range_settings(tmp_path, capsys):
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    code = main(["train", str(tmp_path / "exp.toml"), "--out", str(tmp_path / "run"), "--set", "train.lr=-1"])
    err = capsys.readouterr().err
    assert code == 2 and "exp.toml" in err and "lr > 0" in err and "lr=-1.0" in err
