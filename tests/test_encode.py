import gzip

import numpy as np
import pandas as pd
import pytest
import torch

from plerec.config import Condition, CsvOptions, DataConfig, TaskConfig, experiment_from_dict
from plerec.data.conditions import evaluate_condition
from plerec.data.encode import Encoder
from plerec.data.fitter import select_features
from plerec.data.labels import encode_labels
from plerec.data.table import load_splits, read_table
from plerec.data.tables import EncodedTable, pack_ids, wide_fields

CSV = "age,city,click,buy\n31,paris,1,0\n45,rome,0,\n,paris,1,1\n22,oslo,0,0\n"


def make_exp(features=None, tasks=None, **data):
    return experiment_from_dict(
        {
            "data": {"path": "/unused.csv", **data},
            "features": features or {"numeric": ["x"]},
            "tasks": tasks or [{"name": "ctr", "kind": "binary", "label": "click"}],
        }
    )


def frame(source="train.csv", **columns):
    out = pd.DataFrame(columns)
    out.attrs["source"] = source
    return out


# --- reading -----------------------------------------------------------------------------------


def test_csv_gzip_and_parquet_read_the_same_table(tmp_path):
    (tmp_path / "t.csv").write_text(CSV)
    with gzip.open(tmp_path / "t.csv.gz", "wt") as f:
        f.write(CSV)
    from_csv = read_table(tmp_path / "t.csv")
    from_csv.to_parquet(tmp_path / "t.parquet")
    from_gz = read_table(tmp_path / "t.csv.gz")
    from_parquet = read_table(tmp_path / "t.parquet")
    assert list(from_csv.columns) == ["age", "city", "click", "buy"] and len(from_csv) == 4
    assert from_csv["city"].tolist() == ["paris", "rome", "paris", "oslo"]
    assert np.isnan(from_csv["age"][2]) and np.isnan(from_csv["buy"][1])
    pd.testing.assert_frame_equal(from_gz, from_csv)
    pd.testing.assert_frame_equal(from_parquet, from_csv)


def test_csv_options_are_applied(tmp_path):
    (tmp_path / "t.txt").write_text("1; NA;x\n2; ?;y\n")
    csv = CsvOptions(header=False, names=("a", "b", "c"), sep=";", skipinitialspace=True, keep_default_na=False)
    table = read_table(tmp_path / "t.txt", csv)
    assert list(table.columns) == ["a", "b", "c"]
    assert table["b"].tolist() == ["NA", "?"]  # "NA" is a real value when keep_default_na is false
    table = read_table(
        tmp_path / "t.txt",
        CsvOptions(header=False, names=("a", "b", "c"), sep=";", skipinitialspace=True, na_values=("?",)),
    )
    assert table["b"].isna().tolist() == [True, True]


def test_tsv_uses_tabs(tmp_path):
    (tmp_path / "t.tsv").write_text("a\tb\n1\tx\n")
    assert read_table(tmp_path / "t.tsv").to_dict("list") == {"a": [1], "b": ["x"]}


