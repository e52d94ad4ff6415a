"""Files as they come (issue 7): one file split into train / valid next to a separate test file; CSV files
with lines before the header and comment lines; conditions with `in [...]`, `not in [...]`, `and`, `or`."""

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plerec.cli import main
from plerec.config import Combination, Condition, CsvOptions, DataConfig, TaskConfig, experiment_from_dict
from plerec.data.conditions import evaluate_condition, known_rows, plain_condition
from plerec.data.fitter import fit_encoder_chunked
from plerec.data.labels import encode_labels
from plerec.data.stream import check_stream
from plerec.data.table import iter_frames, load_splits, read_table
from plerec.train import prepare_data

# --- one file split into train / valid, the test split from its own file ---------------------------


def _ids(path: Path, start: int, rows: int) -> str:
    pd.DataFrame({"id": np.arange(start, start + rows), "x": np.linspace(0, 1, rows)}).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("split", [(0.7, 0.3), (0.7, 0.3, 0.0)])
def test_path_with_a_test_file_splits_path_in_two_and_tests_on_the_file(tmp_path, split):
    data = DataConfig(path=_ids(tmp_path / "all.csv", 0, 101), test=_ids(tmp_path / "test.csv", 1000, 17), split=split)
    tables = load_splits(data, seed=3)
    train, valid, test = (set(tables[s]["id"]) for s in ("train", "valid", "test"))
    assert (len(train), len(valid)) == (71, 30)  # valid takes every row train leaves: none is lost to rounding
    assert train | valid == set(range(101)) and not train & valid
    assert test == set(range(1000, 1017))  # only the test file's rows, none of `path`
    assert tables["test"].attrs["source"] == data.test and tables["test"].index.tolist() == list(range(17))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"path": "a.csv", "test": "t.csv"},  # the default split has a test fraction
            r"`split` to be two fractions \(train, valid\) summing to 1, both > 0, when `test` names a separate "
            r"test file \(e\.g\. split = \[0\.9, 0\.1\]; \[0\.9, 0\.1, 0\] also works\), but got \[0\.8, 0\.1, 0\.1\]",
        ),
        ({"path": "a.csv", "test": "t.csv", "split": [0.9, 0.2]}, r"two fractions .*but got \[0\.9, 0\.2\]"),
        ({"path": "a.csv", "test": "t.csv", "split": [1.0, 0.0]}, r"two fractions .*both > 0.*but got \[1\.0, 0\.0\]"),
        ({"path": "a.csv", "split": [0.9, 0.1]}, r"three fractions .*but got \[0\.9, 0\.1\]; two fractions \(train, "),
        ({"path": "a.csv", "valid": "v.csv", "split": [0.9, 0.1]}, r"not also `valid`, but got valid='v\.csv'"),
    ],
)
def test_split_errors_say_what_is_expected(data, message):
    raw = {"data": data, "features": {"numeric": ["x"]}, "tasks": [{"name": "t", "kind": "binary", "label": "y"}]}
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(raw)


EXPERIMENT = """\
seed = 1

[data]
path = "adult_data.csv"
test = "adult_test.csv"
split = [0.75, 0.25]

[data.csv]
header = false
names = ["age", "hours", "sex", "income"]
skipinitialspace = true
comment = "|"                    # adult.test's first line, `|1x3 Cross validator`; adult.data has none

[features]
numeric = ["age", "hours"]
categorical = ["sex"]

[[tasks]]
name = "rich"
kind = "binary"
condition = '{condition}'

[model]
name = "mmoe"
embedding_dim = 2
num_experts = 2
expert_dims = [4]
tower_dims = [4]

[train]
epochs = 1
batch_size = 32
progress = false
"""


def _adult(rows: int, seed: int, dot: str) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows)
    income = np.where(age + rng.normal(0, 10, rows) > 45, ">50K", "<=50K")
    return pd.DataFrame(
        {
            "age": age,
            "hours": rng.integers(10, 60, rows),
            "sex": rng.choice(["Male", "Female"], rows),
            "income": [v + dot for v in income],
        }
    )


