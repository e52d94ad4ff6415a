"""From a DataFrame to column tensors: the Encoder, and a whole file encoded a chunk at a time.

Everything the model sees is learnt from the training split only (data/fitter.py). Id 0 of every
categorical field is reserved for values not seen in training (and for missing values); a column listed in
[features] hash_buckets has no vocabulary: its values map to N buckets by a fixed hash of their text.
A numeric column's missing values are imputed with the training mean, with a 0/1 missing-indicator
feature, or are an error. Labels and sample spaces are encoded by data/labels.py, and the tensors'
layout is data/tables.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from plerec.config import Experiment, TaskConfig
from plerec.data.columns import hashable, numeric_column, plain_integers, raise_missing, require_columns
from plerec.data.frames import bad_rows, pd
from plerec.data.frames import missing_values as _missing
from plerec.data.frames import plain_value as _plain
from plerec.data.groups import group_codes
from plerec.data.labels import encode_labels
from plerec.data.lists import Elements, bad_element, padded, read_elements
from plerec.data.tables import TABLE_FIELDS, EncodedTable, fill_table, pack_ids, stored_dtype, wide_fields
from plerec.data.vocab import IntegerVocabulary, category_key, compact, integer_key, stable_bucket
from plerec.models.layers import ListSpec


@dataclass(slots=True)
class Encoder:
    """Vocabularies and statistics fitted on the training split; serialisable as plain values."""

    categorical: list[str]
    numeric: list[str]
    vocabs: dict[str, Sequence] = field(default_factory=dict)  # lists, or IntegerVocabulary
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    indicators: list[str] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)
    missing_numeric: str = "impute"
    inferred: dict[str, str] = field(default_factory=dict)
    hash_buckets: dict[str, int] = field(default_factory=dict)
    # task -> {"rows", "mean", "std"} of its training labels (for binary tasks the mean is the positive rate)
    label_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    # list column -> its [features.lists] settings, `max_length` resolved, and `elements`: "integer" or "text"
    lists: dict[str, dict] = field(default_factory=dict)
    embedding_dims: dict[str, int] = field(default_factory=dict)  # column -> its width, where not embedding_dim
    group: str = ""  # the [evaluate] group column: labelled tables carry its group codes (EncodedTable.groups)
    _lookup: dict[str, dict[str, int]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _int_lookup: dict[str, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def vocab_sizes(self) -> list[int]:
        sizes = [self.hash_buckets[c] if c in self.hash_buckets else len(self.vocabs[c]) for c in self.categorical]
        return [n + 1 for n in sizes]  # +1: the reserved id 0

    @property
    def task_columns(self) -> list[str]:
        """The label, condition and space columns of the tasks (every column a condition reads), once each."""
        return list(dict.fromkeys(col for task in self.tasks for col in TaskConfig(**task).columns))

    @property
    def columns(self) -> list[str]:
        """Every column a transform reads: features, list features, the tasks' columns and the [evaluate] group
        column, once each."""
        group = [self.group] if self.group else []
        return list(dict.fromkeys([*self.categorical, *self.numeric, *self.lists, *self.task_columns, *group]))

    def vocab_column(self, name: str) -> str:
        """The column whose vocabulary a categorical or list column's values are looked up in."""
        return self.lists[name]["share"] or name if name in self.lists else name

    @property
    def list_width(self) -> int:
        return sum(spec["max_length"] for spec in self.lists.values())

    @property
    def list_specs(self) -> tuple[ListSpec, ...]:
        """The list fields as the model's input layer takes them."""
        specs = []
        for name, spec in self.lists.items():
            own = not spec["share"]
            specs.append(
                ListSpec(
                    name=name,
                    table=-1 if own else self.categorical.index(spec["share"]),
                    vocab_size=len(self.vocabs[name]) + 1 if own else 0,
                    pooling=spec["pooling"],
                    max_length=spec["max_length"],
                    target=self.categorical.index(spec["target"]) if spec["target"] else -1,
                    attention_dims=tuple(spec["attention_dims"]),
                    dim=self.embedding_dims.get(name, 0) if own else 0,
                )
            )
        return tuple(specs)

    def model_inputs(self) -> dict:
        """What `build_model` needs to know of the inputs: `build_model(name, config, num_tasks=T,
        **encoder.model_inputs())`."""
        return {
            "vocab_sizes": self.vocab_sizes,
            "num_dense": len(self.dense_names),
            "lists": self.list_specs,
            "dims": tuple(self.embedding_dims.get(c, 0) for c in self.categorical),
        }

    @property
    def list_dtype(self) -> np.dtype:
        """How a table stores list ids: the narrowest integer type that holds every list's ids."""
        sizes = self.vocab_sizes
        biggest = (
            max(
                (sizes[self.categorical.index(s["share"])] if s["share"] else len(self.vocabs[n]) + 1)
                for n, s in self.lists.items()
            )
            if self.lists
            else 1
        )
        return np.dtype(np.int16 if biggest <= np.iinfo(np.int16).max else np.int32)

    @property
    def dense_names(self) -> list[str]:
        return self.numeric + [f"{c}__missing" for c in self.indicators]

    @property
    def label_dtype(self) -> torch.dtype:
        """How a table stores its labels: uint8 when every task is binary (0 or 1), else float32."""
        return torch.uint8 if all(t["kind"] == "binary" for t in self.tasks) else torch.float32

    @classmethod
    def fit(cls, exp: Experiment, train: pd.DataFrame) -> Encoder:
        """Vocabularies and statistics of a training table held in memory."""
        from plerec.data.fitter import EncoderFitter  # not at the top: data/fitter.py imports this module

        return EncoderFitter(exp, train).update(train).finish()

    def transform(self, frame: pd.DataFrame, labels: bool = True) -> EncodedTable:
        """The frame as tensors. `labels=False` encodes the features only (rows to score, e.g. candidates to
        rank): no label column is read, and every row is outside every task's space."""
        source = frame.attrs.get("source", "the data")
        require_columns(frame, self.categorical + self.numeric + list(self.lists), source, "a feature")
        n = len(frame)
        sparse = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, col in enumerate(self.categorical):
            sparse[:, j] = self._category_ids(col, frame, source)
        lists = np.zeros((n, self.list_width), dtype=self.list_dtype)
        lengths = np.zeros((n, len(self.lists)), dtype=np.int16)
        start = 0
        for f, (col, spec) in enumerate(self.lists.items()):
            elements = read_elements(frame, col, spec["separator"], source)
            ids = self.element_ids(col, elements, frame.index, source)
            stop = start + spec["max_length"]
            lists[:, start:stop], lengths[:, f] = padded(ids, elements.offsets, spec["max_length"])
            start = stop
        dense = np.zeros((n, len(self.dense_names)), dtype=np.float32)
        for j, col in enumerate(self.numeric):
            values = numeric_column(frame, col, source)
            missing = np.isnan(values)
            if missing.any() and self.missing_numeric == "error":
                raise_missing(frame, col, missing, source)
            values = np.where(missing, self.means[col], values)
            with np.errstate(over="ignore"):  # overflow is reported below, with the rows
                dense[:, j] = (values - self.means[col]) / self.stds[col]
            overflow = ~np.isfinite(dense[:, j])
            if overflow.any():
                row = frame.index[overflow.argmax()]
                raise ValueError(
                    f"Numeric column `{col}` of {source}, row {row}: expected a value whose standardised form "
                    f"(x - {self.means[col]:.6g}) / {self.stds[col]:.6g} fits in float32, but got "
                    f"{_plain(frame[col].loc[row])!r}; rescale the column (e.g. log) or check the value."
                    + bad_rows(frame[col], overflow)
                )
            if col in self.indicators:
                dense[:, len(self.numeric) + self.indicators.index(col)] = missing
        sizes = self.vocab_sizes
        groups = None
        if labels:
            values, mask = encode_labels([TaskConfig(**t) for t in self.tasks], frame, source)
            if self.group:
                require_columns(frame, [self.group], source, "[evaluate] `group` (the groups of GAUC)")
                groups = torch.from_numpy(group_codes(frame, self.group, source))
        else:
            values, mask = np.zeros((n, len(self.tasks)), np.float32), np.zeros((n, len(self.tasks)), bool)
        return EncodedTable(
            sparse=torch.from_numpy(pack_ids(sparse, sizes)),
            dense=torch.from_numpy(dense),
            labels=torch.from_numpy(values).to(self.label_dtype),
            label_mask=torch.from_numpy(mask),
            lists=torch.from_numpy(lists),
            lengths=torch.from_numpy(lengths),
            source=source,
            wide=wide_fields(sizes),
            groups=groups,
        )

    def element_ids(self, col: str, elements: Elements, index, source: str) -> np.ndarray:
        """Ids of a list column's elements, looked up in its vocabulary (its own, or the shared field's)."""
        vocab = self.vocab_column(col)
        if elements.integer:
            values = elements.values
            if vocab in self.hash_buckets:
                distinct, where = np.unique(values, return_inverse=True)
                buckets = [stable_bucket(str(v), self.hash_buckets[vocab]) for v in distinct.tolist()]
                return np.asarray(buckets, dtype=np.int64)[where]
            return self._integer_ids(vocab, values)
        codes, uniques = pd.factorize(elements.values)
        keys = [category_key(v) for v in uniques]
        if self.lists[col]["elements"] == "integer":
            bad_keys = np.array([integer_key(k) is None for k in keys], dtype=bool)
            if bad_keys.any():
                raise bad_element(
                    col, source, elements, bad_keys[codes], index, "integer elements (the training lists hold integers)"
                )
        return self.key_ids(vocab, keys)[codes]

    def _category_ids(self, col: str, frame: pd.DataFrame, source: str) -> np.ndarray:
        """Ids of one categorical column: 1 + the vocabulary index (0: unseen or missing), or 1 + a bucket.

        Values are looked up by their text (`category_key`), so 7, 7.0 and "7" are one category whichever
        type a file or a chunk of it was read with; the key is computed once per distinct value."""
        integers = plain_integers(frame, col)
        if col not in self.hash_buckets and integers is not None:
            return self._integer_ids(col, integers)
        column = frame[col]
        missing = _missing(column)
        codes, uniques = pd.factorize(hashable(column, col, source))
        ids = self.key_ids(col, [category_key(v) for v in uniques])
        out = np.zeros(len(column), dtype=np.int64)
        present = (codes >= 0) & ~missing
        out[present] = ids[codes[present]]
        return out

    def key_ids(self, col: str, keys: list[str]) -> np.ndarray:
        """The ids of category keys in column `col`'s vocabulary (0: unseen) or hash buckets."""
        if col in self.hash_buckets:
            return np.array([stable_bucket(k, self.hash_buckets[col]) for k in keys], dtype=np.int64)
        if col not in self._lookup:
            lookup: dict[str, int] = {}
            for i, v in enumerate(self.vocabs[col]):
                lookup.setdefault(category_key(v), i + 1)
            self._lookup[col] = lookup
        return np.array([self._lookup[col].get(k, 0) for k in keys], dtype=np.int64)  # unseen: 0

    def _integer_ids(self, col: str, values: np.ndarray) -> np.ndarray:
        """`_category_ids` of a column of plain integers, vectorised: a binary search in the vocabulary's
        integer keys instead of a text key per distinct value. Same ids: an integer's key is its decimal
        text, and the vocabulary entries whose key is such a text (7, 7.0, "7") are the only ones it can
        match; the first of them wins, as in the text lookup."""
        if col not in self._int_lookup and isinstance(self.vocabs[col], IntegerVocabulary):
            keys = self.vocabs[col].values  # integers: each its own key; the first of equal ones wins
            order = np.argsort(keys, kind="stable")
            self._int_lookup[col] = (keys[order], order + 1)
        if col not in self._int_lookup:
            numbers, ids = [], []
            for i, v in enumerate(self.vocabs[col]):
                number = integer_key(category_key(v))
                if number is not None:
                    numbers.append(number)
                    ids.append(i + 1)
            keys = np.array(numbers, dtype=np.int64)
            first = np.unique(keys, return_index=True)[1]  # sorted keys; the first index of each
            self._int_lookup[col] = (keys[first], np.array(ids, dtype=np.int64)[first])
        keys, ids = self._int_lookup[col]
        if not len(keys):
            return np.zeros(len(values), dtype=np.int64)
        values = values.astype(np.int64, copy=False)
        at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
        return np.where(keys[at] == values, ids[at], 0)  # unseen: 0

    def drop_lookups(self) -> None:
        """Forget the value -> id tables built for `transform` (rebuilt from the vocabularies when next
        needed): 4 MB for the speed benchmark's 251,465 integer ids."""
        self._lookup.clear()
        self._int_lookup.clear()

    def state_dict(self) -> dict:
        """Plain values (lists, dicts, numbers, text): for JSON and checkpoints."""
        state = {name: getattr(self, name) for name in self.__slots__ if not name.startswith("_")}
        if not state["group"]:  # as an encoder without a group column was written before the key existed
            del state["group"]
        state["vocabs"] = {c: list(v) if isinstance(v, IntegerVocabulary) else v for c, v in self.vocabs.items()}
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> Encoder:
        from plerec.data.encoder_state import check_encoder_state

        check_encoder_state(state)  # a ValueError naming the key; the caller names the file
        vocabs = {c: compact(v) for c, v in state.get("vocabs", {}).items()}
        return cls(**{**state, "vocabs": vocabs})


