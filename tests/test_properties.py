"""Property-based tests (issue 6, item 5) of the table reader and encoder, and of the experiment parser.

Random small tables — missing values, mixed types, unicode, empty strings, empty or repeated column
names — are written as CSV and as Parquet. Reading and encoding them either gives a valid data set, whose
every cell is checked against the table that was written, or raises a ValueError: never another
exception, never data that differs from the input. Random experiment files and random changes to a valid
one give an Experiment or a ValueError.
"""

import math
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from plerec.config import Experiment, experiment_from_dict, experiment_to_dict, load_experiment
from plerec.data.encode import Encoder, encode_file
from plerec.data.fitter import fit_encoder_chunked
from plerec.data.table import read_table
from plerec.train import prepare_data

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What pandas reads as missing in a CSV by default (keep_default_na = true): the documented list.
CSV_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A"}
CSV_NA |= {"NA", "NULL", "NaN", "None", "n/a", "nan", "null"}

PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs"))  # unicode letters, symbols, spaces; no controls
TEXT = st.text(PRINTABLE, max_size=4)
# Column names: often clashing or empty; never glob characters (a feature pattern `a*` would pick more columns).
PLAIN_NAMES = st.one_of(
    st.sampled_from(["x", "y", "é", "名前", "a b"]),
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs"), blacklist_characters="*?["), min_size=1, max_size=4),
)
NAMES = st.one_of(PLAIN_NAMES, st.sampled_from(["", " ", " x", "x "]))

GOOD_LABELS = st.sampled_from([0, 1, 0.0, 1.0, "0", "1", None, float("nan"), "", " "])
BAD_LABELS = st.sampled_from([2, -1, 0.5, "yes", "ja", float("inf"), "1e400"])
GOOD_NUMBERS = st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000), st.none(), st.just(""))
BAD_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), TEXT, st.integers(-(2**70), 2**70))
CATEGORIES = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, 1.0, -2.0]), TEXT, st.none())


def column(good, bad, rows: int):
    """A column of good values, or, one time in four, of good and bad ones mixed."""
    return st.integers(0, 3).flatmap(
        lambda dirty: st.lists(st.one_of(good, bad) if dirty == 0 else good, min_size=rows, max_size=rows)
    )


@st.composite
def tables(draw) -> tuple[list[str], list[list]]:
    """Four columns: a binary label, a categorical, a numeric and an unused one, under random names."""
    rows = draw(st.integers(0, 9))
    if draw(st.integers(0, 3)) == 0:  # one time in four, names as they come: empty, blank or repeated ones
        names = draw(st.lists(NAMES, min_size=4, max_size=4))
    else:
        names = draw(st.lists(PLAIN_NAMES, min_size=4, max_size=4, unique=True))
    values = [
        draw(column(GOOD_LABELS, BAD_LABELS, rows)),
        draw(st.lists(CATEGORIES, min_size=rows, max_size=rows)),
        draw(column(GOOD_NUMBERS, BAD_NUMBERS, rows)),
        draw(st.lists(st.one_of(TEXT, st.floats(), st.none()), min_size=rows, max_size=rows)),
    ]
    return names, values


def write_csv(names: list[str], values: list[list], path: Path) -> None:
    frame = pd.DataFrame({i: pd.Series(v, dtype=object) for i, v in enumerate(values)})
    frame.columns = names
    frame.to_csv(path, index=False)


def write_parquet(names: list[str], values: list[list], path: Path) -> None:
    arrays = []
    for v in values:
        if any(isinstance(x, str) for x in v):  # Parquet holds one type per column: text among numbers as text
            arrays.append(pa.array([None if x is None else str(x) for x in v], pa.string()))
        elif any(isinstance(x, int) and abs(x) >= 2**63 for x in v) or any(isinstance(x, float) for x in v):
            arrays.append(pa.array([None if x is None else float(x) for x in v], pa.float64()))
        else:
            arrays.append(pa.array(v, pa.int64() if v and any(x is not None for x in v) else pa.null()))
    pq.write_table(pa.table(arrays, names=names), path)


def outcome(err: ValueError) -> str:
    """The kind of error, for hypothesis' statistics (pytest --hypothesis-show-statistics)."""
    text = str(err)
    for kind in ("distinct column names", "to have a name", "Label column", "Numeric column", "has no labelled row"):
        if kind in text:
            return kind
    return " ".join(text.split()[:4])