@pytest.fixture
def adult(tmp_path) -> Path:
    """UCI Adult as it comes: adult.data without a header, adult.test with a first line that is not data and
    labels spelt with a trailing dot."""
    _adult(120, 0, "").to_csv(tmp_path / "adult_data.csv", header=False, index=False, sep=",")
    test = _adult(40, 1, ".").to_csv(header=False, index=False)
    (tmp_path / "adult_test.csv").write_text("|1x3 Cross validator\n" + test)
    return tmp_path


def _write_exp(root: Path, condition: str) -> Path:
    (root / "exp.toml").write_text(EXPERIMENT.format(condition=condition))
    return root / "exp.toml"


def test_adult_trains_with_in_on_one_file_split_in_two_and_its_test_file(adult):
    exp = _write_exp(adult, 'income in [">50K", ">50K."]')
    out = adult / "run"
    assert main(["train", str(exp), "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["splits"]["test"]["rich"]["n"] == 40  # every row of the test file; its first line is not one
    assert metrics["splits"]["valid"]["rich"]["n"] == 30  # a quarter of adult.data's 120 rows
    m = adult / "m.json"
    assert main(["evaluate", str(exp), "--checkpoint", str(out / "best.pt"), "--split", "test", "--out", str(m)]) == 0
    assert json.loads(m.read_text())["tasks"]["rich"]["n"] == 40


def test_adult_with_an_exact_condition_names_the_test_file_and_the_fix(adult, capsys):
    exp = _write_exp(adult, 'income == ">50K"')
    assert main(["train", str(exp), "--out", str(adult / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "0 positive and 40 negative rows in the test split" in err and "adult_test.csv" in err
    assert 'income in [">50K", ">50K."]' in err
    assert "use more rows or larger fractions" not in err  # the test split is a file, not a fraction of `path`


# --- [data.csv] skip_rows and comment ----------------------------------------------------------------

PREAMBLE = 'exported by "tool", 2026\nanother, line, of, text\n'
ROWS = "x,c,y\n# a comment line, with commas\n1.5,a,1\n\n#another\n2.5,C#,0\n3.5,b,1\n# last\n4.5,a,0\n"


def _commented(tmp_path: Path, body: str = ROWS, name: str = "t.csv") -> Path:
    path = tmp_path / name
    text = PREAMBLE + body
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


OPTIONS = CsvOptions(skip_rows=2, comment="#")


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz"])
def test_skipped_lines_and_comments_are_not_data(tmp_path, name):
    frame = read_table(_commented(tmp_path, name=name), OPTIONS)
    assert frame.columns.tolist() == ["x", "c", "y"]
    assert frame["x"].tolist() == [1.5, 2.5, 3.5, 4.5] and frame["y"].tolist() == [1, 0, 1, 0]
    assert frame["c"].tolist() == ["a", "C#", "b", "a"]  # a `#` inside a line is data: only whole lines go
    assert frame.index.tolist() == [0, 1, 2, 3]
    chunks = list(iter_frames(_commented(tmp_path, name=name), OPTIONS, chunk_rows=3))
    assert [c.index.tolist() for c in chunks] == [[0, 1, 2], [3]]
    assert pd.concat(chunks)["c"].tolist() == ["a", "C#", "b", "a"]


def test_without_the_options_the_same_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="Reading .*t.csv"):
        read_table(_commented(tmp_path))


@pytest.mark.parametrize("skipinitialspace", [False, True])  # Arrow's parser, and the `csv` module's
def test_short_row_numbers_count_data_rows_only(tmp_path, skipinitialspace):
    body = "x,c,y\n# c1\n1.5,a,1\n#c2\n\n2.5,b,0\n# c3\n3.5,b\n4.5,a,0\n"
    path = _commented(tmp_path, body)
    csv = CsvOptions(skip_rows=2, comment="#", skipinitialspace=skipinitialspace)
    with pytest.raises(
        ValueError,
        match=r"row 2: expected 3 fields .* but the row has 2: '3\.5,b'.*Short rows "
        r"\(counted from 0 = the first data row of the file\): 2 \(2 fields\); 1 in all",
    ):
        read_table(path, csv)


def test_bad_value_row_numbers_skip_comments_in_chunks(tmp_path):
    body = "x,c,y\n" + "".join(f"# note {i}\n{i}.5,a,{i % 2}\n" for i in range(6)) + "9.5,a,7\n"
    train = _commented(tmp_path, body, "train.csv")
    exp = experiment_from_dict(
        {
            "data": {"train": str(train), "valid": str(train), "csv": {"skip_rows": 2, "comment": "#"}},
            "features": {"numeric": ["x"], "categorical": ["c"]},
            "tasks": [{"name": "t", "kind": "binary", "label": "y"}],
        }
    )
    with pytest.raises(ValueError, match=r"Label column `y` of task `t` in .*train\.csv, row 6: expected 0 or 1"):
        fit_encoder_chunked(exp, str(train), exp.data.csv, chunk_rows=4)


def test_header_false_with_names_and_skip_rows(tmp_path):
    path = tmp_path / "adult_test.csv"
    path.write_text("|1x3 Cross validator\n25, Male, <=50K.\n# a comment\n38, Female, >50K.\n")
    csv = CsvOptions(header=False, names=("age", "sex", "income"), skipinitialspace=True, skip_rows=1, comment="#")
    frame = read_table(path, csv)
    assert frame.to_dict("list") == {"age": [25, 38], "sex": ["Male", "Female"], "income": ["<=50K.", ">50K."]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"skip_rows": -1}, r"\[data\.csv\] `skip_rows` >= 0 \(the lines before the header\), but got -1"),
        ({"comment": " "}, r"\[data\.csv\] `comment` to be the text that starts a comment line, such as '#'.*' '"),
        ({"comment": "#\n"}, r"`comment` to be the text .*but got '#\\n'"),
    ],
)
def test_csv_option_errors(options, message):
    with pytest.raises(ValueError, match=message):
        CsvOptions(**options)


# --- conditions with in, not in, and, or -------------------------------------------------------------


def test_and_binds_tighter_than_or_and_parentheses_group():
    a, b, c = Condition("a", "==", 1.0), Condition("b", "==", 2.0), Condition("c", "==", 3.0)
    assert Condition.parse("a == 1 or b == 2 and c == 3", "w") == Combination("or", (a, Combination("and", (b, c))))
    grouped = Condition.parse("(a == 1 or b == 2) and c == 3", "w")
    assert grouped == Combination("and", (Combination("or", (a, b)), c))
    assert str(grouped) == "(a == 1.0 or b == 2.0) and c == 3.0" and Condition.parse(str(grouped), "w") == grouped
    assert Condition.parse("a == 1 and (b == 2 and c == 3)", "w") == Combination("and", (a, b, c))
    assert Condition.parse('income in [">50K", ">50K."]', "w") == Condition("income", "in", (">50K", ">50K."))
    assert Condition.parse("order not  in [1, 2,]", "w") == Condition("order", "not in", (1.0, 2.0))
    assert Condition.parse('`a or b` == "x or y"', "w") == Condition("a or b", "==", "x or y")
    assert Condition.parse("`and` in [true]", "w").columns == ("and",)


ROWS_FRAME = pd.DataFrame(
    {
        "age": [25, 35, 45, np.nan, 31],
        "sex": ["Female", "Female", "Male", "Female", None],
        "income": [">50K", ">50K.", "<=50K", "<=50K.", ">50K"],
    }
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('income in [">50K", ">50K."]', [True, True, False, False, True]),
        ('income not in [">50K", ">50K."]', [False, False, True, True, False]),
        ('age >= 30 and sex == "Female"', [False, True, False, False, False]),  # missing: False
        ('age >= 40 or sex == "Female"', [True, True, True, True, False]),
        ('sex != "Male"', [True, True, False, True, False]),  # a missing value meets no comparison, not even !=
        ("age not in [25, 45]", [False, True, False, False, True]),
        ('(age < 30 or age > 40) and income in ["<=50K"]', [False, False, True, False, False]),
    ],
)
def test_conditions_on_rows(text, expected):
    assert evaluate_condition(Condition.parse(text, "w"), ROWS_FRAME, "t.csv").tolist() == expected


