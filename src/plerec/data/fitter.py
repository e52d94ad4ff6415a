"""Fitting an Encoder on the training split, held whole or read a chunk at a time.

The experiment's feature lists are resolved against the file's columns (patterns expanded, types
inferred with `auto`); categorical values are counted into vocabularies, most frequent first; numeric
columns' means and variances, and each task's label statistics, merge exactly across chunks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from plerec import jsonio
from plerec.config import Experiment
from plerec.data.columns import numeric_column, plain_integers, present_values, raise_missing, require_columns
from plerec.data.encode import Encoder
from plerec.data.frames import pd
from plerec.data.labels import encode_labels
from plerec.data.lists import read_elements
from plerec.data.vocab import IntegerVocabulary, category_key, integer_key, json_value
from plerec.errors import did_you_mean


def fit_encoder_chunked(exp: Experiment, path: str, csv=None, chunk_rows: int = 32_768) -> Encoder:
    """Fit the encoder in one pass over a training file read a chunk at a time."""
    from plerec.data.table import iter_frames

    fitter = None
    for frame in iter_frames(path, csv, chunk_rows):
        fitter = fitter or EncoderFitter(exp, frame)
        fitter.update(frame)
    if fitter is None:
        raise ValueError(f"Expected the training data {path} to have data rows, but it has none")
    return fitter.finish()


class EncoderFitter:
    """Fits an Encoder over one table or a stream of chunks (one pass, bounded memory).

    Categorical counts add up across chunks; numeric means and variances merge exactly by the
    pairwise (Chan et al.) update, so one chunk or many give the same statistics.
    """

    def __init__(self, exp: Experiment, sample: pd.DataFrame):
        self.source = sample.attrs.get("source", "the training data")
        categorical, numeric, inferred = select_features(exp, list(sample.columns), sample, self.source)
        group = exp.evaluate.group
        if group and group not in sample.columns:
            names = [str(c) for c in sample.columns]
            raise ValueError(
                f"Expected [evaluate] `group` of {exp.source or 'the experiment'} to name a column of {self.source} "
                f"(the groups of GAUC), but got {group!r}.{did_you_mean(group, names)} Columns: {', '.join(names)}"
            )
        self.encoder = Encoder(
            categorical=categorical,
            numeric=numeric,
            tasks=[
                {"name": t.name, "kind": t.kind, "label": t.label, "condition": t.condition, "space": t.space}
                for t in exp.tasks
            ],
            missing_numeric=exp.data.missing_numeric,
            inferred=inferred,
            hash_buckets={c: n for c, n in exp.features.hash_buckets.items() if c in categorical},
            lists={name: {**asdict(spec), "elements": "integer"} for name, spec in exp.features.lists.items()},
            embedding_dims=dict(exp.features.embedding_dims),
            group=group,
        )
        self.max_vocab = exp.features.max_vocab
        # category key -> [a representative value, count]; hashed columns keep no counts. A list column that
        # shares a field's vocabulary adds its elements to that field's counts.
        vocab_columns = categorical + [name for name, spec in exp.features.lists.items() if not spec.share]
        self.counts: dict[str, dict[str, list]] = {c: {} for c in vocab_columns if c not in self.encoder.hash_buckets}
        self.longest = dict.fromkeys(exp.features.lists, 0)  # each list column's longest training list
        # chunks of plain integers are counted apart, as arrays: (sorted distinct values, their counts)
        self.int_counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.moments: dict[str, list[float]] = {col: [0, 0.0, 0.0] for col in numeric}  # n, mean, M2
        self.has_missing: set[str] = set()
        self.tasks = list(exp.tasks)
        self.rows = 0
        self.labelled = np.zeros(len(self.tasks), dtype=np.int64)  # training rows in each task's space
        self.label_moments = [[0, 0.0, 0.0] for _ in self.tasks]  # n, mean, M2 of each task's training labels

    def update(self, frame: pd.DataFrame) -> EncoderFitter:
        source = frame.attrs.get("source", self.source)
        enc = self.encoder
        require_columns(frame, enc.categorical + enc.numeric + list(enc.lists), source, "a feature")
        for col in enc.categorical:
            if col in self.counts:
                integers = plain_integers(frame, col)
                self._count(col, integers, None if integers is not None else present_values(frame, col, source))
        for col, spec in enc.lists.items():
            elements = read_elements(frame, col, spec["separator"], source)
            if len(elements.offsets) > 1:
                self.longest[col] = max(self.longest[col], int(elements.lengths.max()))
            if not elements.integer and spec["elements"] == "integer":
                keys = (category_key(v) for v in pd.unique(elements.values))
                if any(integer_key(k) is None for k in keys):
                    spec["elements"] = "text"
            vocab = enc.vocab_column(col)
            if vocab in self.counts:
                self._count(vocab, *((elements.values, None) if elements.integer else (None, elements.values)))
        for col in self.counts:
            counts = self.counts[col]
            distinct = len(counts) + len(self.int_counts[col][0]) if col in self.int_counts else len(counts)
            if distinct > self.max_vocab:
                raise ValueError(
                    f"Categorical column `{col}` of {source}: expected at most [features] max_vocab = "
                    f"{self.max_vocab} distinct values, but got {distinct} in the training rows read so far. "
                    f"Hash it into a fixed number of ids with [features] hash_buckets = {{ {_toml_key(col)} = "
                    f"{_suggest_buckets(self.max_vocab)} }}, or raise max_vocab if its embedding table fits in memory"
                )
        labels, mask = encode_labels(self.tasks, frame, source)  # also checks the training labels early
        self.labelled += mask.sum(axis=0)
        for k in range(len(self.tasks)):
            self.label_moments[k] = _merge_moments(self.label_moments[k], labels[mask[:, k], k].astype(np.float64))
        self.rows += len(frame)
        for col, moments in self.moments.items():
            values = numeric_column(frame, col, source)
            missing = np.isnan(values)
            if missing.any():
                if self.encoder.missing_numeric == "error":
                    raise_missing(frame, col, missing, source)
                self.has_missing.add(col)
            self.moments[col] = _merge_moments(moments, values[~missing])
        return self

    def _count(self, col: str, integers: np.ndarray | None, present: pd.Series | None) -> None:
        """Add values to a vocabulary column's counts: plain integers, or else `present`, a Series of values."""
        counts = self.counts[col]
        if integers is not None and not counts:
            self._count_integers(col, integers)
            return
        self._fold_integers(col)
        values = pd.Series(integers) if integers is not None else present
        for value, count in values.value_counts(sort=False).items():
            key = category_key(value)
            if key in counts:
                counts[key][1] += int(count)
            else:
                counts[key] = [json_value(value, key), int(count)]

    def _count_integers(self, col: str, values: np.ndarray) -> None:
        values, counts = np.unique(values.astype(np.int64, copy=False), return_counts=True)
        if col in self.int_counts:
            seen, seen_counts = self.int_counts[col]
            values, where = np.unique(np.concatenate([seen, values]), return_inverse=True)
            counts = np.bincount(where, weights=np.concatenate([seen_counts, counts]), minlength=len(values))
        self.int_counts[col] = (values, counts.astype(np.int64))

    def _fold_integers(self, col: str) -> None:
        """Move a column's integer counts into its general counts, once it has a chunk of other values:
        from then on a value is counted by its key (7 and "7" are one category)."""
        if col not in self.int_counts:
            return
        counts = self.counts[col]
        for value, count in zip(*(a.tolist() for a in self.int_counts.pop(col)), strict=True):
            key = str(value)
            if key in counts:
                counts[key][1] += count
            else:
                counts[key] = [value, count]

    def _vocabulary(self, col: str) -> Sequence:
        """Values by count, most frequent first; ties by the key's text, so ids do not depend on row order."""
        if col in self.int_counts:  # integers only: sorted as arrays, without a Python object per value
            values, totals = self.int_counts[col]
            return IntegerVocabulary(values[np.lexsort((values.astype(str), -totals))])
        counts = self.counts[col]
        return [v for k, (v, _) in sorted(counts.items(), key=lambda kv: (-kv[1][1], kv[0]))]

    def finish(self) -> Encoder:
        enc = self.encoder
        if self.rows == 0:
            raise ValueError(f"Expected the training data {self.source} to have data rows, but it has none")
        for task, count in zip(self.tasks, self.labelled, strict=True):
            if count == 0:
                space = f" and meets `space` ({task.space})" if task.space_condition is not None else ""
                raise ValueError(
                    f"Task `{task.name}` has no labelled row in the training data {self.source}: expected some of "
                    f"its {self.rows} rows to have a value in {task.label_source}{space}, but none has. "
                    "Fill in the labels, or remove the task"
                )
        for col in self.counts:
            enc.vocabs[col] = self._vocabulary(col)
        for col, spec in enc.lists.items():
            spec["max_length"] = spec["max_length"] or max(self.longest[col], 1)
        for col, (n, mean, m2) in self.moments.items():
            if n == 0:  # nothing to standardise with or to impute: the feature would be a constant
                raise ValueError(
                    f"Numeric column `{col}` of {self.source}: expected some values, but all {self.rows} training "
                    "rows are empty. Fill it in, or leave it out with [data] exclude"
                )
            enc.means[col] = float(mean) if n else 0.0
            std = float(np.sqrt(m2 / n)) if n else 0.0
            if not (np.isfinite(enc.means[col]) and np.isfinite(std)):
                raise ValueError(
                    f"Numeric column `{col}` of {self.source}: expected values whose mean and standard deviation "
                    f"are finite in float64, but got mean {enc.means[col]}, std {std}: rescale the column (e.g. log)"
                )
            # A constant column's std is rounding noise (1e-10 for 699051.31 three times, 0 when merged a row at
            # a time): below 1e-12 of the mean it counts as 0, so whole and chunked reads encode alike.
            enc.stds[col] = std if std > 1e-12 * abs(enc.means[col]) and std > 0 else 1.0
        enc.indicators = [col for col in enc.numeric if col in self.has_missing]
        for task, (n, mean, m2) in zip(self.tasks, self.label_moments, strict=True):
            enc.label_stats[task.name] = {"rows": int(n), "mean": float(mean), "std": float(np.sqrt(m2 / n))}
        return enc


