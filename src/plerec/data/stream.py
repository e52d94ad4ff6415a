"""Streaming Parquet input: row groups read one at a time, so memory is bounded by a row group and
the model, not by the data set.

Each epoch the list of row groups (over every file of the split) is shuffled with the seed and
rank r takes every W-th group; rows are shuffled inside each group. Every row is read once per epoch.
Every rank takes the same number of steps, that of the rank with the most rows this epoch: a rank
that runs out first takes empty steps (its gradient is zero, and each task's loss is normalised by
its rows in the whole global batch), so DDP's collective calls stay in step. Evaluation reads every
group exactly once, spread over the ranks.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plerec.config import Experiment, TaskConfig
from plerec.data.coverage import LabelCounts
from plerec.data.encode import Encoder, empty_table
from plerec.data.frames import ArrowFrame, arrow_frames
from plerec.data.labels import encode_labels
from plerec.data.table import check_column_names, open_parquet, reader_errors
from plerec.data.tables import Batch, EncodedTable, fill_table
from plerec.distributed import SINGLE_PROCESS, DistContext
from plerec.jsonio import write_json

ENCODER_FILE = "encoder.json"
SLICE_ROWS = 32_768  # rows read and encoded at a time


@dataclass(frozen=True, slots=True)
class RowGroup:
    file: str
    index: int
    first_row: int  # the row number of its first row within the file
    num_rows: int


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of a split: one file, or every *.parquet file under a folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Data path {path} does not exist")
    files = sorted(p for p in path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"Expected Parquet files (*.parquet) under {path}, but found none")
    for file in files:
        if file.suffix not in (".parquet", ".pq"):
            raise ValueError(f"Expected streaming input to be Parquet (.parquet), but got {file}")
    return files


def row_groups(files: list[Path]) -> list[RowGroup]:
    """Every row group of the files, after checking that all files share one schema with distinct
    column names, and that they hold at least one row."""
    groups: list[RowGroup] = []
    reference = None
    for file in files:
        meta = open_parquet(file)
        schema = meta.schema_arrow
        check_column_names(schema.names, str(file))
        if reference is None:
            reference = (file, schema)
        elif not schema.equals(reference[1]):
            ref_file, ref_schema = reference
            diffs = [
                f"`{f.name}` {f.type} vs {ref_schema.field(f.name).type}"
                for f in schema
                if f.name in ref_schema.names and not f.type.equals(ref_schema.field(f.name).type)
            ]
            only_here = sorted(set(schema.names) - set(ref_schema.names))
            only_there = sorted(set(ref_schema.names) - set(schema.names))
            detail = "; ".join(
                part
                for part in (
                    f"types differ: {', '.join(diffs)}" if diffs else "",
                    f"only in {file.name}: {only_here}" if only_here else "",
                    f"only in {Path(ref_file).name}: {only_there}" if only_there else "",
                )
                if part
            )
            raise ValueError(f"Parquet files disagree on schema: {file} differs from {ref_file} ({detail})")
        first = 0
        for i in range(meta.num_row_groups):
            n = meta.metadata.row_group(i).num_rows
            groups.append(RowGroup(str(file), i, first, n))
            first += n
    if not any(g.num_rows for g in groups):
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} Parquet files)"
        raise ValueError(f"Expected {where} to have data rows, but it has none")
    return groups


def read_slices(group: RowGroup, columns: list[str] | None = None, rows: int | None = None) -> Iterator[ArrowFrame]:
    """One row group in slices of at most `rows` rows, so that a large group is never held whole (in
    Arrow, or in pandas where a column needs it); of `columns`, those the file lacks are left out (the
    encoder names them)."""
    reader = open_parquet(Path(group.file), pre_buffer=False)  # pre-buffering holds the group's pages at once
    if columns is not None:
        columns = [c for c in columns if c in reader.schema_arrow.names]
    batches = reader.iter_batches(
        batch_size=rows or SLICE_ROWS, row_groups=[group.index], columns=columns, use_threads=False
    )
    with reader_errors(group.file):
        yield from arrow_frames(batches, f"{group.file} (row group {group.index})", group.first_row)  # file rows


def encode_group(group: RowGroup, encoder: Encoder, columns: list[str]) -> EncodedTable:
    """One row group as column tensors, encoded a slice at a time into tensors allocated once."""
    slices = (encoder.transform(frame) for frame in read_slices(group, columns))
    return fill_table(empty_table(encoder, group.num_rows, f"{group.file} (row group {group.index})"), slices)


def check_stream(path: str | Path, encoder: Encoder) -> None:
    """Check a streamed split before training starts, from the Parquet metadata only: it has rows, its files
    agree on schema, and it holds every column the encoder reads (features, labels, conditions)."""
    file = row_groups(parquet_files(path))[0].file  # every file has this file's schema (row_groups checks)
    names = set(open_parquet(Path(file)).schema_arrow.names)
    missing = [c for c in encoder.columns if c not in names]
    if missing:
        raise ValueError(
            f"Expected {file} to have the column(s) {', '.join(map(repr, missing))} (features, labels, "
            f"conditions and the [evaluate] group column of the experiment), but it has only {sorted(names)}"
        )


def count_labels(path: str | Path, encoder: Encoder) -> LabelCounts:
    """Each task's rows in its space and positive rows in a streamed split, in one pass that reads only the
    label, condition and space columns, encoded as training encodes them (`encode_labels`)."""
    tasks = [TaskConfig(**t) for t in encoder.tasks]
    columns = encoder.task_columns
    counts = LabelCounts.zeros(len(tasks))
    for group in row_groups(parquet_files(path)):
        for frame in read_slices(group, columns):
            counts += LabelCounts.of(*encode_labels(tasks, frame, frame.attrs["source"]))
    return counts


def save_encoder(encoder: Encoder, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ENCODER_FILE
    return write_json(path, encoder.state_dict(), indent=1)


def load_encoder(folder: str | Path, exp: Experiment) -> Encoder:
    path = Path(folder) / ENCODER_FILE
    if not path.is_file():
        raise ValueError(f"Expected a prepared encoder at {path} (write it with `plerec prepare`), but found none")
    try:
        encoder = Encoder.from_state_dict(json.loads(path.read_text()))
    except RecursionError:
        raise ValueError(f"The prepared encoder {path} is not valid: its values are nested too deeply") from None
    except ValueError as err:  # invalid JSON included
        raise ValueError(f"The prepared encoder {path} is not valid: {err}") from None
    from plerec.models.family import state_shapes

    try:  # before any data is read: hash buckets can describe embedding tables too large to allocate
        state_shapes(exp.model_name, exp.model, num_tasks=len(exp.tasks), **encoder.model_inputs())
    except ValueError as err:
        raise ValueError(f"The prepared encoder {path} describes a model that cannot be built: {err}") from None
    tasks = [(t["name"], t["kind"]) for t in encoder.tasks]
    if tasks != [(t.name, t.kind) for t in exp.tasks]:
        raise ValueError(f"The prepared encoder {path} is for tasks {tasks}, not the experiment's")
    encoder.group = exp.evaluate.group  # an evaluation setting of the experiment, not a fitted statistic
    return encoder


class ParquetBatches:
    """Training batches streamed from Parquet row groups; same interface as InMemoryBatches."""

    def __init__(
        self,
        path: str | Path,
        encoder: Encoder,
        batch_size: int,
        seed: int,
        ctx: DistContext = SINGLE_PROCESS,
    ):
        self.groups = row_groups(parquet_files(path))
        self.encoder = encoder
        self.columns = encoder.columns
        self.local_batch = batch_size // ctx.world_size
        self.seed = seed
        self.ctx = ctx
        self.epoch_index = 0

    def _assignment(self, epoch: int) -> list[list[tuple[int, RowGroup]]]:
        """Each rank's row groups for the epoch, with each group's position in the whole split."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        shuffled = [(int(i), self.groups[i]) for i in order]
        return [shuffled[r :: self.ctx.world_size] for r in range(self.ctx.world_size)]

    def steps(self, epoch: int) -> int:
        rows = [sum(g.num_rows for _, g in mine) for mine in self._assignment(epoch)]
        return max(math.ceil(n / self.local_batch) for n in rows)

    def __len__(self) -> int:
        return self.steps(self.epoch_index)

    def state(self) -> dict:
        """Where the shuffling stands: taken at the start of an epoch, it replays that epoch. Every
        shuffle is a function of (seed, epoch, row group), so the epoch number is the whole state and
        it is the same on every rank."""
        return {"epoch_index": self.epoch_index}

    def load_state(self, state: dict) -> None:
        self.epoch_index = int(state["epoch_index"])

    def epoch(self, skip: int = 0) -> Iterator[Batch]:
        """The epoch's batches; `skip` leaves out the first ones (a resumed run has done them); row groups
        wholly inside the skipped batches are not read."""
        epoch = self.epoch_index
        self.epoch_index += 1
        steps = self.steps(epoch)
        mine = self._assignment(epoch)[self.ctx.rank]
        done = min(skip, steps)
        to_drop = done * self.local_batch  # rows of this rank inside the skipped batches
        pending: deque[tuple[EncodedTable, torch.Tensor]] = deque()  # groups read, with their rows not yet used
        available = 0
        for position, group in mine:
            if to_drop >= group.num_rows:
                to_drop -= group.num_rows
                continue
            chunk = encode_group(group, self.encoder, self.columns)
            order = np.random.default_rng([self.seed, epoch, position]).permutation(len(chunk))
            pending.append((chunk, torch.from_numpy(order[to_drop:])))
            available += len(chunk) - to_drop
            to_drop = 0
            while available >= self.local_batch and done < steps:
                yield _next_rows(pending, self.local_batch)
                available -= self.local_batch
                done += 1
            if done == steps:
                return
        if available and done < steps:
            yield _next_rows(pending, available)
            done += 1
        for _ in range(steps - done):  # this rank ran out of rows first: empty steps keep DDP in step
            yield self._empty()

    def _empty(self) -> Batch:
        num_tasks = len(self.encoder.tasks)
        return Batch(
            torch.zeros(0, len(self.encoder.categorical), dtype=torch.int32),
            torch.zeros(0, len(self.encoder.dense_names)),
            torch.zeros(0, num_tasks),
            torch.zeros(0, num_tasks, dtype=torch.bool),
            torch.zeros(0, self.encoder.list_width, dtype=torch.int32),
            torch.zeros(0, len(self.encoder.lists), dtype=torch.int16),
        )


def local_eval_chunks(path: str | Path, encoder: Encoder, ctx: DistContext = SINGLE_PROCESS) -> Iterator[EncodedTable]:
    """This rank's share of an evaluation split: every row group once over all ranks."""
    groups = row_groups(parquet_files(path))
    columns = encoder.columns
    for group in groups[ctx.rank :: ctx.world_size]:
        for frame in read_slices(group, columns):
            yield encoder.transform(frame)


def _next_rows(pending: deque[tuple[EncodedTable, torch.Tensor]], count: int) -> Batch:
    """The next `count` rows of the pending groups, in their shuffled order: one gather per group they
    come from (never a copy of a whole group); a group is let go once its rows are used."""
    parts = []
    while count:
        table, order = pending[0]
        taken, rest = order[:count], order[count:]
        parts.append(table.batch(taken))
        count -= len(taken)
        if len(rest):
            pending[0] = (table, rest)
        else:
            pending.popleft()
    if len(parts) == 1:
        return parts[0]
    return Batch(*(torch.cat(fields) for fields in zip(*(part._fields() for part in parts), strict=True)))
