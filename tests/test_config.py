import copy
import dataclasses
from pathlib import Path

import pytest

from plerec.config import (
    Condition,
    Experiment,
    apply_override,
    experiment_from_dict,
    load_experiment,
    write_experiment,
)
from plerec.models.family import LevelConfig, MoEConfig, PLEConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "census_income.toml"

COMPLETE = """\
seed = 7

[data]
path = "data/rows.csv.gz"
split = [0.6, 0.2, 0.2]
split_seed = 11
exclude = ["weight"]
missing_numeric = "error"

[data.csv]
header = false
names = ["age", "city", "weight", "click", "buy"]
sep = ";"
skipinitialspace = true
keep_default_na = false
na_values = ["?"]

[features]
categorical = ["city"]
numeric = ["age"]
auto = false
auto_max_int_categories = 5

[[tasks]]
name = "ctr"
kind = "binary"
label = "click"
weight = 2
gamma = 0.9

[[tasks]]
name = "cvr"
kind = "binary"
condition = 'buy == "yes"'
space = "click == 1"

[model]
name = "ple"
embedding_dim = 4
tower_dims = [16, 8]

[[model.levels]]
num_task_experts = 2
num_shared_experts = 1
expert_dims = [32]

[[model.levels]]
num_task_experts = 1
num_shared_experts = 3
expert_dims = [16, 8]

[train]
lr = 3e-4
weight_decay = 1e-5
batch_size = 64
eval_batch_size = 128
epochs = 3
weight_schedule = "step"
monitor = "cvr"
monitor_metric = "logloss"
patience = 1
threads = 2
progress = false
"""


def base() -> dict:
    """The smallest valid experiment as a raw TOML tree."""
    return {
        "data": {"path": "/tmp/rows.csv"},
        "features": {"numeric": ["x"]},
        "tasks": [{"name": "ctr", "kind": "binary", "label": "click"}],
    }


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- loading and writing -----------------------------------------------------------------------


def test_complete_file_is_read_into_typed_sections(tmp_path):
    exp = load_experiment(write(tmp_path, COMPLETE))
    assert exp.seed == 7
    assert exp.data.path == str((tmp_path / "data" / "rows.csv.gz").resolve())
    assert exp.data.split == (0.6, 0.2, 0.2) and exp.data.split_seed == 11
    assert exp.data.exclude == ("weight",) and exp.data.missing_numeric == "error"
    assert exp.data.csv.names == ("age", "city", "weight", "click", "buy")
    assert exp.data.csv.sep == ";" and exp.data.csv.header is False and exp.data.csv.na_values == ("?",)
    assert exp.features.categorical == ("city",) and exp.features.auto_max_int_categories == 5
    ctr, cvr = exp.tasks
    assert (ctr.weight, ctr.gamma) == (2.0, 0.9) and isinstance(ctr.weight, float)
    assert cvr.label_condition == Condition("buy", "==", "yes")
    assert cvr.space_condition == Condition("click", "==", 1.0)
    assert cvr.source_column == "buy" and ctr.source_column == "click"
    assert exp.model_name == "ple" and isinstance(exp.model, PLEConfig)
    assert exp.model.tower_dims == (16, 8)
    assert exp.model.levels == (
        LevelConfig(num_task_experts=2, num_shared_experts=1, expert_dims=(32,)),
        LevelConfig(num_task_experts=1, num_shared_experts=3, expert_dims=(16, 8)),
    )
    assert exp.train.lr == 3e-4 and exp.train.monitor == "cvr" and exp.train.progress is False
    assert exp.task_kinds == {"ctr": "binary", "cvr": "binary"}
    assert exp.source == str(tmp_path / "exp.toml")


def test_complete_file_round_trips_through_write_experiment(tmp_path):
    first = load_experiment(write(tmp_path, COMPLETE))
    out = tmp_path / "elsewhere" / "written.toml"
    out.parent.mkdir()
    write_experiment(first, out)
    second = load_experiment(out)
    assert second.source == str(out)
    assert dataclasses.replace(second, source="") == dataclasses.replace(first, source="")


def test_example_file_round_trips(tmp_path):
    first = load_experiment(EXAMPLE)
    assert first.data.path == str(
        (EXAMPLE.parent / "../../shared/data/census-income-kdd/census-income.test.gz").resolve()
    )
    assert [t.name for t in first.tasks] == ["income", "marital"]
    write_experiment(first, tmp_path / "copy.toml")
    second = load_experiment(tmp_path / "copy.toml")
    assert dataclasses.replace(second, source="") == dataclasses.replace(first, source="")