def test_read_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"Data file .*missing\.csv does not exist"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "rows.xlsx").write_text("a\n1\n")
    with pytest.raises(ValueError, match=r"Expected .*rows\.xlsx to end in \.csv, .*but got 'rows\.xlsx'"):
        read_table(tmp_path / "rows.xlsx")
    (tmp_path / "t.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"Reading .*t\.csv: a CSV without a header needs \[data\.csv\] `names`"):
        read_table(tmp_path / "t.csv", CsvOptions(header=False))


def test_load_splits_names_a_missing_file(tmp_path):
    (tmp_path / "train.csv").write_text(CSV)
    data = DataConfig(train=str(tmp_path / "train.csv"), valid=str(tmp_path / "valid.csv"))
    with pytest.raises(ValueError, match=r"Data file .*valid\.csv does not exist"):
        load_splits(data, seed=0)


# --- splitting ---------------------------------------------------------------------------------


@pytest.fixture
def hundred_rows(tmp_path):
    path = tmp_path / "rows.csv"
    pd.DataFrame({"id": range(100), "x": np.arange(100) * 0.5}).to_csv(path, index=False)
    return path


def test_one_file_is_split_by_fractions(hundred_rows):
    data = DataConfig(path=str(hundred_rows), split=(0.6, 0.3, 0.1))
    splits = load_splits(data, seed=1)
    assert {k: len(v) for k, v in splits.items()} == {"train": 60, "valid": 30, "test": 10}
    ids = [set(splits[k]["id"]) for k in ("train", "valid", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(range(100))
    for name, part in splits.items():
        assert (part.index == part["id"]).all()  # index keeps the file's row numbers for error messages
        assert part.index.is_monotonic_increasing
        assert part.attrs["source"] == f"{hundred_rows} ({name} split)"
    assert ids[0] != set(range(60))  # shuffled, not cut in file order


def test_split_is_deterministic_for_a_seed(hundred_rows):
    data = DataConfig(path=str(hundred_rows))
    first, again = load_splits(data, seed=3), load_splits(data, seed=3)
    other = load_splits(data, seed=4)
    for name in ("train", "valid", "test"):
        assert first[name]["id"].tolist() == again[name]["id"].tolist()
    assert first["train"]["id"].tolist() != other["train"]["id"].tolist()
    pinned = DataConfig(path=str(hundred_rows), split_seed=3)
    assert load_splits(pinned, seed=99)["train"]["id"].tolist() == first["train"]["id"].tolist()


def test_split_without_test_rows(hundred_rows):
    splits = load_splits(DataConfig(path=str(hundred_rows), split=(0.75, 0.25, 0.0)), seed=0)
    assert sorted(splits) == ["train", "valid"] and len(splits["train"]) == 75


def test_tiny_file_with_an_empty_valid_split_errors(tmp_path):
    (tmp_path / "two.csv").write_text("x,click\n1,0\n2,1\n")
    with pytest.raises(ValueError, match=r"The valid split of .*two\.csv is empty \(2 rows"):
        load_splits(DataConfig(path=str(tmp_path / "two.csv"), split=(0.9, 0.05, 0.05)), seed=0)


def test_separate_files_are_used_as_given(tmp_path):
    for name, n in (("train", 5), ("valid", 3), ("test", 2)):
        pd.DataFrame({"id": [f"{name}{i}" for i in range(n)]}).to_csv(tmp_path / f"{name}.csv", index=False)
    data = DataConfig(
        train=str(tmp_path / "train.csv"), valid=str(tmp_path / "valid.csv"), test=str(tmp_path / "test.csv")
    )
    splits = load_splits(data, seed=0)
    assert splits["train"]["id"].tolist() == [f"train{i}" for i in range(5)]
    assert splits["valid"]["id"].tolist() == ["valid0", "valid1", "valid2"]
    assert splits["test"]["id"].tolist() == ["test0", "test1"]
    assert splits["valid"].attrs["source"] == str(tmp_path / "valid.csv")
    no_test = DataConfig(train=str(tmp_path / "train.csv"), valid=str(tmp_path / "valid.csv"))
    assert sorted(load_splits(no_test, seed=0)) == ["train", "valid"]


# --- vocabularies and statistics ---------------------------------------------------------------


def test_vocabularies_and_statistics_come_from_train_only():
    exp = make_exp({"categorical": ["city"], "numeric": ["age"]})
    train = frame(city=["rome", "oslo", "rome", "paris"], age=[20.0, 30.0, 40.0, 50.0], click=[0, 1, 0, 1])
    valid = frame("valid.csv", city=["oslo", "lima", "rome"], age=[1000.0, -5.0, 30.0], click=[1, 1, 0])
    enc = Encoder.fit(exp, train)
    assert enc.vocabs == {"city": ["rome", "oslo", "paris"]}  # frequency, then text
    assert enc.vocab_sizes == [4]
    assert enc.means["age"] == pytest.approx(35.0)
    assert enc.stds["age"] == pytest.approx(np.std([20.0, 30.0, 40.0, 50.0]))
    out = enc.transform(valid)
    assert out.sparse[:, 0].tolist() == [2, 0, 1]  # lima was never seen in training: the reserved id 0
    expected = (np.array([1000.0, -5.0, 30.0]) - 35.0) / np.std([20.0, 30.0, 40.0, 50.0])
    np.testing.assert_allclose(out.dense[:, 0].numpy(), expected, rtol=1e-6)
    assert out.source == "valid.csv" and len(out) == 3


def test_ids_do_not_depend_on_the_row_order_of_train():
    exp = make_exp({"categorical": ["c", "n"]})
    c = ["b", "a", "c", "a", "b", "d", "a"]
    n = [3, 1, 2, 2, 5, 4, 1]
    train = frame(c=c, n=n, click=[0] * 7)
    enc = Encoder.fit(exp, train)
    assert enc.vocabs["c"] == ["a", "b", "c", "d"]
    assert enc.vocabs["n"] == [1, 2, 3, 4, 5]
    assert all(type(v) is int for v in enc.vocabs["n"])  # plain Python values: they are saved in checkpoints
    for seed in range(3):
        shuffled = train.sample(frac=1.0, random_state=seed)
        assert Encoder.fit(exp, shuffled).vocabs == enc.vocabs
    probe = frame(c=["d", "a", "zz"], n=[5, 1, 9], click=[0, 0, 0])
    assert enc.transform(probe).sparse.tolist() == [[4, 5], [1, 1], [0, 0]]


def test_integer_columns_take_the_array_path_with_the_same_vocabulary_and_ids():
    """Plain integer columns are counted and looked up as arrays; the result must be that of the per-value
    text keys the other columns use: same order (count, then the key's text: "10" < "9"), same ids, 7 in
    the data matching a vocabulary entry 7, 7.0 or "7", the first such entry winning, and chunks."""
    from plerec.data.fitter import EncoderFitter

    exp = make_exp({"categorical": ["n"]})
    rng = np.random.default_rng(0)
    values = rng.zipf(1.5, 3000) % 5000 - 40  # negatives, ties in count, keys whose text sorts apart
    as_int = frame(n=values.astype(np.int32), click=[0] * 3000)
    as_text = frame(n=[str(v) for v in values], click=[0] * 3000)
    fast = Encoder.fit(exp, as_int)
    assert list(map(str, fast.vocabs["n"])) == Encoder.fit(exp, as_text).vocabs["n"]
    assert all(type(v) is int for v in fast.vocabs["n"])
    chunked = EncoderFitter(exp, as_int.iloc[:700])
    for start in range(0, 3000, 700):
        chunked.update(as_int.iloc[start : start + 700])
    assert chunked.finish().vocabs == fast.vocabs
    # a chunk of text after chunks of integers counts 7 and "7" as one category
    mixed = EncoderFitter(exp, as_int.iloc[:1500]).update(as_int.iloc[:1500]).update(as_text.iloc[1500:])
    assert list(map(str, mixed.finish().vocabs["n"])) == list(map(str, fast.vocabs["n"]))
    probe = np.array([values[0], values[5], 123456, -40, 0, np.iinfo(np.int32).max], dtype=np.int64)
    expected = fast.transform(frame(n=[str(v) for v in probe], click=[0] * 6)).sparse[:, 0].tolist()
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint32):
        kept = probe[(probe >= np.iinfo(dtype).min) & (probe <= np.iinfo(dtype).max)]
        got = fast.transform(frame(n=kept.astype(dtype), click=[0] * len(kept))).sparse[:, 0].tolist()
        assert got == [e for e, v in zip(expected, probe, strict=True) if v in kept]
    assert expected[2] == 0 and expected[5] == 0  # never seen in training
    # a vocabulary read from text or floats: 7 finds the first entry whose key is "7"
    enc = Encoder(categorical=["n"], numeric=[], vocabs={"n": ["x", 7.0, "7", 3, "3.0", 1e20, True, "-2"]})
    got = enc.transform(frame(n=np.array([7, 3, -2, 1, 0]), click=[0] * 5), labels=False).sparse[:, 0].tolist()
    assert got == [2, 4, 8, 0, 0]


def test_ids_are_the_same_after_the_lookup_tables_are_dropped():
    data = frame(n=np.array([5, 9, 5, 2, 9, 9]), t=["a", "b", "a", "c", "b", "d"], click=[0, 1, 0, 1, 0, 1])
    enc = Encoder.fit(make_exp({"categorical": ["n", "t"]}), data)
    before = enc.transform(data).sparse
    assert enc._int_lookup and enc._lookup  # built by the transform
    enc.drop_lookups()
    assert not enc._int_lookup and not enc._lookup
    assert torch.equal(enc.transform(data).sparse, before)


def test_missing_categories_map_to_id_zero():
    exp = make_exp({"categorical": ["c"]})
    enc = Encoder.fit(exp, frame(c=["a", None, "a", "b"], click=[0, 1, 0, 1]))
    assert enc.vocabs["c"] == ["a", "b"]
    assert enc.transform(frame(c=[None, "b", "a"], click=[0, 0, 0])).sparse[:, 0].tolist() == [0, 2, 1]


def test_encoder_state_dict_round_trips():
    exp = make_exp({"categorical": ["c"], "numeric": ["x"]})
    train = frame(c=["a", "b"], x=[1.0, None], click=[0, 1])
    enc = Encoder.fit(exp, train)
    again = Encoder.from_state_dict(enc.state_dict())
    assert again == enc
    assert torch.equal(again.transform(train).dense, enc.transform(train).dense)


# --- missing and invalid numeric values --------------------------------------------------------


def test_missing_numeric_is_imputed_with_the_train_mean_and_an_indicator():
    exp = make_exp({"numeric": ["x", "y"]})
    train = frame(x=[1.0, None, 3.0, 8.0], y=[1.0, 2.0, 3.0, 4.0], click=[0, 1, 0, 1])
    enc = Encoder.fit(exp, train)
    assert enc.indicators == ["x"] and enc.dense_names == ["x", "y", "x__missing"]
    assert enc.means["x"] == pytest.approx(4.0)
    assert enc.stds["x"] == pytest.approx(np.std([1.0, 3.0, 8.0]))
    out = enc.transform(train)
    assert out.dense.shape == (4, 3) and out.dense.dtype == torch.float32
    assert out.dense[1, 0] == 0.0  # the training mean, standardised
    assert out.dense[:, 2].tolist() == [0.0, 1.0, 0.0, 0.0]
    valid = frame("valid.csv", x=[None, 4.0], y=[None, 2.5], click=[0, 1])
    out = enc.transform(valid)
    assert out.dense[:, 0].tolist() == [0.0, 0.0] and out.dense[:, 2].tolist() == [1.0, 0.0]
    assert out.dense[0, 1] == 0.0  # y had no gap in train: imputed, but no indicator column
    assert torch.isfinite(out.dense).all()


def test_blank_strings_count_as_missing(tmp_path):
    (tmp_path / "t.csv").write_text("x,c,click\n1,a,1\n,b,0\n3, ,\n")
    train = read_table(tmp_path / "t.csv", CsvOptions(keep_default_na=False))
    exp = make_exp({"numeric": ["x"], "categorical": ["c"]})
    enc = Encoder.fit(exp, train)
    assert enc.means["x"] == pytest.approx(2.0) and enc.indicators == ["x"]
    out = enc.transform(train)
    assert out.dense[:, 1].tolist() == [0.0, 1.0, 0.0]
    assert out.label_mask[:, 0].tolist() == [True, True, False]
    assert out.labels[:, 0].tolist() == [1.0, 0.0, 0.0]


def test_missing_numeric_error_names_column_and_row():
    exp = make_exp({"numeric": ["age"]}, missing_numeric="error")
    train = frame(age=[1.0, 2.0, None, None], click=[0, 1, 0, 1], source="rows.csv (train split)")
    train.index = [10, 11, 12, 13]
    with pytest.raises(
        ValueError, match=r"Numeric column `age` of rows\.csv \(train split\), row 12: value is missing \(2 rows"
    ):
        Encoder.fit(exp, train)
    enc = Encoder.fit(exp, frame(age=[1.0, 2.0], click=[0, 1]))
    with pytest.raises(ValueError, match=r"Numeric column `age` of valid\.csv, row 1: value is missing"):
        enc.transform(frame("valid.csv", age=[1.0, None], click=[0, 1]))


@pytest.mark.parametrize("bad, shown", [("abc", "'abc'"), (np.inf, "inf")])
def test_non_numeric_value_in_a_numeric_column_names_column_row_and_value(bad, shown):
    exp = make_exp({"numeric": ["age"]})
    train = frame(age=[1, 2, bad, 4], click=[0, 1, 0, 1])
    with pytest.raises(
        ValueError, match=rf"Numeric column `age` of train\.csv, row 2: expected a finite number, but got {shown}"
    ):
        Encoder.fit(exp, train)
    enc = Encoder.fit(exp, frame(age=[1.0, 2.0], click=[0, 1]))
    with pytest.raises(ValueError, match=rf"`age` of valid\.csv, row 0: expected a finite number, but got {shown}"):
        enc.transform(frame("valid.csv", age=[bad, 1.0], click=[0, 1]))


def test_feature_missing_from_a_later_split_errors():
    exp = make_exp({"numeric": ["age"]})
    enc = Encoder.fit(exp, frame(age=[1.0, 2.0], click=[0, 1]))
    with pytest.raises(
        ValueError, match=r"Column `age` used by a feature is not in valid\.csv\. Did you mean `agee`\?"
    ):
        enc.transform(frame("valid.csv", agee=[1.0], click=[1]))


# --- labels and sample spaces ------------------------------------------------------------------


def tasks(*configs: dict) -> list[TaskConfig]:
    return [TaskConfig(**c) for c in configs]


def test_empty_or_nan_label_is_masked():
    data = frame(click=[1.0, None, 0.0, np.nan], watch=["0.5", "", " ", "2"])
    labels, mask = encode_labels(
        tasks(
            {"name": "ctr", "kind": "binary", "label": "click"}, {"name": "vcr", "kind": "regression", "label": "watch"}
        ),
        data,
        "t.csv",
    )
    assert labels.dtype == np.float32 and mask.dtype == bool and labels.shape == (4, 2)
    assert mask[:, 0].tolist() == [True, False, True, False]
    assert labels[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert mask[:, 1].tolist() == [True, False, False, True]
    assert labels[:, 1].tolist() == [0.5, 0.0, 0.0, 2.0]


@pytest.mark.parametrize("bad, shown", [(2, "2"), ("yes", "'yes'"), (0.5, "0.5")])
def test_binary_label_must_be_0_or_1(bad, shown):
    data = frame(click=[0, 1, bad, 1] if bad != "yes" else ["0", "1", "yes", "1"])
    data.index = [5, 6, 7, 8]
    with pytest.raises(
        ValueError,
        match=rf"Label column `click` of task `ctr` in t\.csv, row 7: expected 0 or 1 .*but got {shown}\. Use `cond",
    ):
        encode_labels(tasks({"name": "ctr", "kind": "binary", "label": "click"}), data, "t.csv")


def test_regression_label_must_be_finite():
    data = frame(watch=[0.1, np.inf])
    with pytest.raises(
        ValueError, match=r"`watch` of task `vcr` in t\.csv, row 1: expected a finite number, but got inf"
    ):
        encode_labels(tasks({"name": "vcr", "kind": "regression", "label": "watch"}), data, "t.csv")


def test_condition_labels():
    data = frame(
        marital=[" Never married", "Married", None, "Never married"],
        income=["50000+.", "- 50000.", "50000+.", "- 50000."],
        age=[17, 40, 65, 30],
    )
    labels, mask = encode_labels(
        tasks(
            {"name": "single", "kind": "binary", "condition": 'marital == "Never married"'},
            {"name": "rich", "kind": "binary", "condition": "income != '- 50000.'"},
            {"name": "adult", "kind": "binary", "condition": "age >= 18"},
        ),
        data,
        "t.csv",
    )
    assert labels[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]  # whitespace around text is ignored
    assert mask[:, 0].tolist() == [True, True, False, True]  # a missing source value is outside the space
    assert labels[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0] and mask[:, 1].all()
    assert labels[:, 2].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_condition_on_text_in_a_numeric_comparison_names_the_value():
    data = frame(age=["17", "forty"])
    with pytest.raises(
        ValueError,
        match=r"Column `age` of t\.csv, row 1: expected a number to compare in `age >= 18\.0`, but got 'forty'",
    ):
        encode_labels(tasks({"name": "adult", "kind": "binary", "condition": "age >= 18"}), data, "t.csv")


def test_space_condition_restricts_the_mask():
    data = frame(click=[1, 0, 1, None, 0], buy=[1, 0, 0, 1, None])
    cvr = {"name": "cvr", "kind": "binary", "label": "buy", "space": "click == 1"}
    not_clicked = {"name": "skip", "kind": "binary", "label": "buy", "space": "click != 1"}
    labels, mask = encode_labels(tasks(cvr, not_clicked), data, "t.csv")
    assert mask[:, 0].tolist() == [True, False, True, False, False]
    assert labels[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # row 3 bought but never clicked: outside
    assert mask[:, 1].tolist() == [False, True, False, False, False]  # a missing click is in neither space


def test_space_column_missing_from_the_file_errors():
    exp = make_exp(tasks=[{"name": "cvr", "kind": "binary", "label": "buy", "space": "clik == 1"}])
    with pytest.raises(ValueError, match=r"Column `clik` used by a task is not in train\.csv\. Did you mean `click`\?"):
        Encoder.fit(exp, frame(x=[1.0], buy=[1], click=[1]))
    enc = Encoder.fit(exp, frame(x=[1.0], buy=[1], clik=[1]))
    with pytest.raises(ValueError, match=r"Column `clik` used by task `cvr` is not in valid\.csv"):
        enc.transform(frame("valid.csv", x=[1.0], buy=[1]))
    with pytest.raises(ValueError, match=r"Column `buy` used by task `cvr` is not in valid\.csv"):
        enc.transform(frame("valid.csv", x=[1.0], clik=[1]))


def test_transform_builds_labels_and_mask_per_task():
    exp = make_exp(
        {"numeric": ["x"]},
        tasks=[
            {"name": "ctr", "kind": "binary", "label": "click"},
            {"name": "cvr", "kind": "binary", "label": "buy", "space": "click == 1"},
        ],
    )
    data = frame(x=[1.0, 2.0, 3.0], click=[1, 0, 1], buy=[1, 1, None])
    out = Encoder.fit(exp, data).transform(data)
    assert out.labels.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    assert out.label_mask.tolist() == [[True, True], [True, False], [True, False]]
    batch = out.batch(slice(1, 3))
    assert batch.labels.shape == (2, 2) and batch.dense[:, 0].tolist() == out.dense[1:, 0].tolist()


# --- feature selection -------------------------------------------------------------------------

COLUMNS = dict(x1=[0.1, 0.2], x2=[0.3, 0.4], y=[1.0, 2.0], city=["a", "b"], click=[0, 1])


def test_glob_patterns_expand_in_file_order():
    exp = make_exp({"numeric": ["x*", "y"], "categorical": ["c?ty"]})
    data = frame(**COLUMNS)
    assert select_features(exp, list(data.columns), data, "t.csv") == (["city"], ["x1", "x2", "y"], {})


@pytest.mark.parametrize(
    "features, message",
    [
        ({"numeric": ["x11"]}, r"Column `x11` listed in \[features\] numeric is not in t\.csv\. Did you mean `x1`\?"),
        ({"categorical": ["cty"]}, r"Column `cty` listed in \[features\] categorical .*Did you mean `city`\?"),
        ({"numeric": ["z*"]}, r"Column `z\*` listed in \[features\] numeric is not in t\.csv"),
        ({"numeric": ["x1"], "categorical": ["x*"]}, r"Columns \['x1'\] are listed as both categorical and numeric"),
        ({"numeric": ["x1", "click"]}, r"Columns \['click'\] define a task's label or sample space"),
    ],
)
def test_feature_selection_errors(features, message):
    data = frame(**COLUMNS)
    with pytest.raises(ValueError, match=message):
        select_features(make_exp(features), list(data.columns), data, "t.csv")


def test_a_space_column_cannot_be_a_feature():
    exp = make_exp(
        {"categorical": ["city", "seen"]},
        tasks=[{"name": "cvr", "kind": "binary", "label": "click", "space": "seen == 1"}],
    )
    data = frame(**COLUMNS, seen=[1, 1])
    with pytest.raises(ValueError, match=r"Columns \['seen'\] define a task's label or sample space"):
        select_features(exp, list(data.columns), data, "t.csv")


def test_exclude_drops_columns_and_must_exist():
    exp = make_exp({"numeric": ["x*", "y"]}, exclude=["x2"])
    data = frame(**COLUMNS)
    assert select_features(exp, list(data.columns), data, "t.csv")[1] == ["x1", "y"]
    exp = make_exp({"numeric": ["x*"]}, exclude=["x9"])
    with pytest.raises(ValueError, match=r"Column `x9` used by \[data\] exclude is not in t\.csv"):
        select_features(exp, list(data.columns), data, "t.csv")


def test_auto_infers_kinds_and_skips_task_and_excluded_columns():
    exp = make_exp(
        {"auto": True, "auto_max_int_categories": 3, "numeric": ["level"]},
        tasks=[
            {"name": "ctr", "kind": "binary", "label": "click"},
            {"name": "cvr", "kind": "binary", "condition": 'outcome == "buy"', "space": "seen == 1"},
        ],
        exclude=["weight"],
    )
    data = frame(
        price=[1.5, 2.5, 3.5, 4.5],
        city=["a", "b", "a", "c"],
        day=[1, 2, 1, 2],
        count=[1, 2, 3, 4],
        flag=[True, False, True, True],
        level=[1, 2, 3, 4],
        weight=[0.1, 0.2, 0.3, 0.4],
        click=[0, 1, 0, 1],
        outcome=["buy", "no", "buy", "no"],
        seen=[1, 1, 0, 1],
    )
    categorical, numeric, inferred = select_features(exp, list(data.columns), data, "t.csv")
    assert categorical == ["city", "day", "flag"]
    assert numeric == ["level", "price", "count"]
    assert inferred == {
        "price": "numeric",
        "city": "categorical",
        "day": "categorical",
        "count": "numeric",
        "flag": "categorical",
    }
    enc = Encoder.fit(exp, data)
    assert enc.categorical == categorical and enc.numeric == numeric and enc.inferred == inferred


def test_no_feature_left_errors():
    exp = make_exp({"auto": True}, exclude=["x"])
    data = frame(x=[1.0], click=[1])
    with pytest.raises(ValueError, match=r"No feature columns left in t\.csv after exclusions"):
        select_features(exp, list(data.columns), data, "t.csv")


@pytest.mark.parametrize("size, columns", [(10, 1), (32766, 1), (40000, 2)])
def test_sparse_ids_are_int16_and_packed_where_a_vocabulary_is_wider(size, columns):
    """Up to 32,767 ids a field is one int16 column; a wider one takes a second int16 column (its high
    bits) instead of widening the whole table to int32. The ids come back whole."""
    exp = make_exp({"categorical": ["c"]})
    data = frame(c=np.arange(size), click=np.zeros(size, dtype=int))
    out = Encoder.fit(exp, data).transform(data)
    assert out.sparse.dtype == torch.int16 and out.sparse.shape == (size, columns)
    ids = out.ids()[:, 0].long()
    assert ids.min() == 1 and ids.max() == size and len(ids.unique()) == size


def test_packed_ids_round_trip_at_the_bit_boundaries_in_every_access():
    sizes = [5, 100_001, 7, 40_000]
    ids = np.array(
        [[0, 0, 0, 0], [4, 32767, 6, 32768], [1, 32768, 2, 39999], [2, 100_000, 3, 32767], [3, 65536, 1, 12345]]
    )
    assert wide_fields(sizes) == (1, 3)
    packed = pack_ids(ids, sizes)
    assert packed.dtype == np.int16 and packed.shape == (5, 6) and (packed >= 0).all()
    n = len(ids)
    table = EncodedTable(
        torch.from_numpy(packed), torch.zeros(n, 1), torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool), wide=(1, 3)
    )
    assert table.ids().tolist() == ids.tolist()
    assert table.batch(torch.tensor([3, 0, 4])).sparse.tolist() == ids[[3, 0, 4]].tolist()
    assert table.batch(slice(1, 3)).sparse.tolist() == ids[1:3].tolist()
    assert table.batch_table(slice(2, 5)).ids().tolist() == ids[2:5].tolist()
    # Narrow tables are stored as they are; a vocabulary beyond two int16 columns widens instead.
    assert wide_fields([5, 32767]) == () and pack_ids(ids[:, [0, 2]], [5, 7]).dtype == np.int16
    assert wide_fields([5, 2**31]) == () and pack_ids(ids, [5, 2**31, 7, 40_000]).dtype == np.int64


def test_packed_ids_are_the_same_read_whole_in_chunks_from_csv_or_parquet_and_streamed(tmp_path):
    from plerec.data.encode import encode_file
    from plerec.data.stream import ParquetBatches

    rng = np.random.default_rng(0)
    n = 40_000
    data = frame(wide=rng.permutation(n), narrow=rng.integers(0, 50, n), click=rng.integers(0, 2, n))
    exp = make_exp({"categorical": ["narrow", "wide"]})
    encoder = Encoder.fit(exp, data)
    whole = encoder.transform(data)
    assert whole.wide == (1,) and whole.sparse.shape == (n, 3)
    data.to_csv(tmp_path / "t.csv", index=False)
    data.to_parquet(tmp_path / "t.parquet", row_group_size=15_000)
    for path in (tmp_path / "t.csv", tmp_path / "t.parquet"):
        chunked = encode_file(str(path), encoder, chunk_rows=7_000)
        assert chunked.wide == (1,) and torch.equal(chunked.sparse, whole.sparse)
    streamed = torch.cat([b.sparse for b in ParquetBatches(str(tmp_path / "t.parquet"), encoder, 4096, seed=0).epoch()])
    assert sorted(map(tuple, streamed.tolist())) == sorted(map(tuple, whole.ids().tolist()))


@pytest.mark.parametrize(
    "cond, column, expected",
    [
        (Condition("c", "!=", 1.0), [1.0, np.nan, 2.0], [False, False, True]),
        (Condition("c", "<", 5.0), pd.Series(["1", "", "7"], dtype=object), [True, False, False]),
        (Condition("c", "!=", "a"), pd.Series(["a", None, "b"], dtype="str"), [False, False, True]),
        (Condition("c", "==", True), [True, False, True], [True, False, True]),
    ],
)
def test_evaluate_condition_treats_missing_values_as_false(cond, column, expected):
    assert evaluate_condition(cond, pd.Series(column), "t.csv").tolist() == expected


# --- Parquet chunks without pandas -------------------------------------------------------------


def _typed_table(rows: int, seed: int = 0) -> pd.DataFrame:
    """Columns of every plain number type the encoder reads without pandas, with missing floats, plus a
    float category and a hashed one, which go through pandas."""
    rng = np.random.default_rng(seed)
    nan_at = rng.random(rows) < 0.1
    return pd.DataFrame(
        {
            "c_i8": rng.integers(-5, 5, rows).astype(np.int8),
            "c_i64": rng.choice([-(2**62), 7, 2**40, 3], rows),
            "c_u16": rng.integers(0, 900, rows).astype(np.uint16),
            "c_f": np.where(nan_at, np.nan, rng.integers(0, 4, rows).astype(float)),
            "c_hash": rng.integers(0, 10_000, rows),
            "n_f32": np.where(rng.random(rows) < 0.2, np.nan, rng.normal(3, 2, rows)).astype(np.float32),
            "n_f64": rng.normal(-1, 10, rows),
            "n_i32": rng.integers(-1000, 1000, rows).astype(np.int32),
            "click": rng.integers(0, 2, rows).astype(np.int8),
            "buy": np.where(nan_at, np.nan, rng.integers(0, 2, rows)),
            "watch": np.where(rng.random(rows) < 0.3, np.nan, rng.normal(size=rows)).astype(np.float32),
            "age": rng.integers(10, 80, rows).astype(np.int16),
            "score": np.where(nan_at, np.nan, rng.normal(size=rows)),
        }
    )


def _typed_exp(path):
    return experiment_from_dict(
        {
            "data": {"train": str(path), "valid": str(path), "missing_numeric": "impute"},
            "features": {
                "categorical": ["c_i8", "c_i64", "c_u16", "c_f", "c_hash"],
                "numeric": ["n_f32", "n_f64", "n_i32"],
                "hash_buckets": {"c_hash": 64},
            },
            "tasks": [
                {"name": "ctr", "kind": "binary", "label": "click"},
                {"name": "cvr", "kind": "binary", "label": "buy", "space": "click == 1"},
                {"name": "watch", "kind": "regression", "label": "watch", "space": "score > -0.5"},
                {"name": "adult", "kind": "binary", "condition": "age >= 18"},
            ],
        }
    )


def test_parquet_chunks_read_without_pandas_encode_exactly_as_through_pandas(tmp_path, monkeypatch):
    import plerec.data.columns as columns_module
    import plerec.data.labels as labels_module
    from plerec.data.encode import encode_file
    from plerec.data.fitter import fit_encoder_chunked
    from plerec.data.stream import ParquetBatches

    path = tmp_path / "typed.parquet"
    _typed_table(3_000).to_parquet(path, row_group_size=1_100)
    exp = _typed_exp(path)

    def run():
        encoder = fit_encoder_chunked(exp, str(path), chunk_rows=700)
        table = encode_file(str(path), encoder, chunk_rows=700)
        streamed = next(iter(ParquetBatches(str(path), encoder, 3_000, seed=0).epoch()))
        return encoder.state_dict(), table, streamed

    fast = run()
    with monkeypatch.context() as patch:  # every column through pandas, as before the plain-number path
        patch.setattr(columns_module, "plain_column", lambda frame, col: None)
        patch.setattr(labels_module, "plain_column", lambda frame, col: None)
        reference = run()
    assert fast[0] == reference[0]
    for name in ("sparse", "dense", "labels", "label_mask"):
        assert torch.equal(getattr(fast[1], name), getattr(reference[1], name)), name
        assert torch.equal(getattr(fast[2], name), getattr(reference[2], name)), name
    assert fast[1].label_mask.float().mean(0).tolist() != [1.0] * 4  # missing labels and spaces were exercised


def test_arrow_frame_reads_plain_columns_like_pandas_and_leaves_the_rest_to_it():
    import pyarrow as pa

    from plerec.data.frames import ArrowFrame

    table = pa.table(
        {
            "f": pa.array([1.5, None, 3.0, None, 5.0, 6.5, None], pa.float32()),
            "i": pa.array([1, 2, 3, 4, 5, 6, 7], pa.int16()),
            "gap": pa.array([1, 2, 3, None, 5, 6, 7], pa.int64()),
            "u64": pa.array([1, 2, 3, 4, 5, 6, 7], pa.uint64()),
            "b": pa.array([True, False] * 3 + [True]),
            "s": pa.array(list("abcdefg")),
        }
    )
    batch = table.to_batches()[0].slice(2, 4)  # an offset into the buffers, and into the validity bits
    frame = ArrowFrame(batch, first_row=100, source="x.parquet")
    assert frame.plain("f").dtype == np.float32 and frame.plain("i").dtype == np.int16
    as_pandas = batch.to_pandas()
    np.testing.assert_array_equal(frame.plain("f"), as_pandas["f"].to_numpy())
    np.testing.assert_array_equal(frame.plain("i"), as_pandas["i"].to_numpy())
    assert all(frame.plain(c) is None for c in ("gap", "u64", "b", "s"))
    assert list(frame["s"].index) == [100, 101, 102, 103] and frame["s"].tolist() == list("cdef")
    assert frame.attrs["source"] == "x.parquet" and len(frame) == 4
    # A file written from pandas' nullable integers is read as pandas reads it.
    nullable = pd.DataFrame({"n": pd.array([1, 2, 3], dtype="Int64")})
    written = pa.Table.from_pandas(nullable, preserve_index=False).to_batches()[0]
    assert ArrowFrame(written, 0, "y.parquet").plain("n") is None


def test_a_run_on_parquet_files_of_plain_numbers_never_imports_pandas(tmp_path):
    import subprocess
    import sys

    table = _typed_table(600).drop(columns=["c_f", "c_hash"])
    for split, rows in (("train", slice(0, 400)), ("valid", slice(400, 500)), ("test", slice(500, 600))):
        table.iloc[rows].to_parquet(tmp_path / f"{split}.parquet")
    script = f"""
import sys
from plerec.config import experiment_from_dict
from plerec.train import fit, predict
exp = experiment_from_dict({{
    "data": {{s: "{tmp_path}/" + s + ".parquet" for s in ("train", "valid", "test")}},
    "features": {{"categorical": ["c_i8", "c_i64", "c_u16"], "numeric": ["n_f32", "n_f64", "n_i32"]}},
    "tasks": [{{"name": "ctr", "kind": "binary", "label": "click"}},
              {{"name": "cvr", "kind": "binary", "label": "buy", "space": "click == 1"}}],
    "model": {{"name": "ple", "expert_dims": [4], "tower_dims": [4], "embedding_dim": 2}},
    "train": {{"epochs": 1, "batch_size": 64, "progress": False}},
}})
result = fit(exp)
assert set(result.metrics) == {{"valid", "test"}}, result.metrics
print("pandas imported:", "pandas" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pandas imported: False" in done.stdout


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("n_f64", np.inf, r"Numeric column `n_f64` of .*typed\.parquet, row 1234: expected a finite number, .* inf"),
        ("click", 2, r"Label column `click` of task `ctr` in .*typed\.parquet, row 1234: expected 0 or 1.*got 2"),
        ("watch", -np.inf, r"Label column `watch` of task `watch` in .*typed\.parquet, row 1234: expected a finite"),
    ],
)
def test_bad_values_in_plain_parquet_columns_name_the_file_row(tmp_path, column, value, message):
    from plerec.data.fitter import fit_encoder_chunked

    table = _typed_table(3_000)
    table.loc[1234, column] = value
    path = tmp_path / "typed.parquet"
    table.to_parquet(path, row_group_size=1_100)
    with pytest.raises(ValueError, match=message):
        fit_encoder_chunked(_typed_exp(path), str(path), chunk_rows=700)


def test_labels_are_stored_as_uint8_when_every_task_is_binary_and_batches_carry_float32():
    data = frame(x=[1.0, 2.0, 3.0, 4.0], click=[1, 0, None, 1], watch=[0.5, None, 2.0, -1.0])
    binary = Encoder.fit(make_exp(), data)
    table = binary.transform(data)
    assert table.labels.dtype == torch.uint8 and table.labels[:, 0].tolist() == [1, 0, 0, 1]
    batch = table.batch(torch.tensor([3, 0, 2]))
    assert batch.labels.dtype == torch.float32 and batch.labels[:, 0].tolist() == [1.0, 1.0, 0.0]
    assert table.batch(slice(0, 2)).labels.dtype == torch.float32
    mixed = make_exp(
        tasks=[
            {"name": "ctr", "kind": "binary", "label": "click"},
            {"name": "w", "kind": "regression", "label": "watch"},
        ]
    )
    table = Encoder.fit(mixed, data).transform(data)
    assert table.labels.dtype == torch.float32 and table.labels[:, 1].tolist() == [0.5, 0.0, 2.0, -1.0]


def test_integer_vocabularies_are_arrays_that_read_and_serialise_as_lists():
    import json

    from plerec.data.vocab import IntegerVocabulary

    values = np.array([5, 9, 5, 2, 9, 9, -3, 2**40])
    data = frame(n=values, click=[0, 1] * 4)
    enc = Encoder.fit(make_exp({"categorical": ["n"]}), data)
    vocab = enc.vocabs["n"]
    assert isinstance(vocab, IntegerVocabulary) and vocab.values.dtype == np.int64
    as_list = [9, 5, -3, 2**40, 2]  # by count, then by the key's text ("-3" < "1099511627776" < "2")
    assert vocab == as_list and as_list == vocab and list(vocab) == as_list and len(vocab) == 5
    assert vocab[0] == 9 and type(vocab[0]) is int and vocab[1:3] == [5, -3] and vocab.index(5) == 1 and 7 not in vocab
    state = json.loads(json.dumps(enc.state_dict()))
    assert state["vocabs"]["n"] == as_list
    back = Encoder.from_state_dict(state)
    assert isinstance(back.vocabs["n"], IntegerVocabulary) and back == enc
    # the same ids as a plain-list vocabulary, seen and unseen values alike
    probe = frame(n=np.array([2**40, 9, 7, -3, 5]), click=[0] * 5)
    listed = Encoder(categorical=["n"], numeric=[], vocabs={"n": as_list}, tasks=enc.tasks)
    assert torch.equal(back.transform(probe).sparse, listed.transform(probe).sparse)
    assert back.transform(probe).sparse[:, 0].tolist() == [4, 1, 0, 3, 2]
    # a hand-written vocabulary that repeats an integer: the first entry wins, as with a list
    entries = (np.random.default_rng(1).permutation(600) % 50).tolist()  # each value 12 times
    repeated = Encoder.from_state_dict({**state, "vocabs": {"n": entries}})
    assert isinstance(repeated.vocabs["n"], IntegerVocabulary)
    got = repeated.transform(frame(n=np.arange(51), click=[0] * 51)).sparse[:, 0].tolist()
    assert got == [entries.index(v) + 1 for v in range(50)] + [0]
    # a vocabulary that is not all plain ints stays a list
    assert Encoder.from_state_dict({**state, "vocabs": {"n": [1, "a", True]}}).vocabs["n"] == [1, "a", True]


def test_a_constant_column_standardises_alike_read_whole_or_a_row_at_a_time(tmp_path):
    """Found by hypothesis: three equal values have a rounding-noise std (1e-10) when averaged at once and
    exactly 0 when merged row by row; both must give the same encoding."""
    from plerec.data.encode import encode_file
    from plerec.data.fitter import fit_encoder_chunked
    from plerec.data.table import read_table

    path = tmp_path / "t.csv"
    path.write_text("x,y\n0,699051.3147888889\n1,699051.3147888889\n0,699051.3147888889\n")
    exp = experiment_from_dict(
        {
            "data": {"train": str(path), "valid": str(path)},
            "features": {"numeric": ["y"]},
            "tasks": [{"name": "t", "kind": "binary", "label": "x"}],
        }
    )
    whole = Encoder.fit(exp, read_table(path)).transform(read_table(path))
    chunked = encode_file(str(path), fit_encoder_chunked(exp, str(path), chunk_rows=1), chunk_rows=1)
    torch.testing.assert_close(whole.dense, chunked.dense, rtol=0, atol=1e-6)  # the mean's own rounding: 1e-10
    torch.testing.assert_close(whole.dense, torch.zeros(3, 1), rtol=0, atol=1e-6)
