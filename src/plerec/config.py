"""The experiment file: typed, frozen sections read from TOML, validated once, with `--set` overrides.

An experiment is [data] (where rows come from), [features] (which columns feed the model), [[tasks]]
(what to predict and over which rows), [model] (a registry name and its hyperparameters) and [train].
Every key is documented in the README; unknown keys are rejected with a "did you mean" hint.
"""

import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

from plerec.data.conditions import Combination, Condition, parse_condition
from plerec.errors import did_you_mean, unknown_key
from plerec.models import MODELS, ModelConfig, model_config
from plerec.models.funnel import FUNNEL_MODELS, check_funnel_tasks
from plerec.safe_io import atomic_write_text

TASK_KINDS = ("binary", "regression")
OUTPUT_COLUMNS = ("score", "log_score", "rank", "index")  # what `plerec rank` and `serve` add next to the tasks
MAX_THREADS = 1_024
LENGTH_TRANSFORMS = ("none", "log", "sigmoid")


@dataclass(frozen=True, kw_only=True, slots=True)
class CsvOptions:
    """How CSV files are parsed (pandas.read_csv options)."""

    header: bool = True
    names: tuple[str, ...] = ()
    sep: str = ","
    skipinitialspace: bool = False
    keep_default_na: bool = True
    na_values: tuple[str, ...] = ()
    skip_rows: int = 0  # lines before the header (or before the first row, header = false): not read at all
    comment: str = ""  # lines that start with this text (e.g. "#") are not read; "" = none

    def __post_init__(self) -> None:
        if not self.sep:
            raise ValueError("Expected [data.csv] `sep` to be a separator such as ',' or ';', but got ''")
        if self.skip_rows < 0:
            raise ValueError(
                f"Expected [data.csv] `skip_rows` >= 0 (the lines before the header), but got {self.skip_rows}"
            )
        if self.comment and (not self.comment.strip() or "\n" in self.comment or "\r" in self.comment):
            raise ValueError(
                "Expected [data.csv] `comment` to be the text that starts a comment line, such as '#' (or '' for "
                f"none), but got {self.comment!r}"
            )
        empty = [i for i, name in enumerate(self.names) if not name.strip()]
        repeated = sorted({name for name in self.names if self.names.count(name) > 1})
        if empty or repeated:
            raise ValueError(
                "Expected [data.csv] `names` to be distinct, non-empty column names, but got "
                + "; ".join(
                    part
                    for part in (
                        f"empty names at positions {empty}" if empty else "",
                        f"repeated names {repeated}" if repeated else "",
                    )
                    if part
                )
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    path: str = ""
    train: str = ""
    valid: str = ""
    test: str = ""
    split: tuple[float, ...] = (0.8, 0.1, 0.1)
    split_seed: int | None = None
    exclude: tuple[str, ...] = ()
    missing_numeric: str = "impute"
    streaming: bool = False
    prepared: str = ""
    csv: CsvOptions = field(default_factory=CsvOptions)

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.train):
            raise ValueError(
                "Expected [data] to set either `path` (one file split by `split`, optionally with a separate "
                "`test` file) or `train` and `valid` (separate files), but got "
                f"path={self.path!r}, train={self.train!r}"
            )
        if self.train and not self.valid:
            raise ValueError("Expected [data] `valid` next to `train` (model selection needs it), but got none")
        if self.path and self.valid:
            raise ValueError(
                "Expected [data] `path` (one file split by `split`; a separate test file goes in `test`) not also "
                f"`valid`, but got valid={self.valid!r}"
            )
        if self.split_seed is not None and self.split_seed < 0:
            raise ValueError(f"Expected [data] `split_seed` >= 0, but got {self.split_seed}")
        if self.path and self.test:
            train_valid = self.split[:2] if len(self.split) == 3 and self.split[2] == 0 else self.split
            if (
                len(train_valid) != 2
                or not all(math.isfinite(f) and f > 0 for f in train_valid)
                or abs(sum(train_valid) - 1) > 1e-6
            ):
                raise ValueError(
                    "Expected [data] `split` to be two fractions (train, valid) summing to 1, both > 0, when `test` "
                    "names a separate test file (e.g. split = [0.9, 0.1]; [0.9, 0.1, 0] also works), but got "
                    f"{list(self.split)}"
                )
        elif self.path:
            if (
                len(self.split) != 3
                or not all(math.isfinite(f) and f >= 0 for f in self.split)
                or abs(sum(self.split) - 1) > 1e-6
            ):
                hint = "; two fractions (train, valid) need a separate test file in `test`"
                raise ValueError(
                    f"Expected [data] `split` to be three fractions (train, valid, test) summing to 1, "
                    f"but got {list(self.split)}{hint if len(self.split) == 2 else ''}"
                )
            if self.split[0] == 0 or self.split[1] == 0:
                raise ValueError(f"Expected non-empty train and valid fractions in `split`, but got {list(self.split)}")
        if self.missing_numeric not in ("impute", "error"):
            raise ValueError(
                f"Expected [data] `missing_numeric` to be 'impute' or 'error', but got {self.missing_numeric!r}"
            )
        if self.streaming and not self.train:
            raise ValueError(
                "Expected [data] streaming = true to read separate `train` and `valid` Parquet files or "
                "folders (a single `path` cannot be split without reading it whole), but got path="
                f"{self.path!r}"
            )


