"""Batch sources for training and evaluation over in-memory column tensors.

A training source yields the same number of steps on every rank: each global batch of the epoch's
permutation is split into one contiguous slice per rank, so DDP over N ranks sees exactly the rows
one process would see in the same step. Streaming sources (data/stream.py) follow the same interface.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from plerec.data.tables import Batch, EncodedTable
from plerec.distributed import SINGLE_PROCESS, DistContext, shard_bounds


class InMemoryBatches:
    """Shuffled global batches of a whole split held as tensors; batches are index-selects."""

    def __init__(self, table: EncodedTable, batch_size: int, seed: int, ctx: DistContext = SINGLE_PROCESS):
        self.table = table
        self.batch_size = batch_size
        self.ctx = ctx
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.table) / self.batch_size)

    def state(self) -> dict:
        """Where the shuffling stands: taken at the start of an epoch, it replays that epoch."""
        return {"generator": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def epoch(self, skip: int = 0) -> Iterator[Batch]:
        """The epoch's batches; `skip` leaves out the first ones (a resumed run has done them)."""
        n = len(self.table)
        # Same on every rank. int32 where it fits: half the memory, the same permutation as int64.
        order = torch.randperm(n, generator=self.generator, dtype=torch.int32 if n < 2**31 else torch.int64)
        for i in range(skip, len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            if self.ctx.enabled:
                index = index.tensor_split(self.ctx.world_size)[self.ctx.rank]
            yield self.table.batch(index)


def local_rows(table: EncodedTable, ctx: DistContext = SINGLE_PROCESS) -> EncodedTable:
    """This rank's disjoint, contiguous share of a split for evaluation, in row order, as views."""
    start, stop = shard_bounds(len(table), ctx)[ctx.rank]
    return table.batch_table(slice(start, stop))