def test_relative_train_valid_test_paths_resolve_against_the_file_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    text = """
[data]
train = "parts/train.parquet"
valid = "../valid.csv"
test = "/abs/test.csv"
[features]
numeric = ["x"]
[[tasks]]
name = "ctr"
kind = "binary"
label = "click"
"""
    exp = load_experiment(write(tmp_path / "sub", text))
    assert exp.data.train == str((tmp_path / "sub" / "parts" / "train.parquet").resolve())
    assert exp.data.valid == str((tmp_path / "valid.csv").resolve())
    assert exp.data.test == "/abs/test.csv"
    assert exp.data.path == ""


def test_defaults_fill_missing_sections():
    exp = experiment_from_dict(base())
    assert exp.seed == 0 and exp.model_name == "ple" and isinstance(exp.model, PLEConfig)
    assert exp.train.lr == 1e-3 and exp.data.split == (0.8, 0.1, 0.1) and exp.data.split_seed is None
    assert exp.tasks[0].weight == 1.0 and exp.tasks[0].space == "present"


def test_missing_or_invalid_file_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.toml does not exist"):
        load_experiment(tmp_path / "nope.toml")
    bad = write(tmp_path, "[data\npath = 1\n", "broken.toml")
    with pytest.raises(ValueError, match=r"broken\.toml is not valid TOML"):
        load_experiment(bad)


def test_load_errors_are_prefixed_with_the_file(tmp_path):
    path = write(tmp_path, COMPLETE.replace("lr = 3e-4", 'lr = "fast"'), "typo.toml")
    with pytest.raises(ValueError, match=r"typo\.toml: Expected \[train\] `lr` to be a number, but got 'fast'"):
        load_experiment(path)


# --- unknown keys ------------------------------------------------------------------------------


def _with(raw: dict, where: str, key: str, value=1) -> dict:
    raw = copy.deepcopy(raw)
    if where == "top":
        raw[key] = value
    elif where == "data.csv":
        raw["data"]["csv"] = {key: value}
    elif where == "tasks":
        raw["tasks"][0][key] = value
    elif where == "levels":
        raw["model"] = {"levels": [{"num_task_experts": 1}, {key: value}]}
    else:
        raw.setdefault(where, {})[key] = value
    return raw


@pytest.mark.parametrize(
    "where, key, close, place",
    [
        ("top", "seeds", "seed", r"the experiment file \(top level\)"),
        ("top", "taks", "tasks", r"the experiment file \(top level\)"),
        ("data", "exlude", "exclude", r"\[data\]"),
        ("data.csv", "skipinitialspaces", "skipinitialspace", r"\[data\.csv\]"),
        ("features", "categorial", "categorical", r"\[features\]"),
        ("tasks", "wieght", "weight", r"\[\[tasks\]\] #0"),
        ("model", "embeding_dim", "embedding_dim", r"\[model\] for `ple`"),
        ("levels", "num_shared_expert", "num_shared_experts", r"\[model\] levels\[1\]"),
        ("train", "batchsize", "batch_size", r"\[train\]"),
    ],
)
def test_unknown_keys_are_rejected_with_a_hint(where, key, close, place):
    with pytest.raises(ValueError, match=rf"Unknown key `{key}` in {place}\. Did you mean `{close}`\?"):
        experiment_from_dict(_with(base(), where, key))


def test_unknown_key_lists_the_valid_keys_when_nothing_is_close():
    with pytest.raises(ValueError, match=r"Unknown key `zzz` in \[train\]\. Expected one of: .*batch_size.*lr"):
        experiment_from_dict(_with(base(), "train", "zzz"))


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, COMPLETE.replace("[train]\n", "[train]\nepoch = 4\n"), "typo.toml")
    with pytest.raises(ValueError, match=r"typo\.toml: Unknown key `epoch` in \[train\]\. Did you mean `epochs`\?"):
        load_experiment(path)


def test_unknown_model_name_is_rejected_with_a_hint():
    raw = base()
    raw["model"] = {"name": "mmeo"}
    with pytest.raises(ValueError, match=r"Unknown model `mmeo`\. Did you mean `mmoe`\?"):
        experiment_from_dict(raw)