def _merge_moments(moments: list, present: np.ndarray) -> list:
    """[n, mean, M2] of the values seen so far and `present` together, by the pairwise (Chan et al.) update."""
    n_a, mean_a, m2_a = moments
    n_b = present.size
    if n_b == 0:
        return moments
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by finish()
        mean_b = float(present.mean())
        if not np.isfinite(mean_b):  # the sum overflowed, not the mean
            mean_b = float((present / n_b).sum())
        m2_b = float(np.square(present - mean_b).sum())
    n = n_a + n_b
    delta = mean_b - mean_a
    return [n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n]


def select_features(
    exp: Experiment, columns: list[str], frame: pd.DataFrame, source: str
) -> tuple[list[str], list[str], dict[str, str]]:
    """Categorical and numeric feature columns; patterns like `x*` are expanded, `auto` infers types."""
    used_by_tasks = {col for t in exp.tasks for col in t.columns}
    require_columns(frame, sorted(used_by_tasks), source, "a task")
    require_columns(frame, list(exp.data.exclude), source, "[data] exclude")
    require_columns(frame, list(exp.features.lists), source, "[features.lists]")
    leaking = sorted(set(exp.features.lists) & (used_by_tasks | set(exp.data.exclude)))
    if leaking:
        raise ValueError(
            f"Columns {leaking} of [features.lists] define a task's label or sample space, or are excluded"
        )
    blocked = used_by_tasks | set(exp.data.exclude) | set(exp.features.lists)

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
    for col in exp.features.hash_buckets:
        if col in numeric and col not in inferred:
            raise ValueError(
                f"Column `{col}` in [features] hash_buckets is listed as numeric: expected a categorical column"
            )
        if col in inferred and inferred[col] == "numeric":  # auto: a hashed column is a category
            numeric.remove(col)
            categorical.append(col)
            inferred[col] = "categorical"
        if col not in categorical:
            raise ValueError(
                f"Column `{col}` in [features] hash_buckets is not a categorical feature of {source}."
                f"{did_you_mean(col, categorical)} Categorical features: {', '.join(categorical) or 'none'}"
            )
    own_lists = [name for name, spec in exp.features.lists.items() if not spec.share]
    for col in exp.features.embedding_dims:
        if col not in categorical and col not in own_lists:
            raise ValueError(
                f"Expected the columns of [features] `embedding_dims` to be categorical features or lists with a "
                f"table of their own, but got {col!r}.{did_you_mean(col, categorical + own_lists)} Categorical "
                f"features: {', '.join(categorical) or 'none'}"
            )
    for name, spec in exp.features.lists.items():
        for key, col in (("share", spec.share), ("target", spec.target)):
            if col and col not in categorical:
                raise ValueError(
                    f"Expected [features.lists.{name}] `{key}` to name a categorical feature, but got {col!r}."
                    f"{did_you_mean(col, categorical)} Categorical features: {', '.join(categorical) or 'none'}"
                )
        widths = exp.features.embedding_dims
        if spec.target and widths.get(spec.share or name, 0) != widths.get(spec.target, 0):
            raise ValueError(
                f"Expected [features.lists.{name}] and its attention target `{spec.target}` to have one embedding "
                f"width, but [features] embedding_dims gives {widths.get(spec.share or name, 'the default')} and "
                f"{widths.get(spec.target, 'the default')}"
            )
    if not categorical and not numeric and not exp.features.lists:
        raise ValueError(f"No feature columns left in {source} after exclusions")
    return categorical, numeric, inferred


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _infer_kind(column: pd.Series, max_int_categories: int) -> str:
    if pd.api.types.is_bool_dtype(column):
        return "categorical"
    if pd.api.types.is_float_dtype(column):
        return "numeric"
    if pd.api.types.is_integer_dtype(column):
        return "categorical" if column.nunique() <= max_int_categories else "numeric"
    return "categorical"


def _suggest_buckets(max_vocab: int) -> int:
    """The largest power of two within max_vocab, at most 2^20: a table that max_vocab allows."""
    return 1 << min(20, max_vocab.bit_length() - 1)


def _toml_key(name: str) -> str:
    return name if name.replace("_", "a").replace("-", "a").isalnum() and name.isascii() else jsonio.dumps(name)