def missing(value, fmt: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    if isinstance(value, str):
        return value.strip() == "" or (fmt == "csv" and value in CSV_NA)
    return False


def as_number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def experiment(names: list[str], data: dict) -> Experiment:
    return experiment_from_dict(
        {
            "data": data,
            "features": {"categorical": [names[1]], "numeric": [names[2]]},
            "tasks": [{"name": "ctr", "kind": "binary", "label": names[0]}],
        }
    )


def check_against_the_table(data, names: list[str], values: list[list], fmt: str) -> None:
    """Every tensor cell of the train split (the whole file) against the value that was written."""
    labels, categories, numbers, _ = values
    table, encoder = data.splits["train"], data.encoder
    n = len(labels)
    assert len(table) == n and table.labels.shape == table.label_mask.shape == (n, 1)
    # Labels: in the task's space exactly where written, and 0/1 there; any other value would have raised.
    for i, value in enumerate(labels):
        assert bool(table.label_mask[i, 0]) == (not missing(value, fmt)), (i, value)
        if not missing(value, fmt):
            assert as_number(value) in (0.0, 1.0), value
            assert table.labels[i, 0] == as_number(value)
        else:
            assert table.labels[i, 0] == 0
    # Numeric: finite, standardised with the mean of the present values; missing ones imputed and flagged.
    present = [as_number(v) for v in numbers if not missing(v, fmt)]
    assert all(x is not None for x in present)  # text or ±inf would have raised
    mean = float(np.mean(present)) if present else 0.0
    assert encoder.means[names[2]] == pytest.approx(mean, rel=1e-9, abs=1e-9)
    assert torch.isfinite(table.dense).all()
    has_gap = any(missing(v, fmt) for v in numbers)
    assert encoder.dense_names == [names[2]] + ([f"{names[2]}__missing"] if has_gap else [])
    for i, value in enumerate(numbers):
        if missing(value, fmt):
            assert table.dense[i, 0] == 0 and table.dense[i, 1] == 1
        else:
            z = np.float32((as_number(value) - encoder.means[names[2]]) / encoder.stds[names[2]])
            assert table.dense[i, 0] == z
            assert not has_gap or table.dense[i, 1] == 0
    # Categorical: 0 for missing values, a training id (>= 1) otherwise; equal values share an id.
    ids = table.sparse[:, 0].tolist()
    assert all(0 <= j < encoder.vocab_sizes[0] for j in ids)
    by_value: dict = {}
    for i, value in enumerate(categories):
        if missing(value, fmt):
            assert ids[i] == 0, (i, value)
        else:
            assert ids[i] >= 1, (i, value)
            assert by_value.setdefault((type(value), value), ids[i]) == ids[i]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@SETTINGS
@given(table=tables())
def test_reading_and_encoding_gives_the_table_or_a_value_error(fmt, table):
    names, values = table
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"t.{fmt}"
        (write_csv if fmt == "csv" else write_parquet)(names, values, path)
        try:
            exp = experiment(names, {"train": str(path), "valid": str(path)})
            data = prepare_data(exp)
        except ValueError as err:
            event(f"ValueError: {outcome(err)}")
            return
        event("valid data set")
        check_against_the_table(data, names, values, fmt)
        if fmt == "parquet":  # streaming reads the same rows from row groups
            streamed = encode_file(str(path), data.encoder, chunk_rows=2)
            for name in ("sparse", "dense", "labels", "label_mask"):
                assert torch.equal(getattr(streamed, name), getattr(data.splits["train"], name))


@SETTINGS
@given(table=tables(), chunk_rows=st.integers(1, 4))
def test_csv_read_in_chunks_encodes_like_the_whole_file(table, chunk_rows):
    names, values = table
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.csv"
        write_csv(names, values, path)
        try:
            exp = experiment(names, {"train": str(path), "valid": str(path)})
        except ValueError:
            return
        try:
            whole = Encoder.fit(exp, read_table(path))
            expected = whole.transform(read_table(path))
        except ValueError:
            with pytest.raises(ValueError):
                encode_file(
                    str(path), fit_encoder_chunked(exp, str(path), chunk_rows=chunk_rows), chunk_rows=chunk_rows
                )
            return
        got = encode_file(str(path), fit_encoder_chunked(exp, str(path), chunk_rows=chunk_rows), chunk_rows=chunk_rows)
    assert torch.equal(got.sparse, expected.sparse)
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.label_mask, expected.label_mask)
    assert torch.allclose(got.dense, expected.dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@SETTINGS
@given(table=tables(), auto=st.booleans(), split=st.sampled_from([[0.8, 0.1, 0.1], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3]]))
def test_one_file_split_by_fractions_keeps_every_row_once(fmt, table, auto, split):
    names, values = table
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"t.{fmt}"
        (write_csv if fmt == "csv" else write_parquet)(names, values, path)
        try:
            exp = experiment(names, {"path": str(path), "split": split})
            if auto:
                exp = experiment_from_dict({**experiment_to_dict(exp), "features": {"auto": True}})
            data = prepare_data(exp)
        except ValueError:
            return
    labelled = sum(not missing(v, fmt) for v in values[0])
    assert sum(len(t) for t in data.splits.values()) == len(values[0])
    assert sum(int(t.label_mask.sum()) for t in data.splits.values()) == labelled
    for t in data.splits.values():
        assert torch.isfinite(t.dense).all() and torch.isfinite(t.labels).all()
        assert ((t.labels == 0) | (t.labels == 1)).all() and (t.labels[~t.label_mask] == 0).all()
        sizes = torch.tensor(data.encoder.vocab_sizes)
        assert ((t.sparse >= 0) & (t.sparse.long() < sizes)).all()