# --- types, required keys and cross-checks -----------------------------------------------------


@pytest.mark.parametrize(
    "where, key, value, message",
    [
        ("train", "lr", "0.1", r"Expected \[train\] `lr` to be a number, but got '0\.1'"),
        ("train", "lr", True, r"Expected \[train\] `lr` to be a number, but got True"),
        ("train", "epochs", 2.5, r"Expected \[train\] `epochs` to be an integer, but got 2\.5"),
        ("train", "progress", "yes", r"Expected \[train\] `progress` to be true or false, but got 'yes'"),
        ("train", "monitor", 3, r"Expected \[train\] `monitor` to be a string, but got 3"),
        ("data", "exclude", "weight", r"Expected \[data\] `exclude` to be a list, but got 'weight'"),
        ("data", "split_seed", "1", r"Expected \[data\] `split_seed` to be an integer, but got '1'"),
        ("data.csv", "names", ["a", 2], r"Expected \[data\.csv\] `names` item to be a string, but got 2"),
        ("tasks", "weight", "2", r"Expected \[\[tasks\]\] #0 `weight` to be a number, but got '2'"),
        ("features", "numeric", [1], r"Expected \[features\] `numeric` item to be a string, but got 1"),
        ("top", "seed", "0", r"Expected seed to be an integer, but got '0'"),
        ("model", "name", 3, r"Expected \[model\] `name` to be a string, but got 3"),
        ("model", "embedding_dim", 2.5, r"Expected `embedding_dim` to hold positive integers, but got \[2\.5\]"),
    ],
)
def test_wrong_types_are_rejected(where, key, value, message):
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(_with(base(), where, key, value))


@pytest.mark.parametrize("section", ["data", "features", "train", "model"])
def test_a_section_that_is_not_a_table_is_rejected(section):
    raw = base()
    raw[section] = "oops"
    with pytest.raises(ValueError, match=rf"Expected \[{section}\] to be a table, but got 'oops'"):
        experiment_from_dict(raw)


def test_tasks_must_be_an_array_of_tables():
    raw = base()
    raw["tasks"] = {"name": "ctr"}
    with pytest.raises(ValueError, match=r"Expected \[\[tasks\]\] to be an array of tables"):
        experiment_from_dict(raw)
    raw["tasks"] = ["ctr"]
    with pytest.raises(ValueError, match=r"Expected \[\[tasks\]\] #0 to be a table, but got 'ctr'"):
        experiment_from_dict(raw)


@pytest.mark.parametrize("section", ["data", "features", "tasks"])
def test_required_sections(section):
    raw = base()
    del raw[section]
    with pytest.raises(ValueError, match=rf"Expected a \[{section}\] section in the experiment file"):
        experiment_from_dict(raw)


@pytest.mark.parametrize("missing", [["name"], ["kind"], ["name", "kind"]])
def test_task_without_name_or_kind(missing):
    raw = base()
    for key in missing:
        del raw["tasks"][0][key]
    keys = ", ".join(f"`{m}`" for m in missing)
    with pytest.raises(ValueError, match=rf"Expected \[\[tasks\]\] #0 to set {keys}, but it does not"):
        experiment_from_dict(raw)


@pytest.mark.parametrize(
    "task, message",
    [
        ({"name": "", "kind": "binary", "label": "y"}, r"non-empty `name`"),
        ({"name": "t", "kind": "ranking", "label": "y"}, r"`kind` of \[\[tasks\]\] `t`.*but got 'ranking'"),
        (
            {"name": "t", "kind": "binary", "label": "y", "condition": "y == 1"},
            r"\[\[tasks\]\] `t` to set exactly one of `label`.*label='y', condition='y == 1'",
        ),
        ({"name": "t", "kind": "binary"}, r"\[\[tasks\]\] `t` to set exactly one of `label`.*label='', condition=''"),
        (
            {"name": "t", "kind": "regression", "condition": "y > 1"},
            r"\[\[tasks\]\] `t` with a `condition` to be binary, but got kind 'regression'",
        ),
        ({"name": "t", "kind": "binary", "label": "y", "weight": -1}, r"weight >= 0 and gamma > 0.*weight=-1\.0"),
        ({"name": "t", "kind": "binary", "label": "y", "gamma": 0}, r"weight >= 0 and gamma > 0.*gamma=0\.0"),
        (
            {"name": "t", "kind": "binary", "label": "y", "space": "click = 1"},
            r"Expected `space` of \[\[tasks\]\] `t` to be a condition like .*'click = 1'",
        ),
        (
            {"name": "t", "kind": "binary", "condition": "y == maybe"},
            r"value in `condition` of \[\[tasks\]\] `t` \('y == maybe'\) to be a number.*'maybe'",
        ),
    ],
)
def test_invalid_tasks(task, message):
    raw = base()
    raw["tasks"] = [task]
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(raw)


