"""Rank and world helpers over torch.distributed; in one process every helper is a no-op.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; plerec reads them, joins
the process group (gloo on CPU, NCCL on GPU) and wraps the model in DistributedDataParallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_joined = False  # this process joined a process group (init_distributed): see `joined`


@dataclass(frozen=True, slots=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """`cpu`, `cuda` or `auto` (CUDA when available)."""
    if choice not in ("cpu", "cuda", "auto"):
        raise ValueError(f"Expected device 'cpu', 'cuda' or 'auto', but got {choice!r}")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("Expected a CUDA device for device = 'cuda', but torch sees none")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str = "cpu", env: dict[str, str] | None = None) -> DistContext:
    """Join the process group when WORLD_SIZE > 1 (as set by torchrun); otherwise a one-process context."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    missing = [name for name in RENDEZVOUS_VARS if not env.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but the rendezvous variable(s) {', '.join(missing)} are not set; "
            "start distributed training with `torchrun --nproc-per-node N -m plerec train ...`"
        )
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    target = resolve_device(device, local_rank)
    if not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    global _joined
    _joined = True
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def check_batch_size(batch_size: int, ctx: DistContext) -> int:
    """The per-rank batch size: the global batch is divided across ranks."""
    if batch_size % ctx.world_size:
        raise ValueError(
            f"Expected [train] batch_size ({batch_size}) to be divisible by the world size ({ctx.world_size}): "
            "the global batch is split evenly across ranks"
        )
    return batch_size // ctx.world_size


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(local: torch.Tensor, sizes: list[int], ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's rows in rank order. `sizes` are the row counts of every rank; rows are
    padded only for transport and trimmed again, so no row is duplicated."""
    if not ctx.enabled:
        return local
    width = max(sizes)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    if padded.dtype == torch.bool:  # gloo has no bool all_gather
        parts_u8 = [p.to(torch.uint8) for p in parts]
        dist.all_gather(parts_u8, padded.to(torch.uint8))
        parts = [p.bool() for p in parts_u8]
    else:
        dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def shard_bounds(num_rows: int, ctx: DistContext) -> list[tuple[int, int]]:
    """Contiguous, disjoint row ranges covering [0, num_rows), one per rank."""
    base, extra = divmod(num_rows, ctx.world_size)
    bounds, start = [], 0
    for r in range(ctx.world_size):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def joined() -> bool:
    """Whether this process joined a process group (`init_distributed`): if so, it should end with
    `os._exit` once everything is written, flushed and closed (the `plerec` command does).

    Once DistributedDataParallel has wrapped a model, torch (2.13) never frees the gloo group: its threads
    (`pt_gloo_runloop`, `gloo_tcp_loop`) outlive `destroy_process_group` and run until the process ends, and
    tearing the interpreter down under them now and then aborts a finished rank (`terminate called without
    an active exception`, SIGABRT, after every file was written: 3 in 25 two-rank runs on a loaded 2-core
    machine)."""
    return _joined
