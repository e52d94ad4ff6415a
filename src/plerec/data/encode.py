"""From a DataFrame to column tensors: vocabularies, numeric statistics, labels and sample spaces.

Everything the model sees is learnt from the training split only. Id 0 of every categorical field
is reserved for values not seen in training (and for missing values). A numeric column's missing
values are imputed with the training mean, with a 0/1 missing-indicator feature, or are an error.
A task's label that is empty or NaN puts the row outside that task's sample space.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from plerec.config import Condition, Experiment, TaskConfig
from plerec.errors import did_you_mean


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch: sparse ids (B, S), dense features (B, D), labels (B, T) and which are in-space (B, T)."""

    sparse: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self._fields()))

    def pin_memory(self) -> Batch:
        return Batch(*(t.pin_memory() for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.sparse, self.dense, self.labels, self.label_mask

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True, slots=True)
class EncodedTable:
    """A whole split as tensors: batches are slices or index-selects of these, never per-row Python."""

    sparse: torch.Tensor  # (N, S), narrowest integer type that holds the vocabularies
    dense: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N, T) float32, 0 where masked
    label_mask: torch.Tensor  # (N, T) bool
    source: str = ""

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch_table(self, index: slice) -> EncodedTable:
        """Rows as a table of views (no copy)."""
        return EncodedTable(
            self.sparse[index], self.dense[index], self.labels[index], self.label_mask[index], self.source
        )

    def batch(self, index: torch.Tensor | slice) -> Batch:
        if isinstance(index, slice):
            return Batch(self.sparse[index], self.dense[index], self.labels[index], self.label_mask[index])
        return Batch(
            self.sparse.index_select(0, index),
            self.dense.index_select(0, index),
            self.labels.index_select(0, index),
            self.label_mask.index_select(0, index),
        )


@dataclass(slots=True)
class Encoder:
    """Vocabularies and statistics fitted on the training split; serialisable as plain values."""

    categorical: list[str]
    numeric: list[str]
    vocabs: dict[str, list] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    indicators: list[str] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)
    missing_numeric: str = "impute"
    inferred: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_sizes(self) -> list[int]:
        return [len(self.vocabs[c]) + 1 for c in self.categorical]  # +1: the reserved id 0

    @property
    def dense_names(self) -> list[str]:
        return self.numeric + [f"{c}__missing" for c in self.indicators]

    @classmethod
    def fit(cls, exp: Experiment, train: pd.DataFrame) -> Encoder:
        """Vocabularies and statistics of a training table held in memory."""
        return EncoderFitter(exp, train).update(train).finish()

    def transform(self, frame: pd.DataFrame, labels: bool = True) -> EncodedTable:
        """The frame as tensors. `labels=False` encodes the features only (rows to score, e.g. candidates to
        rank): no label column is read, and every row is outside every task's space."""
        source = frame.attrs.get("source", "the data")
        _require_columns(frame, self.categorical + self.numeric, source, "a feature")
        n = len(frame)
        sparse = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, col in enumerate(self.categorical):
            index = pd.Index(self.vocabs[col])
            codes = index.get_indexer(frame[col])
            sparse[:, j] = codes + 1  # unseen (-1) becomes the reserved id 0
        dense = np.zeros((n, len(self.dense_names)), dtype=np.float32)
        for j, col in enumerate(self.numeric):
            values = _numeric_column(frame, col, source)
            missing = np.isnan(values)
            if missing.any() and self.missing_numeric == "error":
                _raise_missing(frame, col, missing, source)
            values = np.where(missing, self.means[col], values)
            dense[:, j] = (values - self.means[col]) / self.stds[col]
            if col in self.indicators:
                dense[:, len(self.numeric) + self.indicators.index(col)] = missing
        if labels:
            values, mask = encode_labels([TaskConfig(**t) for t in self.tasks], frame, source)
        else:
            values, mask = np.zeros((n, len(self.tasks)), np.float32), np.zeros((n, len(self.tasks)), bool)
        return EncodedTable(
            sparse=torch.from_numpy(sparse.astype(_narrowest_int(self.vocab_sizes))),
            dense=torch.from_numpy(dense),
            labels=torch.from_numpy(values),
            label_mask=torch.from_numpy(mask),
            source=source,
        )

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_state_dict(cls, state: dict) -> Encoder:
        return cls(**state)