def encode_file(path: str, encoder: Encoder, csv=None, chunk_rows: int = 32_768) -> EncodedTable:
    """A whole file as column tensors, encoded a chunk at a time: the file is never held whole as a
    DataFrame. Parquet row counts are known up front, so its tensors are filled in place."""
    from plerec.data.table import count_rows, iter_frames

    total = count_rows(path)
    columns = encoder.columns if total is not None else None
    chunks = (encoder.transform(frame) for frame in iter_frames(path, csv, chunk_rows, columns))
    if total is None:
        parts = [p for p in chunks if len(p)]
        if not parts:
            raise ValueError(f"Expected {path} to have data rows, but it has none")
        return EncodedTable(
            *(torch.cat([getattr(p, f) for p in parts]) for f in TABLE_FIELDS),
            source=str(path),
            wide=parts[0].wide,
            groups=torch.cat([p.groups for p in parts]) if encoder.group else None,
        )
    if total == 0:
        raise ValueError(f"Expected {path} to have data rows, but it has none")
    return fill_table(empty_table(encoder, total, str(path)), chunks)


def empty_table(encoder: Encoder, rows: int, source: str) -> EncodedTable:
    """Uninitialised tensors for `rows` encoded rows, to be filled in place (`fill_table`)."""
    num_tasks = len(encoder.tasks)
    sizes = encoder.vocab_sizes
    wide = wide_fields(sizes)
    return EncodedTable(
        sparse=torch.empty(rows, len(sizes) + len(wide), dtype=getattr(torch, stored_dtype(sizes).name)),
        dense=torch.empty(rows, len(encoder.dense_names)),
        labels=torch.empty(rows, num_tasks, dtype=encoder.label_dtype),
        label_mask=torch.empty(rows, num_tasks, dtype=torch.bool),
        lists=torch.empty(rows, encoder.list_width, dtype=getattr(torch, encoder.list_dtype.name)),
        lengths=torch.empty(rows, len(encoder.lists), dtype=torch.int16),
        source=source,
        wide=wide,
        groups=torch.empty(rows, dtype=torch.int64) if encoder.group else None,
    )