# --- the experiment file -----------------------------------------------------------------------

VALID = {
    "seed": 3,
    "data": {"path": "rows.csv", "split": [0.8, 0.1, 0.1], "missing_numeric": "impute", "csv": {"sep": ","}},
    "features": {"categorical": ["c"], "numeric": ["x"], "max_vocab": 100, "hash_buckets": {"c": 8}},
    "tasks": [
        {"name": "ctr", "kind": "binary", "label": "click", "weight": 1.0},
        {"name": "cvr", "kind": "binary", "label": "buy", "space": "click == 1"},
    ],
    "model": {"name": "ple", "num_levels": 2, "expert_dims": [8], "tower_dims": [4]},
    "train": {"lr": 1e-3, "batch_size": 32, "epochs": 2, "monitor": "ctr"},
}

TOML_SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(PRINTABLE, max_size=8),
    st.sampled_from(["ple", "mmoe", "binary", "regression", "click == 1", "impute", "error", "epoch"]),
)
KEYS = st.text(PRINTABLE, max_size=6)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=8,
)


def paths_of(tree, prefix=()):
    """Every key path of a raw experiment, list items included."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        yield (*prefix, key)
        yield from paths_of(value, (*prefix, key))


ALL_PATHS = sorted(paths_of(VALID), key=str)


@st.composite
def mutated(draw) -> dict:
    import copy

    raw = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        node = raw
        try:
            for key in path[:-1]:
                node = node[key]
            action = draw(st.sampled_from(["nudge", "nudge", "replace", "delete", "add"]))
            if action == "nudge":  # a value of the same type, often out of range
                node[path[-1]] = draw(nudged(node[path[-1]]))
            elif action == "delete":
                del node[path[-1]]
            elif action == "add" and isinstance(node, dict):
                node[draw(st.text(PRINTABLE, max_size=8))] = draw(TOML_VALUES)
            else:
                node[path[-1]] = draw(TOML_VALUES)
        except (KeyError, IndexError, TypeError):  # an earlier change removed or replaced the parent
            continue
    return raw


def nudged(value) -> st.SearchStrategy:
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-2, 64)
    if isinstance(value, float):
        return st.one_of(st.floats(-1, 2), st.sampled_from([0.0, -0.0, float("nan"), float("inf"), 1e-300]))
    if isinstance(value, str):
        return st.one_of(st.sampled_from(["", "ple", "mmoe", "cgc", "x", "click", "buy != 0", "mean"]), TEXT)
    if isinstance(value, list):
        items = st.integers(-1, 8) if all(isinstance(v, int) for v in value) else st.floats(-0.5, 1.5)
        return st.lists(items, max_size=4)
    return TOML_VALUES


def parse(raw: dict, folder: Path) -> Experiment | None:
    """The raw tree through a TOML file and load_experiment: an Experiment, or None after a ValueError."""
    path = folder / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    assert tomllib.loads(path.read_text()) is not None
    try:
        return load_experiment(path)
    except ValueError:
        return None


@SETTINGS
@given(raw=mutated())
def test_a_changed_experiment_parses_or_raises_a_value_error(raw):
    try:
        direct = experiment_from_dict(raw)
    except ValueError:
        direct = None
    with tempfile.TemporaryDirectory() as folder:
        loaded = parse(raw, Path(folder))
        assert (direct is None) == (loaded is None)
        event("valid experiment" if loaded is not None else "ValueError")
        if loaded is not None:  # what is valid survives writing and reading back unchanged
            (Path(folder) / "again.toml").write_text(tomli_w.dumps(experiment_to_dict(loaded)))
            again = load_experiment(Path(folder) / "again.toml")
            assert experiment_to_dict(again) == experiment_to_dict(loaded)


@SETTINGS
@given(raw=st.dictionaries(st.sampled_from(["seed", "data", "features", "tasks", "model", "train", "x"]), TOML_VALUES))
def test_random_toml_tables_parse_or_raise_a_value_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        parse(raw, Path(folder))


def test_the_unchanged_experiment_is_valid(tmp_path):
    exp = parse(VALID, tmp_path)
    assert exp is not None and exp.features.hash_buckets == {"c": 8} and exp.train.monitor == "ctr"
