"""From a DataFrame to column tensors: vocabularies, numeric statistics, labels and sample spaces.

Everything the model sees is learnt from the training split only. Id 0 of every categorical field
is reserved for values not seen in training (and for missing values); a column listed in
[features] hash_buckets has no vocabulary: its values map to N buckets by a fixed hash of their text.
A numeric column's missing values are imputed with the training mean, with a 0/1 missing-indicator
feature, or are an error. A task's label that is empty or NaN puts the row outside that task's sample
space. Anything else that would not be finite, or not a label, stops with an error naming the file, the
column and the first bad rows (counted from 0 at the first data row, in the file, whichever split or
chunk they were read in).
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from plerec import jsonio
from plerec.config import Experiment, TaskConfig
from plerec.data.conditions import evaluate_condition, known_rows, plain_condition
from plerec.data.frames import bad_rows, pd, plain_column
from plerec.data.frames import missing_values as _missing
from plerec.data.frames import plain_value as _plain
from plerec.data.lists import Elements, bad_element, padded, read_elements
from plerec.errors import did_you_mean
from plerec.models.layers import ListSpec

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _compact(vocabulary: list) -> Sequence:
    """A vocabulary read back from a state dict: an IntegerVocabulary when it is all plain ints that fit
    int64 (as the encoder fits them), else the list as it is."""
    if not vocabulary or not all(type(v) is int for v in vocabulary):
        return vocabulary
    try:
        return IntegerVocabulary(vocabulary)
    except OverflowError:
        return vocabulary


class IntegerVocabulary(Sequence):
    """A vocabulary of distinct integers, read like the list of Python ints it stands for, held as one
    int64 array: 8 bytes an entry instead of ~40 for a Python int and its list slot (8.6 MB → 2 MB for
    the speed benchmark's 251,465 ids). `Encoder.state_dict` writes it as a list."""

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        return self.values[index].tolist()  # a Python int, or a list for a slice

    def __iter__(self):
        return iter(self.values.tolist())

    def __eq__(self, other) -> bool:
        if isinstance(other, IntegerVocabulary):
            return np.array_equal(self.values, other.values)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # like a list

    def __repr__(self) -> str:
        return f"IntegerVocabulary({self.values.tolist()!r})"


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch: sparse ids (B, S), dense features (B, D), labels (B, T), which are in-space (B, T), and the
    list fields' padded ids (B, L) with their lengths (B, F) (L = the sum of their max_length; see lists.py)."""

    sparse: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    lists: torch.Tensor = None  # type: ignore[assignment]  # None: no list fields, (B, 0)
    lengths: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _no_lists(self)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self._fields()))

    def pin_memory(self) -> Batch:
        return Batch(*(t.pin_memory() for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.sparse, self.dense, self.labels, self.label_mask, self.lists, self.lengths

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """What the model reads: `model(*batch.inputs)`."""
        return self.sparse, self.dense, self.lists, self.lengths

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True, slots=True)
class EncodedTable:
    """A whole split as tensors: batches are slices or index-selects of these, never per-row Python.

    Ids are stored in int16 where every vocabulary fits it (below 32,768 ids). Where some do not, the
    table is packed rather than widened to int32: `sparse` is then int16 (N, S + W), column f holding the
    low 15 bits of field f's id (the whole id of a narrow field), and one more column per field listed in
    `wide` holding the bits above them. A field of 94,192 ids among 19 smaller ones costs 42 bytes a row
    instead of 80. Batches always carry the ids themselves (`Batch.sparse`, (B, S)).
    """

    sparse: torch.Tensor  # (N, S) ids, or (N, S + len(wide)) int16 packed ids
    dense: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N, T) 0 where masked; uint8 if every task is binary, else float32
    label_mask: torch.Tensor  # (N, T) bool
    lists: torch.Tensor = None  # type: ignore[assignment]  # (N, L) the list fields' padded ids; None: (N, 0)
    lengths: torch.Tensor = None  # type: ignore[assignment]  # (N, F) int16: each list field's length
    source: str = ""
    wide: tuple[int, ...] = ()  # fields whose ids are split over two int16 columns

    def __post_init__(self) -> None:
        _no_lists(self)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def ids(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Those rows' ids (len, S), unpacked."""
        stored = self.sparse[rows] if isinstance(rows, slice) else self.sparse.index_select(0, rows)
        return unpack_ids(stored, self.wide)

    def batch_table(self, index: slice) -> EncodedTable:
        """Rows as a table of views (no copy)."""
        return EncodedTable(*(getattr(self, name)[index] for name in TABLE_FIELDS), source=self.source, wide=self.wide)

    def batch(self, index: torch.Tensor | slice) -> Batch:
        """Rows as a batch: ids unpacked, labels as float32 whatever their stored type."""
        if isinstance(index, slice):
            labels = self.labels[index].to(torch.float32)
            return Batch(
                self.ids(index),
                self.dense[index],
                labels,
                self.label_mask[index],
                self.lists[index],
                self.lengths[index],
            )
        return Batch(
            self.ids(index),
            self.dense.index_select(0, index),
            self.labels.index_select(0, index).to(torch.float32),
            self.label_mask.index_select(0, index),
            self.lists.index_select(0, index),
            self.lengths.index_select(0, index),
        )


TABLE_FIELDS = ("sparse", "dense", "labels", "label_mask", "lists", "lengths")  # EncodedTable's tensors


def _no_lists(rows: Batch | EncodedTable) -> None:
    """Rows built without list fields get empty (N, 0) ones."""
    n = rows.labels.shape[0]
    if rows.lists is None:
        object.__setattr__(rows, "lists", torch.zeros(n, 0, dtype=torch.int16))
    if rows.lengths is None:
        object.__setattr__(rows, "lengths", torch.zeros(n, 0, dtype=torch.int16))


LOW_BITS = 15  # a packed id's low part: 0 .. 32,767, a non-negative int16


def wide_fields(vocab_sizes: list[int]) -> tuple[int, ...]:
    """The fields to split over two int16 columns: none where every vocabulary fits int16, or where one is
    too large for two (then the table is int32 or int64)."""
    biggest = max(vocab_sizes, default=1)
    if biggest <= np.iinfo(np.int16).max or biggest > 1 << (2 * LOW_BITS):
        return ()
    return tuple(f for f, size in enumerate(vocab_sizes) if size > np.iinfo(np.int16).max)


def pack_ids(ids: np.ndarray, vocab_sizes: list[int]) -> np.ndarray:
    """(N, S) int64 ids as the table stores them (see EncodedTable)."""
    wide = wide_fields(vocab_sizes)
    if not wide:
        return ids.astype(stored_dtype(vocab_sizes))
    packed = np.empty((len(ids), ids.shape[1] + len(wide)), dtype=np.int16)
    packed[:, : ids.shape[1]] = ids & ((1 << LOW_BITS) - 1)
    packed[:, ids.shape[1] :] = ids[:, list(wide)] >> LOW_BITS
    return packed


def unpack_ids(stored: torch.Tensor, wide: tuple[int, ...]) -> torch.Tensor:
    """The ids (B, S) of stored rows (B, S) or packed rows (B, S + W)."""
    if not wide:
        return stored
    num_fields = stored.shape[1] - len(wide)
    ids = stored[:, :num_fields].to(torch.int32)
    ids[:, list(wide)] += stored[:, num_fields:].to(torch.int32) << LOW_BITS
    return ids


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
    _lookup: dict[str, dict[str, int]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _int_lookup: dict[str, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def vocab_sizes(self) -> list[int]:
        sizes = [self.hash_buckets[c] if c in self.hash_buckets else len(self.vocabs[c]) for c in self.categorical]
        return [n + 1 for n in sizes]  # +1: the reserved id 0

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
        return EncoderFitter(exp, train).update(train).finish()

    def transform(self, frame: pd.DataFrame, labels: bool = True) -> EncodedTable:
        """The frame as tensors. `labels=False` encodes the features only (rows to score, e.g. candidates to
        rank): no label column is read, and every row is outside every task's space."""
        source = frame.attrs.get("source", "the data")
        _require_columns(frame, self.categorical + self.numeric + list(self.lists), source, "a feature")
        n = len(frame)
        sparse = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, col in enumerate(self.categorical):
            sparse[:, j] = self._category_ids(col, frame, source)
        lists = np.zeros((n, self.list_width), dtype=self.list_dtype)
        lengths = np.zeros((n, len(self.lists)), dtype=np.int16)
        start = 0
        for f, (col, spec) in enumerate(self.lists.items()):
            elements = read_elements(frame, col, spec["separator"], source)
            ids = self._element_ids(col, elements, frame.index, source)
            stop = start + spec["max_length"]
            lists[:, start:stop], lengths[:, f] = padded(ids, elements.offsets, spec["max_length"])
            start = stop
        dense = np.zeros((n, len(self.dense_names)), dtype=np.float32)
        for j, col in enumerate(self.numeric):
            values = _numeric_column(frame, col, source)
            missing = np.isnan(values)
            if missing.any() and self.missing_numeric == "error":
                _raise_missing(frame, col, missing, source)
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
        if labels:
            values, mask = encode_labels([TaskConfig(**t) for t in self.tasks], frame, source)
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
        )

    def _element_ids(self, col: str, elements: Elements, index, source: str) -> np.ndarray:
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
            bad_keys = np.array([_integer_key(k) is None for k in keys], dtype=bool)
            if bad_keys.any():
                raise bad_element(
                    col, source, elements, bad_keys[codes], index, "integer elements (the training lists hold integers)"
                )
        return self._key_ids(vocab, keys)[codes]

    def _category_ids(self, col: str, frame: pd.DataFrame, source: str) -> np.ndarray:
        """Ids of one categorical column: 1 + the vocabulary index (0: unseen or missing), or 1 + a bucket.

        Values are looked up by their text (`category_key`), so 7, 7.0 and "7" are one category whichever
        type a file or a chunk of it was read with; the key is computed once per distinct value."""
        integers = _plain_integers(frame, col)
        if col not in self.hash_buckets and integers is not None:
            return self._integer_ids(col, integers)
        column = frame[col]
        missing = _missing(column)
        codes, uniques = pd.factorize(_hashable(column, col, source))
        ids = self._key_ids(col, [category_key(v) for v in uniques])
        out = np.zeros(len(column), dtype=np.int64)
        present = (codes >= 0) & ~missing
        out[present] = ids[codes[present]]
        return out

    def _key_ids(self, col: str, keys: list[str]) -> np.ndarray:
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
                number = _integer_key(category_key(v))
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
        state["vocabs"] = {c: list(v) if isinstance(v, IntegerVocabulary) else v for c, v in self.vocabs.items()}
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> Encoder:
        from plerec.data.encoder_state import check_encoder_state

        check_encoder_state(state)  # a ValueError naming the key; the caller names the file
        vocabs = {c: _compact(v) for c, v in state.get("vocabs", {}).items()}
        return cls(**{**state, "vocabs": vocabs})


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
            hash_buckets={c: n for c, n in exp.features.hash_buckets.items() if c in categorical},
            lists={name: {**asdict(spec), "elements": "integer"} for name, spec in exp.features.lists.items()},
            embedding_dims=dict(exp.features.embedding_dims),
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
        _require_columns(frame, enc.categorical + enc.numeric + list(enc.lists), source, "a feature")
        for col in enc.categorical:
            if col in self.counts:
                integers = _plain_integers(frame, col)
                self._count(col, integers, None if integers is not None else _present_values(frame, col, source))
        for col, spec in enc.lists.items():
            elements = read_elements(frame, col, spec["separator"], source)
            if len(elements.offsets) > 1:
                self.longest[col] = max(self.longest[col], int(elements.lengths.max()))
            if not elements.integer and spec["elements"] == "integer":
                keys = (category_key(v) for v in pd.unique(elements.values))
                if any(_integer_key(k) is None for k in keys):
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
            values = _numeric_column(frame, col, source)
            missing = np.isnan(values)
            if missing.any():
                if self.encoder.missing_numeric == "error":
                    _raise_missing(frame, col, missing, source)
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
                counts[key] = [_json_value(value, key), int(count)]

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
    _require_columns(frame, sorted(used_by_tasks), source, "a task")
    _require_columns(frame, list(exp.data.exclude), source, "[data] exclude")
    _require_columns(frame, list(exp.features.lists), source, "[features.lists]")
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


def encode_labels(tasks: list[TaskConfig], frame: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N, T) float32 with 0 outside the space, and the space mask (N, T) bool (Eq. 9's δ)."""
    n = len(frame)
    labels = np.zeros((n, len(tasks)), dtype=np.float32)
    mask = np.zeros((n, len(tasks)), dtype=bool)
    for task in tasks:
        _require_columns(frame, list(task.columns), source, f"task `{task.name}`")
    for k, task in enumerate(tasks):
        plain = _plain_labels(task, frame)
        if plain is not None:
            values, in_space = plain
        else:
            cond = task.label_condition
            if cond is not None:  # outside the task where any column the condition reads is missing
                present = known_rows(cond, frame)
                values = evaluate_condition(cond, frame, source).astype(np.float32)
            else:
                column = frame[task.label]
                present = ~_missing(column)
                values = _label_values(task, column, present, source)
            in_space = present
            if task.space_condition is not None:
                in_space = in_space & evaluate_condition(task.space_condition, frame, source)
        labels[:, k] = np.where(in_space, values, 0.0)
        mask[:, k] = in_space
    return labels, mask


def _plain_labels(task: TaskConfig, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """A task's labels and sample space as `encode_labels` computes them, from columns of plain numbers
    without pandas; None where a column is not plain numbers, a condition compares text, or a value is
    bad (then `encode_labels` takes the general path, which names the bad rows)."""
    cond = task.label_condition
    if cond is not None:
        plain = plain_condition(cond, frame)
        if plain is None:
            return None
        holds, present = plain
        values = holds.astype(np.float32)
    else:
        numbers = plain_column(frame, task.label)
        if numbers is None:
            return None
        numbers = numbers.astype(np.float64)
        present = ~np.isnan(numbers)
        if _bad_labels(task, numbers, present).any():
            return None
        values = np.where(present, numbers, 0.0)
    in_space = present
    if task.space_condition is not None:
        plain = plain_condition(task.space_condition, frame)
        if plain is None:
            return None
        in_space = plain[0] & present
    return values, in_space


def _label_values(task: TaskConfig, column: pd.Series, present: np.ndarray, source: str) -> np.ndarray:
    numeric = _to_float(column, present)
    bad = _bad_labels(task, numeric, present)
    if bad.any():
        row = column.index[bad.argmax()]
        expected = "0 or 1 (or empty for rows outside the task)" if task.kind == "binary" else "a finite number"
        hint = (
            " Use `condition` to define a binary label from a text column."
            if task.kind == "binary"
            else " Regression labels must be finite and within float32's range (about ±3.4e38)."
        )
        raise ValueError(
            f"Label column `{task.source_column}` of task `{task.name}` in {source}, row {row}: "
            f"expected {expected}, but got {_plain(column.loc[row])!r}.{hint}" + bad_rows(column, bad)
        )
    return np.where(present, numeric, 0.0)


def _bad_labels(task: TaskConfig, numbers: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Rows whose label value the task cannot take: not finite; not 0 or 1 (binary); beyond float32."""
    bad = present & ~np.isfinite(numbers)
    if task.kind == "binary":
        bad |= present & np.isfinite(numbers) & (numbers != 0) & (numbers != 1)
    else:
        bad |= present & (np.abs(numbers) > FLOAT32_MAX)  # labels are float32: it would become inf
    return bad


def _numeric_column(frame: pd.DataFrame, col: str, source: str) -> np.ndarray:
    """The column as float64, NaN where missing; an error names the rows that are not finite numbers."""
    plain = plain_column(frame, col)
    if plain is not None:  # as below, without pandas: the same values, and any bad one goes below
        values = plain.astype(np.float64)
        if not np.isinf(values).any():  # NaN is a missing value; ±inf goes below, to be reported
            return values
    column = frame[col]
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64)
    missing = _missing(column)
    numeric = _to_float(column, ~missing)
    # Text, and also ±inf: imputing it would hide a broken value, keeping it makes the standardised column NaN.
    bad = ~missing & ~np.isfinite(numeric)
    if bad.any():
        row = column.index[bad.argmax()]
        raise ValueError(
            f"Numeric column `{col}` of {source}, row {row}: expected a finite number, "
            f"but got {_plain(column.loc[row])!r} (list it under [features] categorical if it is a category; "
            "leave the cell empty if the value is missing)." + bad_rows(column, bad)
        )
    return numeric


def _to_float(column: pd.Series, present: np.ndarray) -> np.ndarray:
    """The column as float64 where `present`, NaN elsewhere and where a value is not a number."""
    try:
        return pd.to_numeric(column.where(present), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError, OverflowError):  # e.g. Python ints beyond int64 or odd objects: one by one
        out = np.full(len(column), np.nan)
        for i in np.flatnonzero(present):
            try:
                out[i] = float(column.iloc[i])
            except (TypeError, ValueError, OverflowError):
                pass
        return out


def _raise_missing(frame: pd.DataFrame, col: str, missing: np.ndarray, source: str) -> None:
    row = frame.index[missing.argmax()]
    raise ValueError(
        f"Numeric column `{col}` of {source}, row {row}: value is missing ({int(missing.sum())} rows of the "
        f"{len(missing)} read) and [data] missing_numeric = 'error'; fill in the values, or set it to 'impute' "
        "to use the training mean and an indicator." + bad_rows(frame[col], missing)
    )


def _hashable(column: pd.Series, col: str, source: str) -> pd.Series:
    """The column, after checking that its values are single values, not lists or tables (Parquet nested types)."""
    if column.dtype == object:
        odd = column.map(lambda v: isinstance(v, list | tuple | dict | set | np.ndarray)).to_numpy(dtype=bool)
        if odd.any():
            row = column.index[odd.argmax()]
            raise ValueError(
                f"Categorical column `{col}` of {source}, row {row}: expected a single value (text or a number), "
                f"but got {type(column.loc[row]).__name__} {column.loc[row]!r}." + bad_rows(column, odd)
            )
    return column


def _present_values(frame: pd.DataFrame, col: str, source: str) -> pd.Series:
    """A categorical column's values that are not missing (checked to be single values)."""
    column = frame[col]
    return _hashable(column[~_missing(column)], col, source)


def _plain_integers(frame: pd.DataFrame, col: str) -> np.ndarray | None:
    """The column as numpy integers that fit in int64 (no missing values possible), if it is one."""
    values = plain_column(frame, col)
    return values if values is not None and values.dtype.kind in "iu" else None


def _integer_key(key: str) -> int | None:
    """The integer a category key stands for, when the key is an integer's decimal text."""
    try:
        number = int(key)
    except ValueError:
        return None
    return number if str(number) == key and -(2**63) <= number < 2**63 else None


def category_key(value) -> str:
    """The text a categorical value is counted, looked up and hashed by. Numbers compare by value and text
    that reads as a number compares as that number (7, 7.0, "7" and "7.0" are one category), so that a
    category does not depend on the type a file, or one chunk of a CSV file, happened to be read with."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if not isinstance(value, str):
        return str(value)
    text = value.strip()
    if text in _BOOL_TEXT:  # what pandas reads as a boolean in a column without other text
        return _BOOL_TEXT[text]
    if "_" in text:  # Python reads "1_000" as a number, pandas does not
        return value
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return value
    return category_key(number) if np.isfinite(number) else value


_BOOL_TEXT = {"True": "True", "TRUE": "True", "true": "True", "False": "False", "FALSE": "False", "false": "False"}


def stable_bucket(key: str, buckets: int) -> int:
    """1 + a bucket in [0, buckets) from a fixed hash of the text (BLAKE2b, not Python's salted `hash`):
    the same in every process, run and machine. Id 0 stays reserved for missing values."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % buckets


def _json_value(value, key: str):
    """A vocabulary entry that serialises to JSON and checkpoints: the value, or its text (also for ±inf,
    which JSON cannot hold: the text has the same key, so it is the same category)."""
    value = _plain(value)
    if isinstance(value, float) and not np.isfinite(value):
        return key
    return value if isinstance(value, str | int | float | bool) else key


def _suggest_buckets(max_vocab: int) -> int:
    """The largest power of two within max_vocab, at most 2^20: a table that max_vocab allows."""
    return 1 << min(20, max_vocab.bit_length() - 1)


def _toml_key(name: str) -> str:
    return name if name.replace("_", "a").replace("-", "a").isalnum() and name.isascii() else jsonio.dumps(name)


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


def stored_dtype(vocab_sizes: list[int]) -> np.dtype:
    """The dtype of a table's `sparse` (see EncodedTable): int16 when packed, else the narrowest that
    holds every id."""
    biggest = max(vocab_sizes, default=1)
    if wide_fields(vocab_sizes):
        return np.dtype(np.int16)
    for dtype in (np.int16, np.int32):
        if biggest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


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


def encode_file(path: str, encoder: Encoder, csv=None, chunk_rows: int = 32_768) -> EncodedTable:
    """A whole file as column tensors, encoded a chunk at a time: the file is never held whole as a
    DataFrame. Parquet row counts are known up front, so its tensors are filled in place."""
    from plerec.data.table import count_rows, iter_frames

    total = count_rows(path)
    columns = None
    if total is not None:
        columns = list(
            dict.fromkeys(encoder.categorical + encoder.numeric + list(encoder.lists) + _task_columns(encoder))
        )
    chunks = (encoder.transform(frame) for frame in iter_frames(path, csv, chunk_rows, columns))
    if total is None:
        parts = [p for p in chunks if len(p)]
        if not parts:
            raise ValueError(f"Expected {path} to have data rows, but it has none")
        return EncodedTable(
            *(torch.cat([getattr(p, f) for p in parts]) for f in TABLE_FIELDS),
            source=str(path),
            wide=parts[0].wide,
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
    )


def fill_table(table: EncodedTable, parts: Iterable[EncodedTable]) -> EncodedTable:
    """Copy consecutive encoded chunks into the table, which they must fill exactly."""
    start = 0
    for part in parts:
        stop = start + len(part)
        for name in TABLE_FIELDS:
            getattr(table, name)[start:stop] = getattr(part, name)
        start = stop
    if start != len(table):  # the file changed while it was read
        raise ValueError(f"Expected {len(table)} rows in {table.source}, but read {start}")
    return table


def _task_columns(encoder: Encoder) -> list[str]:
    columns = []
    for task in (TaskConfig(**t) for t in encoder.tasks):
        columns.extend(task.columns)
    return columns