class EncoderFitter:
    """Fits an Encoder over one table or a stream of chunks (one pass, bounded memory).

    Categorical counts add up across chunks; numeric means and variances merge exactly by the
    pairwise (Chan et al.) update, so one chunk or many give the same statistics.
    """

    def __init__(self, exp: Experiment, sample: pd.DataFrame):
        self.source = sample.attrs.get("source", "the training data")
        categorical, numeric, inferred = select_features(exp, list(sample.columns), sample, self.source)
        self.encoder = Encoder(
            categorical=categorical,
            numeric=numeric,
            tasks=[
                {"name": t.name, "kind": t.kind, "label": t.label, "condition": t.condition, "space": t.space}
                for t in exp.tasks
            ],
            missing_numeric=exp.data.missing_numeric,
            inferred=inferred,
        )
        self.counts: dict[str, dict] = {col: {} for col in categorical}
        self.moments: dict[str, list[float]] = {col: [0, 0.0, 0.0] for col in numeric}  # n, mean, M2
        self.has_missing: set[str] = set()

    def update(self, frame: pd.DataFrame) -> EncoderFitter:
        source = frame.attrs.get("source", self.source)
        _require_columns(frame, self.encoder.categorical + self.encoder.numeric, source, "a feature")
        for col, counts in self.counts.items():
            for value, count in frame[col].dropna().value_counts(sort=False).items():
                key = _plain(value)
                counts[key] = counts.get(key, 0) + int(count)
        for col, (n_a, mean_a, m2_a) in self.moments.items():
            values = _numeric_column(frame, col, source)
            missing = np.isnan(values)
            if missing.any():
                if self.encoder.missing_numeric == "error":
                    _raise_missing(frame, col, missing, source)
                self.has_missing.add(col)
            present = values[~missing]
            n_b = present.size
            if n_b == 0:
                continue
            mean_b = float(present.mean())
            m2_b = float(np.square(present - mean_b).sum())
            n = n_a + n_b
            delta = mean_b - mean_a
            self.moments[col] = [n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n]
        return self

    def finish(self) -> Encoder:
        enc = self.encoder
        for col, counts in self.counts.items():
            # Frequent values first; ties by the value's text, so ids do not depend on row order.
            enc.vocabs[col] = [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]
        for col, (n, mean, m2) in self.moments.items():
            enc.means[col] = float(mean) if n else 0.0
            std = float(np.sqrt(m2 / n)) if n else 0.0
            enc.stds[col] = std if std > 0 else 1.0
        enc.indicators = [col for col in enc.numeric if col in self.has_missing]
        return enc


def select_features(
    exp: Experiment, columns: list[str], frame: pd.DataFrame, source: str
) -> tuple[list[str], list[str], dict[str, str]]:
    """Categorical and numeric feature columns; patterns like `x*` are expanded, `auto` infers types."""
    used_by_tasks = set()
    for t in exp.tasks:
        used_by_tasks.add(t.source_column)
        if t.space_condition is not None:
            used_by_tasks.add(t.space_condition.column)
    _require_columns(frame, sorted(used_by_tasks), source, "a task")
    _require_columns(frame, list(exp.data.exclude), source, "[data] exclude")
    blocked = used_by_tasks | set(exp.data.exclude)

    def expand(patterns: tuple[str, ...], what: str) -> list[str]:
        out: list[str] = []
        for pattern in patterns:
            # A pattern never picks up a label, sample-space or excluded column; an explicit name that
            # is one of those is an error below.
            hits = (
                [c for c in columns if fnmatch.fnmatchcase(c, pattern) and c not in blocked]
                if _is_glob(pattern)
                else [pattern]
            )
            if not hits or (not _is_glob(pattern) and pattern not in columns):
                raise ValueError(
                    f"Column `{pattern}` listed in [features] {what} is not in {source}."
                    f"{did_you_mean(pattern, columns)} Columns: {', '.join(map(str, columns))}"
                )
            out += [c for c in hits if c not in out]
        return out

    categorical = expand(exp.features.categorical, "categorical")
    numeric = expand(exp.features.numeric, "numeric")
    both = set(categorical) & set(numeric)
    if both:
        raise ValueError(f"Columns {sorted(both)} are listed as both categorical and numeric in [features]")
    leaking = (set(categorical) | set(numeric)) & used_by_tasks
    if leaking:
        raise ValueError(f"Columns {sorted(leaking)} define a task's label or sample space and cannot also be features")
    categorical = [c for c in categorical if c not in exp.data.exclude]
    numeric = [c for c in numeric if c not in exp.data.exclude]
    inferred: dict[str, str] = {}
    if exp.features.auto:
        taken = set(categorical) | set(numeric) | blocked
        for col in columns:
            if col in taken:
                continue
            kind = _infer_kind(frame[col], exp.features.auto_max_int_categories)
            inferred[col] = kind
            (categorical if kind == "categorical" else numeric).append(col)
    if not categorical and not numeric:
        raise ValueError(f"No feature columns left in {source} after exclusions")
    return categorical, numeric, inferred