def test_duplicate_and_empty_task_lists():
    raw = base()
    raw["tasks"] = raw["tasks"] * 2
    with pytest.raises(ValueError, match=r"distinct task names, but got \['ctr', 'ctr'\]"):
        experiment_from_dict(raw)
    raw["tasks"] = []
    with pytest.raises(ValueError, match=r"at least one \[\[tasks\]\] entry"):
        experiment_from_dict(raw)


def test_monitor_must_name_a_task():
    raw = _with(base(), "train", "monitor", "crt")
    with pytest.raises(
        ValueError, match=r"`monitor` to be 'mean' or a task name \(ctr\), but got 'crt'\. Did you mean `ctr`"
    ):
        experiment_from_dict(raw)
    assert experiment_from_dict(_with(base(), "train", "monitor", "ctr")).train.monitor == "ctr"


@pytest.mark.parametrize(
    "split, message",
    [
        ([0.8, 0.1, 0.2], r"`split` to be three fractions .* summing to 1, but got \[0\.8, 0\.1, 0\.2\]"),
        ([0.9, 0.1], r"`split` to be three fractions .*but got \[0\.9, 0\.1\]"),
        ([1.2, -0.1, -0.1], r"`split` to be three fractions"),
        ([0.9, 0.0, 0.1], r"non-empty train and valid fractions in `split`, but got \[0\.9, 0\.0, 0\.1\]"),
    ],
)
def test_split_fractions(split, message):
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(_with(base(), "data", "split", split))


def test_split_may_leave_test_empty():
    assert experiment_from_dict(_with(base(), "data", "split", [0.75, 0.25, 0])).data.split == (0.75, 0.25, 0.0)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"path": "a.csv", "train": "t.csv", "valid": "v.csv"}, r"either `path`.*path='a\.csv', train='t\.csv'"),
        ({}, r"either `path`.*path='', train=''"),
        ({"train": "t.csv"}, r"\[data\] `valid` next to `train`"),
        ({"path": "a.csv", "valid": "v.csv"}, r"\[data\] `path` .*not also `valid`, but got valid='v\.csv'"),
        ({"path": "a.csv", "missing_numeric": "drop"}, r"`missing_numeric` to be 'impute' or 'error', but got 'drop'"),
    ],
)
def test_data_sources(data, message):
    raw = base()
    raw["data"] = data
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(raw)


def test_features_need_columns_or_auto():
    raw = base()
    raw["features"] = {}
    with pytest.raises(ValueError, match=r"\[features\] to list `categorical` and/or `numeric`"):
        experiment_from_dict(raw)
    raw["features"] = {"auto": True}
    assert experiment_from_dict(raw).features.auto is True


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("epochs", 0, r"\[train\] `epochs` >= 1, but got 0"),
        ("lr", 0, r"lr > 0.*lr=0\.0"),
        ("weight_schedule", "batch", r"`weight_schedule` 'epoch' or 'step', but got 'batch'"),
        ("monitor_metric", "acc", r"`monitor_metric` to be one of .*but got 'acc'"),
    ],
)
def test_train_values(key, value, message):
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(_with(base(), "train", key, value))


# --- --set overrides ---------------------------------------------------------------------------


def test_overrides_on_a_file(tmp_path):
    path = write(tmp_path, COMPLETE)
    exp = load_experiment(
        path,
        ["train.lr=1e-2", "tasks.cvr.weight=0.5", "seed=3", "data.csv.sep=,", 'features.numeric=["age", "w"]'],
    )
    assert exp.train.lr == 1e-2 and exp.seed == 3 and exp.data.csv.sep == ","
    assert exp.tasks[1].weight == 0.5 and exp.tasks[0].weight == 2.0
    assert exp.features.numeric == ("age", "w")