@pytest.mark.parametrize(
    "text", ["a > 1 and b in [0, 2]", "a not in [1, 3] or b == 2", "(a < 2 or a >= 3) and b != 0", "a in [2.5]"]
)
def test_plain_numbers_agree_with_pandas(text):
    frame = pd.DataFrame({"a": [0.0, 1.0, 2.5, np.nan, 3.0, 1.0], "b": [0.0, 2.0, 2.0, 2.0, np.nan, 0.0]})
    cond = Condition.parse(text, "w")
    holds, known = plain_condition(cond, frame)
    assert holds.tolist() == evaluate_condition(cond, frame, "t.csv").tolist()
    every_column = frame[list(cond.columns)].notna().all(axis=1).tolist()
    assert known.tolist() == known_rows(cond, frame).tolist() == every_column
    assert plain_condition(Condition.parse('a in [1] and c == "x"', "w"), frame.assign(c="x")) is None  # text


def test_a_label_condition_over_two_columns_is_missing_where_either_is():
    task = TaskConfig(name="t", kind="binary", condition='age >= 30 and sex == "Female"')
    assert task.label_columns == ("age", "sex") and task.source_column == "age"
    labels, mask = encode_labels([task], ROWS_FRAME, "t.csv")
    assert mask[:, 0].tolist() == [True, True, True, False, False]
    assert labels[:, 0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_adult_spellings_in_train_and_test_files_are_both_positive():
    task = TaskConfig(name="rich", kind="binary", condition='income in [">50K", ">50K."]')
    train = pd.DataFrame({"income": [">50K", "<=50K", " >50K"]})  # read without skipinitialspace
    test = pd.DataFrame({"income": [">50K.", "<=50K.", ">50K."]})
    assert encode_labels([task], train, "adult_data.csv")[0][:, 0].tolist() == [1.0, 0.0, 1.0]
    assert encode_labels([task], test, "adult_test.csv")[0][:, 0].tolist() == [1.0, 0.0, 1.0]


def test_every_column_a_condition_reads_is_a_task_column_not_a_feature(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "f": rng.normal(size=40),
            "age": rng.integers(20, 60, 40),
            "sex": rng.choice(["F", "M"], 40),
            "click": rng.integers(0, 2, 40),
        }
    )
    frame.to_csv(tmp_path / "t.csv", index=False)
    tasks = [{"name": "t", "kind": "binary", "condition": 'age >= 30 and sex == "F"', "space": "click == 1 or f > 0"}]
    exp = experiment_from_dict(
        {
            "data": {"path": str(tmp_path / "t.csv"), "split": [0.5, 0.5, 0.0]},
            "features": {"auto": True},
            "tasks": tasks,
        }
    )
    assert exp.tasks[0].columns == ("age", "sex", "click", "f")
    with pytest.raises(ValueError, match="No feature columns left"):  # all four are the task's, none a feature
        prepare_data(exp)
    frame = frame.assign(g=1.0)
    pq.write_table(pa.Table.from_pandas(frame.drop(columns=["sex"])), tmp_path / "no_sex.parquet")
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    exp = experiment_from_dict(
        {
            "data": {"train": str(tmp_path / "t.parquet"), "valid": str(tmp_path / "t.parquet")},
            "features": {"numeric": ["g"]},
            "tasks": tasks,
        }
    )
    encoder = prepare_data(exp).encoder
    with pytest.raises(ValueError, match=r"to have the column\(s\) 'sex' \(features"):  # the second comparison's
        check_stream(tmp_path / "no_sex.parquet", encoder)


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (
            "age >= 30 and",
            r"`condition` of \[\[tasks\]\] `t` to be a condition like `column == value` .*`column in "
            r"\[v1, v2\]`.*but got 'age >= 30 and': `and` needs a comparison after it",
        ),
        ("(age >= 30 or sex == 1", r"but got '\(age >= 30 or sex == 1': a `\(` is not closed by `\)`"),
        ("age >= 30 sex == 1", r"value in `condition` of \[\[tasks\]\] `t` \('age >= 30 sex == 1'\) to be a number"),
        ("age in 30", r"Expected `in` in `condition` of .* to be followed by a list like \[1, 2\]"),
        ('age in [30, "x"]', r"values in `condition` .* all numbers, all true/false or all quoted strings"),
        ("age == [30]", r"to compare a list with `in` or `not in`, but got '==' in 'age == \[30\]'"),
        ('age >= 1 or sex > "F"', r"compare a string with == or !=, but got '>' in 'sex > \"F\"' in 'age >= 1 or"),
        ("age in []", r"the list in `condition` .* to hold at least one value, but got \[\]"),
    ],
)
def test_malformed_conditions_name_the_field_and_what_is_expected(condition, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(name="t", kind="binary", condition=condition)