def encode_labels(tasks: list[TaskConfig], frame: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N, T) float32 with 0 outside the space, and the space mask (N, T) bool (Eq. 9's δ)."""
    n = len(frame)
    labels = np.zeros((n, len(tasks)), dtype=np.float32)
    mask = np.zeros((n, len(tasks)), dtype=bool)
    for task in tasks:
        space = task.space_condition
        _require_columns(frame, [task.source_column] + ([space.column] if space else []), source, f"task `{task.name}`")
    for k, task in enumerate(tasks):
        column = frame[task.source_column]
        present = ~_missing(column)
        cond = task.label_condition
        if cond is not None:
            values = evaluate_condition(cond, column, source).astype(np.float32)
        else:
            values = _label_values(task, column, present, source)
        in_space = present
        if task.space_condition is not None:
            space_col = frame[task.space_condition.column]
            in_space = in_space & evaluate_condition(task.space_condition, space_col, source)
        labels[:, k] = np.where(in_space, values, 0.0)
        mask[:, k] = in_space
    return labels, mask


def evaluate_condition(cond: Condition, column: pd.Series, source: str) -> np.ndarray:
    """The condition per row (missing values compare as False)."""
    missing = _missing(column)
    if isinstance(cond.value, str):
        values = column.astype(str).str.strip().to_numpy()
        target = cond.value.strip()
    else:
        numeric = pd.to_numeric(column.where(~missing), errors="coerce")
        bad = numeric.isna().to_numpy() & ~missing
        if bad.any():
            row = column.index[bad.argmax()]
            raise ValueError(
                f"Column `{cond.column}` of {source}, row {row}: expected a number to compare in "
                f"`{cond}`, but got {_plain(column.loc[row])!r}"
            )
        values = numeric.to_numpy(dtype=np.float64)
        target = float(cond.value)
    ops = {
        "==": np.equal,
        "!=": np.not_equal,
        ">": np.greater,
        ">=": np.greater_equal,
        "<": np.less,
        "<=": np.less_equal,
    }
    return np.asarray(ops[cond.op](values, target), dtype=bool) & ~missing


def _label_values(task: TaskConfig, column: pd.Series, present: np.ndarray, source: str) -> np.ndarray:
    numeric = pd.to_numeric(column.where(present), errors="coerce").to_numpy(dtype=np.float64)
    bad = present & ~np.isfinite(numeric)
    if task.kind == "binary":
        bad |= present & np.isfinite(numeric) & (numeric != 0) & (numeric != 1)
    if bad.any():
        row = column.index[bad.argmax()]
        expected = "0 or 1 (or empty for rows outside the task)" if task.kind == "binary" else "a finite number"
        hint = " Use `condition` to define a binary label from a text column." if task.kind == "binary" else ""
        raise ValueError(
            f"Label column `{task.source_column}` of task `{task.name}` in {source}, row {row}: "
            f"expected {expected}, but got {_plain(column.loc[row])!r}.{hint}"
        )
    return np.where(present, numeric, 0.0)


def _numeric_column(frame: pd.DataFrame, col: str, source: str) -> np.ndarray:
    column = frame[col]
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64)
    missing = _missing(column)
    numeric = pd.to_numeric(column.where(~missing), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~missing & ~np.isfinite(numeric)  # text, and also inf, which would turn the standardised column to NaN
    if bad.any():
        row = column.index[bad.argmax()]
        raise ValueError(
            f"Numeric column `{col}` of {source}, row {row}: expected a finite number, "
            f"but got {_plain(column.loc[row])!r} (list it under [features] categorical if it is a category)"
        )
    return numeric


def _missing(column: pd.Series) -> np.ndarray:
    """NaN/None, or a blank string (CSVs read with keep_default_na = false; pandas 3 text is not `object`)."""
    missing = column.isna().to_numpy()
    if pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column):
        missing = missing | (column.astype(str).str.strip() == "").to_numpy(dtype=bool, na_value=False)
    return missing