def test_override_parses_toml_values_and_keeps_other_text_as_strings():
    raw = base()
    apply_override(raw, "train.lr=3e-4")
    apply_override(raw, "model.name=mmoe")
    apply_override(raw, "tasks.ctr.weight=2")
    apply_override(raw, "train.progress=false")
    apply_override(raw, " train.monitor = ctr")
    assert raw["train"] == {"lr": 3e-4, "progress": False, "monitor": "ctr"}
    assert raw["model"] == {"name": "mmoe"}
    assert raw["tasks"][0]["weight"] == 2
    exp = experiment_from_dict(raw)
    assert exp.train.lr == 3e-4 and exp.model_name == "mmoe" and isinstance(exp.model, MoEConfig)
    assert exp.tasks[0].weight == 2.0


def test_override_value_may_contain_equals_signs():
    raw = base()
    apply_override(raw, "tasks.ctr.space=click == 1")
    assert raw["tasks"][0]["space"] == "click == 1"
    apply_override(raw, "tasks.ctr.condition='y == \"a=b\"'")
    assert raw["tasks"][0]["condition"] == 'y == "a=b"'


def test_override_of_an_unknown_key_is_caught_by_validation():
    raw = base()
    apply_override(raw, "train.lrr=1")
    with pytest.raises(ValueError, match=r"Unknown key `lrr` in \[train\]\. Did you mean `lr`\?"):
        experiment_from_dict(raw)


def test_override_of_a_bad_task_name():
    raw = base()
    with pytest.raises(ValueError, match=r"Override 'tasks\.crt\.weight': no task named 'crt'; tasks are \['ctr'\]"):
        apply_override(raw, "tasks.crt.weight=2")
    assert raw["tasks"][0] == {"name": "ctr", "kind": "binary", "label": "click"}


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lr", r"Expected an override like `train\.lr=3e-4`, but got 'train\.lr'"),
        ("tasks.weight=2", r"Override 'tasks\.weight': expected `tasks\.NAME\.key=value`"),
        ("seed.x=1", r"Override 'seed\.x': `seed` is 0, not a table"),
        ("train.lr.x=1", r"Override 'train\.lr\.x': `train\.lr` is 0\.1, not a table"),
    ],
)
def test_malformed_overrides(item, message):
    raw = base()
    raw["seed"] = 0
    raw["train"] = {"lr": 0.1}
    with pytest.raises(ValueError, match=message):
        apply_override(raw, item)


def test_malformed_override_on_load_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"Expected an override like `train\.lr=3e-4`, but got 'lr'"):
        load_experiment(write(tmp_path, COMPLETE), ["lr"])


# --- conditions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('marital == "Never married"', Condition("marital", "==", "Never married")),
        ("marital != 'Never married'", Condition("marital", "!=", "Never married")),
        ('  income_50k=="50000+."  ', Condition("income_50k", "==", "50000+.")),
        ("click == 1", Condition("click", "==", 1.0)),
        ("age >= 40", Condition("age", ">=", 40.0)),
        ("age<18.5", Condition("age", "<", 18.5)),
        ("score > -1e-3", Condition("score", ">", -1e-3)),
        ("score <= 2", Condition("score", "<=", 2.0)),
        ("flag == true", Condition("flag", "==", True)),
        ("flag != false", Condition("flag", "!=", False)),
        ("`hours per week` > 40", Condition("hours per week", ">", 40.0)),
        ("`country of birth` == 'United-States'", Condition("country of birth", "==", "United-States")),
        ("user.age > 3", Condition("user.age", ">", 3.0)),
        ('x == ""', Condition("x", "==", "")),
    ],
)
def test_condition_parse(text, expected):
    cond = Condition.parse(text, "the test")
    assert cond == expected
    assert type(cond.value) is type(expected.value)
    assert Condition.parse(str(cond), "again") == cond


@pytest.mark.parametrize(
    "text, message",
    [
        ("click = 1", r"Expected where to be a condition like `column == value`.*but got 'click = 1'"),
        ("click => 1", r"condition like .*but got 'click => 1'"),
        ("click", r"condition like .*but got 'click'"),
        ("== 1", r"condition like .*but got '== 1'"),
        ("1click == 1", r"condition like .*but got '1click == 1'"),
        ("click ~ 1", r"condition like .*but got 'click ~ 1'"),
        ("click <> 1", r"value in where \('click <> 1'\) to be a number, true/false or a quoted string, but got '> 1'"),
        ("name == Bob", r"value in where .*but got 'Bob'"),
        ("name == \"Bob'", r"value in where .*but got '\"Bob\\''"),
        ("flag == True", r"value in where .*but got 'True'"),
        ('name > "Bob"', r"Expected where to compare a string with == or !=, but got '>'"),
    ],
)
def test_condition_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        Condition.parse(text, "where")