POOLINGS = ("mean", "sum", "max", "attention")
MAX_EMBEDDING_WIDTH = 65_536
MAX_LIST_LENGTH = 10_000


@dataclass(frozen=True, kw_only=True, slots=True)
class ListFeature:
    """A list-valued categorical column ([features.lists.NAME]): a bag of ids pooled into one embedding.

    Elements are in time order, oldest first; `max_length` keeps the most recent (the last) N of them
    (0: the longest list of the training split). `share` names a categorical feature whose vocabulary and
    embedding table the list uses (`hist_item_ids` with `item_id`); without it the list has its own.
    """

    pooling: str = "mean"
    max_length: int = 0
    share: str = ""
    target: str = ""  # attention: the categorical feature every element is scored against (DIN)
    separator: str = "|"  # between the elements of a CSV cell
    attention_dims: tuple[int, ...] = (36,)  # the hidden layers of the attention MLP

    def check(self, name: str) -> None:
        where = f"[features.lists.{name}]"
        if self.pooling not in POOLINGS:
            raise ValueError(f"Expected {where} `pooling` to be one of {', '.join(POOLINGS)}, but got {self.pooling!r}")
        if not 0 <= self.max_length <= MAX_LIST_LENGTH:
            raise ValueError(
                f"Expected {where} `max_length` in [0, {MAX_LIST_LENGTH}] (0: the longest training list), "
                f"but got {self.max_length}"
            )
        if (self.pooling == "attention") != bool(self.target):
            raise ValueError(
                f"Expected {where} to set `target` (the categorical feature the elements are scored against) "
                f"exactly when `pooling` is 'attention', but got pooling={self.pooling!r}, target={self.target!r}"
            )
        if not self.separator or (self.separator.isspace() and self.separator != "\t"):
            raise ValueError(
                f"Expected {where} `separator` to be a non-blank text such as '|', but got {self.separator!r}"
            )
        if not self.attention_dims or not all(0 < d <= 4096 for d in self.attention_dims):
            raise ValueError(
                f"Expected {where} `attention_dims` to be a non-empty list of widths in [1, 4096], "
                f"but got {list(self.attention_dims)}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class FeaturesConfig:
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    auto: bool = False
    auto_max_int_categories: int = 32
    max_vocab: int = 10_000_000
    hash_buckets: dict[str, int] = field(default_factory=dict)
    lists: dict[str, ListFeature] = field(default_factory=dict)
    embedding_dims: dict[str, int] = field(default_factory=dict)  # column -> width; others: [model] embedding_dim

    def __post_init__(self) -> None:
        if not (self.categorical or self.numeric or self.auto or self.lists):
            raise ValueError(
                "Expected [features] to list `categorical` and/or `numeric` columns, [features.lists], or to set "
                "`auto = true`, but got none"
            )
        for name, spec in self.lists.items():
            if not name:
                raise ValueError("Expected every [features.lists] entry to name a column, but got ''")
            spec.check(name)
            if spec.share in self.lists:
                raise ValueError(
                    f"Expected [features.lists.{name}] `share` to name a categorical feature, but "
                    f"{spec.share!r} is itself a list; share the categorical feature both use"
                )
        for col, width in self.embedding_dims.items():
            if not col or not 1 <= width <= MAX_EMBEDDING_WIDTH:
                raise ValueError(
                    "Expected [features] `embedding_dims` to map column names to widths in "
                    f"[1, {MAX_EMBEDDING_WIDTH}], but got {col!r} = {width}"
                )
        for name, spec in self.lists.items():
            if spec.share and name in self.embedding_dims:
                raise ValueError(
                    f"Expected no [features] `embedding_dims` entry for the list `{name}`: it shares the table, and "
                    f"so the width, of `{spec.share}`"
                )
        clash = sorted(set(self.lists) & (set(self.categorical) | set(self.numeric) | set(self.hash_buckets)))
        if clash:
            raise ValueError(
                f"Expected the columns of [features.lists] not to be listed also as categorical, numeric or "
                f"hash_buckets, but got {clash}"
            )
        if self.auto_max_int_categories < 0:
            raise ValueError(
                f"Expected [features] `auto_max_int_categories` >= 0, but got {self.auto_max_int_categories}"
            )
        if self.max_vocab < 1:
            raise ValueError(f"Expected [features] `max_vocab` >= 1, but got {self.max_vocab}")
        for col, buckets in self.hash_buckets.items():
            if not col or buckets < 1 or buckets >= 2**31:
                raise ValueError(
                    "Expected [features] `hash_buckets` to map column names to a number of buckets in "
                    f"[1, 2^31), but got {col!r} = {buckets}"
                )


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskConfig:
    name: str
    kind: str
    label: str = ""
    condition: str = ""
    weight: float = 1.0
    gamma: float = 1.0
    space: str = "present"
    rank_weight: float = 1.0  # w_k of Eq. 1: the exponent of this task's prediction in the fused ranking score
    standardize: bool = True  # regression: the loss sees (y − mean) / std of the training labels

    def __post_init__(self) -> None:
        where = f"[[tasks]] `{self.name}`"
        if not self.name:
            raise ValueError("Expected every [[tasks]] entry to have a non-empty `name`")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"Expected `kind` of {where} to be one of {TASK_KINDS}, but got {self.kind!r}")
        if bool(self.label) == bool(self.condition):
            raise ValueError(
                f"Expected {where} to set exactly one of `label` (a column) or `condition` "
                f"(e.g. 'col == \"value\"'), but got label={self.label!r}, condition={self.condition!r}"
            )
        if self.condition and self.kind != "binary":
            raise ValueError(f"Expected {where} with a `condition` to be binary, but got kind {self.kind!r}")
        if not (math.isfinite(self.weight) and math.isfinite(self.gamma)) or self.weight < 0 or self.gamma <= 0:
            raise ValueError(
                f"Expected {where} to have weight >= 0 and gamma > 0, but got weight={self.weight}, gamma={self.gamma}"
            )
        if not math.isfinite(self.rank_weight):
            raise ValueError(f"Expected `rank_weight` of {where} to be a finite number, but got {self.rank_weight}")
        if self.condition:
            parse_condition(self.condition, f"`condition` of {where}")
        if self.space != "present":
            parse_condition(self.space, f"`space` of {where}")

    @property
    def label_condition(self) -> Condition | Combination | None:
        return parse_condition(self.condition, f"`condition` of task {self.name}") if self.condition else None

    @property
    def space_condition(self) -> Condition | Combination | None:
        return None if self.space == "present" else parse_condition(self.space, f"`space` of task {self.name}")

    @property
    def label_columns(self) -> tuple[str, ...]:
        """The columns the label is read from: `label`, or every column `condition` reads. A row is
        outside the task where any of them is missing."""
        return (self.label,) if self.label else self.label_condition.columns  # type: ignore[union-attr]

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the task reads: its label columns, then those of its `space` condition."""
        space = self.space_condition.columns if self.space_condition is not None else ()
        return tuple(dict.fromkeys(self.label_columns + space))

    @property
    def source_column(self) -> str:
        """The label column, or the first column `condition` reads (`label_columns` holds them all)."""
        return self.label_columns[0]

    @property
    def label_source(self) -> str:
        """The label columns as a message names them: "column `y`", "columns `a`, `b`"."""
        names = ", ".join(f"`{c}`" for c in self.label_columns)
        return f"column{'s' if len(self.label_columns) > 1 else ''} {names}"


BALANCING_METHODS = ("fixed", "uncertainty", "gradnorm", "dwa", "pcgrad")  # plerec.balancing implements each


@dataclass(frozen=True, kw_only=True, slots=True)
class GradNormConfig:
    """[train.gradnorm]: GradNorm's asymmetry α and the learning rate of its task weights (their own Adam)."""

    alpha: float = 1.5
    lr: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"Expected [train.gradnorm] `alpha` to be a finite number >= 0, but got {self.alpha}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Expected [train.gradnorm] `lr` to be a finite number > 0, but got {self.lr}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DWAConfig:
    """[train.dwa]: the temperature T of Dynamic Weight Average's softmax over the losses' rates of change."""

    temperature: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"Expected [train.dwa] `temperature` to be a finite number > 0, but got {self.temperature}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    eval_batch_size: int = 1024  # scoring holds one batch's temporaries: ~4x more at 4096 for ~5 % speed
    epochs: int = 10
    weight_schedule: str = "epoch"
    monitor: str = "mean"
    monitor_metric: str = "auto"
    patience: int = 3
    threads: int = 0
    progress: bool = True
    sparse_embeddings: bool = True
    device: str = "cpu"
    bf16: bool | str = False  # bfloat16 autocast: true, false, or "auto" (train.use_bf16: on where measured faster)
    compile: bool | str = "auto"  # torch.compile of the dense body: true, false, or "auto" (plerec.compiled)
    compile_cache: str = ""  # Inductor's on-disk cache; "" = TORCHINDUCTOR_CACHE_DIR or ~/.cache/plerec/inductor
    checkpoint_every: int = 10_000
    check_finite: bool = True
    balancing: str = "fixed"  # how the task losses are combined: BALANCING_METHODS, README "Loss balancing"
    gradnorm: GradNormConfig = field(default_factory=GradNormConfig)  # read when balancing = "gradnorm"
    dwa: DWAConfig = field(default_factory=DWAConfig)  # read when balancing = "dwa"
    # What a run shows and where (README "Watching a run"); none of these changes what is computed.
    log_format: str = "text"  # the per-epoch lines on stderr: "text" for people, "json" one object per line
    tensorboard: bool = False  # event files for TensorBoard, rank 0 only
    tensorboard_dir: str = ""  # "" = the run's folder/tensorboard
    mlflow: bool = False  # an MLflow run (the `mlflow` extra)
    mlflow_uri: str = ""  # tracking URI; "" = a local store, the run's folder/mlruns
    mlflow_experiment: str = ""  # MLflow experiment name; "" = "plerec"

    def __post_init__(self) -> None:
        if self.balancing not in BALANCING_METHODS:
            raise ValueError(
                f"Expected [train] `balancing` to be one of {', '.join(BALANCING_METHODS)}, but got "
                f"{self.balancing!r}.{did_you_mean(self.balancing, BALANCING_METHODS)}"
            )
        if self.checkpoint_every < 0:
            raise ValueError(
                "Expected [train] `checkpoint_every` >= 0 (steps; 0 = at epoch ends only), "
                f"but got {self.checkpoint_every}"
            )
        for name in ("batch_size", "eval_batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected [train] `{name}` >= 1, but got {getattr(self, name)}")
        if (
            not (math.isfinite(self.lr) and math.isfinite(self.weight_decay))
            or self.lr <= 0
            or self.weight_decay < 0
            or self.patience < 0
            or self.threads < 0
        ):
            raise ValueError(
                "Expected [train] finite lr > 0, finite weight_decay >= 0, patience >= 0 and threads >= 0, but got "
                f"lr={self.lr}, weight_decay={self.weight_decay}, patience={self.patience}, threads={self.threads}"
            )
        if self.threads > MAX_THREADS:  # OpenMP aborts the process when it cannot start that many
            raise ValueError(
                f"Expected [train] `threads` to be at most {MAX_THREADS} (0 = torch's default), but got {self.threads}"
            )
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            raise ValueError(f'Expected [train] `bf16` to be true, false or "auto", but got {self.bf16!r}')
        if isinstance(self.compile, str) and self.compile != "auto":
            raise ValueError(f'Expected [train] `compile` to be true, false or "auto", but got {self.compile!r}')
        if self.log_format not in ("text", "json"):
            raise ValueError(f"Expected [train] `log_format` 'text' or 'json', but got {self.log_format!r}")
        if self.weight_schedule not in ("epoch", "step"):
            raise ValueError(f"Expected [train] `weight_schedule` 'epoch' or 'step', but got {self.weight_schedule!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"Expected [train] `device` 'cpu', 'cuda' or 'auto', but got {self.device!r}")
        if self.monitor_metric not in ("auto", "auc", "logloss", "mse", "loss"):
            raise ValueError(
                "Expected [train] `monitor_metric` to be one of auto, auc, logloss, mse, loss, "
                f"but got {self.monitor_metric!r}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class RankConfig:
    """How `plerec rank` and `plerec serve` fuse the task predictions into one score (Eq. 1) and rank items.

    log score = Σ_k rank_weight_k · log p_k + log f(length), f one of LENGTH_TRANSFORMS.
    """

    group: str = ""  # the column whose rows form one ranked list (the user)
    item: str = ""  # the column naming the ranked item
    length: str = ""  # optional: the length-like column of f(video_len)
    length_transform: str = "none"  # f: "none" (f = x), "log" (f = ln(1 + x)), "sigmoid" (f = σ((x − c) / s))
    length_center: float = 0.0  # c of the sigmoid
    length_scale: float = 1.0  # s of the sigmoid
    top_k: int = 0  # keep the k best items per group; 0 keeps all

    def __post_init__(self) -> None:
        if self.length_transform not in LENGTH_TRANSFORMS:
            raise ValueError(
                f"Expected [rank] `length_transform` to be one of {LENGTH_TRANSFORMS}, but got "
                f"{self.length_transform!r}.{did_you_mean(self.length_transform, LENGTH_TRANSFORMS)}"
            )
        if self.length_transform != "none" and not self.length:
            raise ValueError(
                f"Expected [rank] `length` (a column) with length_transform = {self.length_transform!r}, but got none"
            )
        if not (math.isfinite(self.length_center) and math.isfinite(self.length_scale) and self.length_scale > 0):
            raise ValueError(
                "Expected [rank] `length_center` finite and `length_scale` > 0, but got "
                f"length_center={self.length_center}, length_scale={self.length_scale}"
            )
        if self.length_transform != "sigmoid" and (self.length_center, self.length_scale) != (0.0, 1.0):
            raise ValueError(
                "Expected [rank] `length_center` and `length_scale` only with length_transform = 'sigmoid', "
                f"but got length_transform={self.length_transform!r}"
            )
        if self.top_k < 0:
            raise ValueError(f"Expected [rank] `top_k` >= 0 (0 keeps every item), but got {self.top_k}")


MAX_CALIBRATION_BINS = 1_000


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluateConfig:
    """What the evaluation adds to each task's metrics (plerec.metrics): GAUC over the groups of the column
    `group` (e.g. the user id; "" = no GAUC), and the calibration of binary tasks over `calibration_bins`
    equal-width probability bins (the predicted-to-observed ratio and the ECE; 0 = no calibration)."""

    group: str = ""
    calibration_bins: int = 10

    def __post_init__(self) -> None:
        if self.group != self.group.strip():
            raise ValueError(
                f"Expected [evaluate] `group` to be a column name without surrounding spaces (or '' for no GAUC), "
                f"but got {self.group!r}"
            )
        if not 0 <= self.calibration_bins <= MAX_CALIBRATION_BINS:
            raise ValueError(
                f"Expected [evaluate] `calibration_bins` in [0, {MAX_CALIBRATION_BINS}] (equal-width probability "
                f"bins; 0 = no calibration), but got {self.calibration_bins}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class BaselineConfig:
    """The structure of the single-task baseline that `plerec compare` and `sweep` measure gains against
    ("the same network structures and training samples", PLE Eq. 11). Unset keys follow the compared
    models: `bottom_dims` the experts' widths (a bottom as deep as an expert), `tower_dims` [model]'s;
    `bottom_dims = []` leaves the tower MLP alone on the input (the PLE paper's synthetic baseline)."""

    bottom_dims: tuple[int, ...] | None = None
    tower_dims: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("bottom_dims", "tower_dims"):
            values = getattr(self, name)
            if values is not None and any(v < 1 for v in values):
                raise ValueError(f"Expected [baseline] `{name}` to hold positive integers, but got {list(values)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Experiment:
    seed: int = 0
    data: DataConfig
    features: FeaturesConfig
    tasks: tuple[TaskConfig, ...]
    model_name: str = "ple"
    model: ModelConfig = field(default_factory=lambda: model_config("ple"))
    train: TrainConfig = field(default_factory=TrainConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    source: str = field(default="", compare=False)  # the file it was read from, for error messages only

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"Expected `seed` >= 0, but got {self.seed}")
        if not self.tasks:
            raise ValueError("Expected at least one [[tasks]] entry, but got none")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected distinct task names, but got {names}")
        for name in names:
            if "." in name or name.strip() != name:
                raise ValueError(
                    f"Expected [[tasks]] `{name}` to have a name without dots or surrounding spaces "
                    f"(`--set tasks.NAME.key=…` addresses a task by its name), but got {name!r}"
                )
            if name in OUTPUT_COLUMNS:
                raise ValueError(
                    f"Expected [[tasks]] `{name}` to have a name other than the output columns of `plerec rank` "
                    f"and `serve` ({', '.join(OUTPUT_COLUMNS)}), but got {name!r}; rename the task"
                )
        columns = {c for c in (self.rank.group, self.rank.item) if c}
        clash = [n for n in names if n in columns]
        if clash:
            raise ValueError(
                f"Expected task names other than the [rank] group and item columns ({', '.join(sorted(columns))}), "
                f"which `plerec rank` and `serve` write next to the task predictions, but got {clash}; rename the tasks"
            )
        labelled_by = [t.name for t in self.tasks if self.evaluate.group in t.label_columns]
        if labelled_by:  # every group would hold one class: GAUC would skip them all
            raise ValueError(
                f"Expected [evaluate] `group` to name a column other than the label columns of the tasks, but got "
                f"{self.evaluate.group!r}, the label of {', '.join(f'`{n}`' for n in labelled_by)}"
            )
        if self.train.monitor != "mean" and self.train.monitor not in names:
            raise ValueError(
                f"Expected [train] `monitor` to be 'mean' or a task name ({', '.join(names)}), "
                f"but got {self.train.monitor!r}.{did_you_mean(self.train.monitor, names)}"
            )
        if self.model_name in FUNNEL_MODELS:  # esmm, aitm: binary funnel steps over the entire space
            check_funnel_tasks(self.model_name, self.tasks)

    @property
    def task_kinds(self) -> dict[str, str]:
        return {t.name: t.kind for t in self.tasks}

    def with_model(self, name: str, params: dict | None = None) -> "Experiment":
        """The same experiment with another model; `params` default to the current ones that still apply."""
        if params is None:
            valid = {f.name for f in fields(MODELS[name].config)} if name in MODELS else set()
            params = {k: v for k, v in asdict(self.model).items() if k in valid}
        return replace(self, model_name=name, model=model_config(name, params))


# ---------------------------------------------------------------------------------------------
# Reading and writing


def load_experiment(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), notes: list[str] | None = None
) -> Experiment:
    """Read an experiment TOML file; relative data paths are resolved against the file's folder.

    An override `model.name=OTHER` drops the file's [model] keys that do not apply to OTHER (those set by
    overrides too are kept, and a key of no model is still an error); `notes` receives one line saying which.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Experiment file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays or inline tables
        raise ValueError(f"{path} is not valid TOML: its arrays or tables are nested too deeply") from None
    table = raw.get("model", {})
    written = table.get("name", "ple") if isinstance(table, dict) else None  # the model the file is written for
    for item in overrides:
        apply_override(raw, item)
    dropped = _switch_model(raw, written, _overridden_model_keys(overrides))
    if dropped and notes is not None:
        notes.append(
            f"--set model.name={raw['model']['name']}: dropped the [model] keys of {written} that do not apply to "
            f"{raw['model']['name']}: {', '.join(dropped)}"
        )
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("path", "train", "valid", "test", "prepared"):
            if isinstance(data.get(key), str) and data[key]:
                data[key] = str((path.parent / data[key]).resolve()) if not Path(data[key]).is_absolute() else data[key]
    try:
        return experiment_from_dict(raw, source=str(path))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None


def carried_model_keys(params: dict[str, Any], name: str, from_name: str) -> dict[str, Any]:
    """The [model] keys of model `from_name` that apply to model `name`: the keys of `name`'s config, `levels`
    only for the same model (one model's per-level structure does not describe another's)."""
    valid = {f.name for f in fields(MODELS[name].config)}
    return {k: v for k, v in params.items() if k in valid and (k != "levels" or name == from_name)}


def _overridden_model_keys(overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The [model] keys that `model.KEY=value` overrides set."""
    keys = (item.split("=", 1)[0].strip().split(".") for item in overrides if "=" in item)
    return {parts[1] for parts in keys if len(parts) == 2 and parts[0] == "model"}


def _switch_model(raw: dict[str, Any], written: Any, explicit: set[str]) -> list[str]:
    """Drop, from the raw [model] table, the keys of the model the file was written for (`written`) that do
    not apply to the model an override named instead; return their names. Keys that `explicit` overrides set,
    and keys of no model at all (typos: their "did you mean" error stays), are left for model_config to judge."""
    table = raw.get("model")
    if not isinstance(table, dict):
        return []
    name = table.get("name", "ple")
    if not isinstance(name, str) or name == written or name not in MODELS:
        return []
    of_some_model = {f.name for spec in MODELS.values() for f in fields(spec.config)}
    params = {k: v for k, v in table.items() if k != "name"}
    kept = carried_model_keys(params, name, written if isinstance(written, str) else "")
    dropped = [k for k in params if k not in kept and k not in explicit and k in of_some_model]
    for key in dropped:
        del table[key]
    return dropped


def experiment_from_dict(raw: dict[str, Any], source: str = "") -> Experiment:
    top = {f.name for f in fields(Experiment)} - {"model_name", "source"}
    for key in raw:
        if key not in top:
            raise unknown_key(key, top, "the experiment file (top level)")
    for required in ("data", "features", "tasks"):
        if required not in raw:
            raise ValueError(f"Expected a [{required}] section in the experiment file, but got none")
    for section in ("data", "model"):
        if section in raw and not isinstance(raw[section], dict):
            raise ValueError(f"Expected [{section}] to be a table, but got {raw[section]!r}")
    model_table = dict(raw.get("model", {}))
    model_name = _coerce(model_table.pop("name", "ple"), str, "[model] `name`")
    tasks_raw = raw["tasks"]
    if not isinstance(tasks_raw, list):
        raise ValueError("Expected [[tasks]] to be an array of tables (write `[[tasks]]` per task)")
    # Checked on what is read, not in Experiment: the single-task baseline makes a one-task experiment of every
    # task, and a task of weight 0 is valid next to tasks of weight > 0.
    weights = [t.get("weight", 1.0) if isinstance(t, dict) else 1.0 for t in tasks_raw]
    if tasks_raw and all(w == 0 and not isinstance(w, bool) for w in weights):
        raise ValueError(
            "Expected at least one [[tasks]] entry with weight > 0 (with every weight 0 nothing is trained), "
            f"but got weights {weights}"
        )
    data_table = dict(raw["data"])
    csv = _build(CsvOptions, data_table.pop("csv", {}), "[data.csv]")
    return Experiment(
        seed=_coerce(raw.get("seed", 0), int, "seed"),
        data=_build(DataConfig, {**data_table, "csv": csv}, "[data]"),
        features=_build(FeaturesConfig, raw["features"], "[features]"),
        tasks=tuple(_build(TaskConfig, t, f"[[tasks]] #{i}") for i, t in enumerate(tasks_raw)),
        model_name=model_name,
        model=model_config(model_name, model_table),
        train=_build(TrainConfig, raw.get("train", {}), "[train]"),
        rank=_build(RankConfig, raw.get("rank", {}), "[rank]"),
        baseline=_build(BaselineConfig, raw.get("baseline", {}), "[baseline]"),
        evaluate=_build(EvaluateConfig, raw.get("evaluate", {}), "[evaluate]"),
        source=source,
    )


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """Every key with its resolved value: what `plerec train` writes next to its results."""
    model = _plain(exp.model)
    if not model.get("levels"):
        model.pop("levels", None)
    return {
        "seed": exp.seed,
        "data": _plain(exp.data),
        "features": _plain(exp.features),
        "tasks": [_plain(t) for t in exp.tasks],
        "model": {"name": exp.model_name, **model},
        "train": _plain(exp.train),
        "rank": _plain(exp.rank),
        "evaluate": _plain(exp.evaluate),
    }


def key_defaults() -> dict[str, Any]:
    """Every section's keys with their defaults, shaped like `experiment_to_dict` (tasks: one task's keys;
    model: only the keys whose default is the same for every model, e.g. `dense_init`)."""

    def defaults(cls: type) -> dict[str, Any]:
        from dataclasses import MISSING

        found = {}
        for f in fields(cls):
            if f.default is not MISSING:
                found[f.name] = f.default
            elif f.default_factory is not MISSING:
                found[f.name] = f.default_factory()
        return {k: _plain(v) for k, v in found.items() if v is not None}

    model: dict[str, Any] | None = None
    for spec in MODELS.values():
        own = defaults(spec.config)
        model = own if model is None else {k: v for k, v in model.items() if k in own and own[k] == v}
    return {
        "model": model or {},
        "data": {**defaults(DataConfig), "csv": defaults(CsvOptions)},
        "features": defaults(FeaturesConfig),
        "tasks": defaults(TaskConfig),
        "train": defaults(TrainConfig),
        "rank": defaults(RankConfig),
        "evaluate": defaults(EvaluateConfig),
    }


def _plain(value: Any) -> Any:
    """A value as the experiment's dictionary holds it: tables as dicts, tuples as lists, None left out."""
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if getattr(value, f.name) is not None}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def write_experiment(exp: Experiment, path: str | Path) -> None:
    atomic_write_text(path, tomli_w.dumps(experiment_to_dict(exp)))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `a.b.c=value` to the raw TOML tree; the value is parsed as TOML, else kept as a string.

    `tasks.NAME.key=value` addresses a task by name.
    """
    if "=" not in item:
        raise ValueError(f"Expected an override like `train.lr=3e-4`, but got {item!r}")
    if "\n" in item or "\r" in item:  # TOML would read the next line as another key and drop it from `value`
        raise ValueError(f"Expected an override on one line, like `train.lr=3e-4`, but got {item!r}")
    key, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    except RecursionError:
        raise ValueError(f"Override {key.strip()!r}: its value is nested too deeply") from None
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # tasks addressed by name
            matches = [t for t in node if isinstance(t, dict) and t.get("name") == part]
            if not matches:
                names = [t.get("name") for t in node if isinstance(t, dict)]
                raise ValueError(f"Override {key!r}: no task named {part!r}; tasks are {names}")
            node = matches[0]
        else:
            if not isinstance(node, dict):
                raise ValueError(f"Override {key!r}: `{'.'.join(parts[:depth])}` is {node!r}, not a table")
            node = node.setdefault(part, [] if part == "tasks" and depth == 0 else {})
    if not isinstance(node, dict | list):
        raise ValueError(f"Override {key!r}: `{'.'.join(parts[:-1])}` is {node!r}, not a table")
    if isinstance(node, list):
        raise ValueError(f"Override {key!r}: expected `tasks.NAME.key=value`")
    node[parts[-1]] = value


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ValueError(f"Expected {where} to be a table, but got {table!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    values = {}
    for key, value in table.items():
        if key not in valid:
            raise unknown_key(key, valid, where)
        values[key] = value if is_dataclass(value) else _coerce(value, hints[key], f"{where} `{key}`")
    missing = [f.name for f in fields(cls) if f.name not in values and _required(f)]
    if missing:
        raise ValueError(f"Expected {where} to set {', '.join(f'`{m}`' for m in missing)}, but it does not")
    return cls(**values)


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a TOML value against a field's type; ints are accepted as floats, lists become tuples."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"Expected {where} to be a table like {{ name = value }}, but got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {
            _coerce(k, key_hint, f"{where} key"): _coerce(v, value_hint, f"{where} `{k}`") for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"Expected {where} to be a list, but got {value!r}")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(v, inner, f"{where} item") for v in value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"Expected {where} to be a number, but got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"Expected {where} to be an integer, but got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"Expected {where} to be true or false, but got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"Expected {where} to be a string, but got {value!r}")
    if is_dataclass(hint) and isinstance(hint, type):
        return value if isinstance(value, hint) else _build(hint, value, where)
    return value