def _raise_missing(frame: pd.DataFrame, col: str, missing: np.ndarray, source: str) -> None:
    row = frame.index[missing.argmax()]
    raise ValueError(
        f"Numeric column `{col}` of {source}, row {row}: value is missing ({int(missing.sum())} rows in all) "
        "and [data] missing_numeric = 'error'; set it to 'impute' to use the training mean and an indicator"
    )


def _require_columns(frame: pd.DataFrame, columns: list[str], source: str, what: str) -> None:
    names = [str(c) for c in frame.columns]
    for col in columns:
        if col not in frame.columns:
            raise ValueError(
                f"Column `{col}` used by {what} is not in {source}.{did_you_mean(col, names)} "
                f"Columns: {', '.join(names)}"
            )


def _infer_kind(column: pd.Series, max_int_categories: int) -> str:
    if pd.api.types.is_bool_dtype(column):
        return "categorical"
    if pd.api.types.is_float_dtype(column):
        return "numeric"
    if pd.api.types.is_integer_dtype(column):
        return "categorical" if column.nunique() <= max_int_categories else "numeric"
    return "categorical"


def _narrowest_int(vocab_sizes: list[int]) -> np.dtype:
    biggest = max(vocab_sizes, default=1)
    for dtype in (np.int16, np.int32):
        if biggest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _plain(value):
    """numpy scalars to Python ones, so vocabularies serialise (checkpoints, JSON)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def fit_encoder_chunked(exp: Experiment, path: str, csv=None, chunk_rows: int = 131_072) -> Encoder:
    """Fit the encoder in one pass over a training file read a chunk at a time."""
    from plerec.data.table import iter_frames

    fitter = None
    for frame in iter_frames(path, csv, chunk_rows):
        fitter = fitter or EncoderFitter(exp, frame)
        fitter.update(frame)
    if fitter is None:
        raise ValueError(f"The training data {path} has no rows")
    return fitter.finish()


def encode_file(path: str, encoder: Encoder, csv=None, chunk_rows: int = 131_072) -> EncodedTable:
    """A whole file as column tensors, encoded a chunk at a time: the file is never held whole as a
    DataFrame. Parquet row counts are known up front, so its tensors are filled in place."""
    from plerec.data.table import count_rows, iter_frames

    total = count_rows(path)
    columns = None
    if total is not None:
        columns = list(dict.fromkeys(encoder.categorical + encoder.numeric + _task_columns(encoder)))
    chunks = (encoder.transform(frame) for frame in iter_frames(path, csv, chunk_rows, columns))
    if total is None:
        parts = list(chunks)
        if not parts:
            raise ValueError(f"{path} has no rows")
        return EncodedTable(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("sparse", "dense", "labels", "label_mask")),
            source=str(path),
        )
    num_tasks = len(encoder.tasks)
    table = EncodedTable(
        sparse=torch.empty(total, len(encoder.categorical), dtype=_torch_int(encoder.vocab_sizes)),
        dense=torch.empty(total, len(encoder.dense_names)),
        labels=torch.empty(total, num_tasks),
        label_mask=torch.empty(total, num_tasks, dtype=torch.bool),
        source=str(path),
    )
    start = 0
    for part in chunks:
        stop = start + len(part)
        for name in ("sparse", "dense", "labels", "label_mask"):
            getattr(table, name)[start:stop] = getattr(part, name)
        start = stop
    return table


def _task_columns(encoder: Encoder) -> list[str]:
    columns = []
    for task in (TaskConfig(**t) for t in encoder.tasks):
        columns.append(task.source_column)
        if task.space_condition is not None:
            columns.append(task.space_condition.column)
    return columns


def _torch_int(vocab_sizes: list[int]) -> torch.dtype:
    return {np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32}.get(
        _narrowest_int(vocab_sizes), torch.int64
    )