def test_experiment_is_frozen():
    exp = experiment_from_dict(base())
    assert isinstance(exp, Experiment)
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.seed = 1  # type: ignore[misc]


def _two_tasks(edit) -> dict:
    raw = copy.deepcopy(base())
    raw["tasks"].append({"name": "cvr", "kind": "binary", "label": "buy"})
    edit(raw)
    return raw


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(train={"threads": 100_000}), r"\[train\] `threads` to be at most 1024 \(0 = torch's"),
        (lambda r: r.update(model={"num_levels": 65}), r"`num_levels` to hold integers of at most 64, but got \[65\]"),
        (lambda r: r.update(model={"levels": [{}] * 65}), r"`levels` to list at most 64 levels, but got 65"),
        (lambda r: r.update(model={"num_shared_experts": 1025}), r"`num_shared_experts` to be at most 1024"),
        (lambda r: r.update(model={"name": "mmoe", "num_experts": 2000}), r"`num_experts` to hold integers of at most"),
        (lambda r: r.update(model={"expert_dims": [65_537]}), r"`expert_dims` to hold integers of at most 65536"),
        (lambda r: r.update(model={"tower_dims": [4] * 65}), r"`tower_dims` to list at most 64 widths, but got 65"),
        (lambda r: r.update(model={"embedding_dim": 2**33}), r"`embedding_dim` to hold integers of at most 65536"),
        (
            lambda r: r.update(model={"name": "shared_bottom", "bottom_dims": [10**9]}),
            r"`bottom_dims` to hold integers of at most 65536",
        ),
        (lambda r: r["tasks"][1].update(name="c.vr"), r"`c\.vr` to have a name without dots .*--set tasks\.NAME"),
        (lambda r: r["tasks"][1].update(name=" cvr"), r"name without dots or surrounding spaces"),
        *[
            (lambda r, n=name: r["tasks"][1].update(name=n), rf"other than the output columns .* but got '{name}'")
            for name in ("score", "log_score", "rank", "index")
        ],
        (
            lambda r: r.update(rank={"group": "user", "item": "cvr"}),
            r"task names other than the \[rank\] group and item columns \(cvr, user\).* but got \['cvr'\]",
        ),
        (lambda r: r.update(rank={"group": "ctr"}), r"\[rank\] group and item columns \(ctr\).* but got \['ctr'\]"),
        (
            lambda r: [t.update(weight=0) for t in r["tasks"]],
            r"at least one \[\[tasks\]\] entry with weight > 0 .* but got weights \[0, 0\]",
        ),
    ],
)
def test_new_limits_and_names_are_checked_at_load(edit, message):
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(_two_tasks(edit))


def test_the_limits_still_accept_their_largest_values():
    exp = experiment_from_dict(_two_tasks(lambda r: r.update(train={"threads": 1024}, model={"num_levels": 64})))
    assert exp.train.threads == 1024 and exp.model.num_levels == 64
    assert experiment_from_dict(_two_tasks(lambda r: r["tasks"][1].update(weight=0))).tasks[1].weight == 0


@pytest.mark.parametrize("item", ["train.lr=1e-3\ntrain.epochs=99", "train.lr=1e-3\r\n", "tasks.ctr.weight=\n2"])
def test_multi_line_overrides_are_refused(item):
    with pytest.raises(ValueError, match=r"Expected an override on one line"):
        apply_override(base(), item)


def test_a_deeply_nested_override_value_is_one_error():
    with pytest.raises(ValueError, match=r"Override 'train\.lr': its value is nested too deeply"):
        apply_override(base(), "train.lr=" + "[" * 100_000 + "]" * 100_000)


def test_a_deeply_nested_experiment_file_is_one_error(tmp_path):
    path = write(tmp_path, "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"exp\.toml is not valid TOML: its arrays or tables are nested too deeply"):
        load_experiment(path)
