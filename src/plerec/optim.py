"""Adam for plerec's training loop: a dense Adam, and a sparse-aware Adam for embedding tables.

A dense Adam step walks every row of every table at every step; with vocabularies in the hundreds of
thousands that step costs more than the whole model. `RowSparseAdam` ("lazy" Adam) keeps Adam's moments
per row and updates a row only when its gradient is present, with exactly torch.optim.Adam's
arithmetic, so a row touched at every step ends with the weights dense Adam gives it.
(torch.optim.SparseAdam places ε differently, so its updates differ where gradients are small.)

Neither derives from `torch.optim.Optimizer`: constructing one imports TorchDynamo (measured with torch
2.13: 72 MiB of resident memory and 1.3 s, for a compiler plerec does not use). Their state dicts have
torch.optim's layout ({"state": {index: {...}}, "param_groups": [...]}), and `Adam` keeps torch.optim.Adam's
per-parameter state (step, exp_avg, exp_avg_sq) and runs the same fused kernel, so its updates are
torch.optim.Adam(fused=True)'s bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.nn import functional as nn_functional

FUSED_DEVICES = ("cpu", "cuda")  # where torch has the fused Adam kernel


class _Optimizer:
    """Parameter groups, state, zero_grad and (de)serialisation in torch.optim's layout."""

    defaults: dict

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict):
        lr, (beta1, beta2), eps = defaults["lr"], defaults["betas"], defaults["eps"]
        decay = defaults.get("weight_decay", 0.0)
        if lr <= 0 or eps <= 0 or decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
            raise ValueError(f"Expected lr > 0, eps > 0, weight_decay >= 0 and betas in [0, 1), but got {shown}")
        self.defaults = defaults
        params = list(params)
        if not params:
            raise ValueError("Expected at least one parameter to optimise, but got none")
        self.param_groups = [{"params": params, **defaults}]
        self.state: dict[torch.Tensor, dict] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if p.grad is None:
                continue
            if set_to_none or p.grad.is_sparse:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        index = {p: i for i, p in enumerate(self._params())}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
            for g in self.param_groups
        ]
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        params = self._params()
        groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in groups]
        expected = [len(g["params"]) for g in self.param_groups]
        if sizes != expected:
            raise ValueError(
                f"Expected an optimiser state for parameter groups of sizes {expected}, but the saved state has {sizes}"
            )
        for group, saved in zip(self.param_groups, groups, strict=True):
            group.update({k: v for k, v in saved.items() if k in self.defaults})
        self.state = {}
        for i, saved in state_dict["state"].items():
            p = params[int(i)]
            # copies: the saved state may be another optimiser's live state
            self.state[p] = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in saved.items()}


class Adam(_Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient, no amsgrad), with its fused kernel where
    torch has one (CPU, CUDA) and its single-tensor arithmetic elsewhere."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        "Expected dense gradients (use RowSparseAdam for sparse embeddings), but got a sparse one"
                    )
                if p not in self.state:  # torch.optim.Adam's state, as its fused path creates it
                    self.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), params in buckets.items():
                if device.type in FUSED_DEVICES and hasattr(torch, "_fused_adam_"):
                    self._fused(group, params)
                else:
                    for p in params:
                        self._single(group, p)

    def _fused(self, group: dict, params: list[torch.Tensor]) -> None:
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _single(self, group: dict, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] += 1
        grad = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
        _update_moments(state["exp_avg"], state["exp_avg_sq"], grad, group["betas"])
        denom, step_size = _denominator_and_step(state["exp_avg_sq"], group, float(state["step"]))
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)


class RowSparseAdam(_Optimizer):
    """Lazy Adam for parameters with sparse gradients (nn.Embedding(sparse=True)).

    A batch's gradient holds one row per id looked up, duplicates included. The ids are sorted once (a
    stable sort, so each row's terms keep their order) and every run of equal ids is summed by one
    `embedding_bag` over the sorted positions: the same sums, term for term, as adding the duplicates up
    in order with `index_add_`, at less than half its cost (index_add_ adds slice by slice, one thread). Both
    moments of a row live side by side in one (rows, 2, dim) tensor, so a step reads and writes them with
    one gather and one scatter; the touched rows of the table are read, updated and written back whole.

    A dense gradient is taken too, with the same rule: its rows that are not all zero are the touched ones.
    That is what DDP leaves under NCCL, which has no sparse all-reduce: the embedding gradients travel
    dense and, summed over the ranks, are non-zero on the rows some rank's batch touched. So the update is
    lazy, without weight decay, on every device and however many processes train.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @staticmethod
    def _touched(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the gradient touches (ascending) and their summed gradients."""
        if not grad.is_sparse:  # a row no batch touched has an all-zero gradient
            rows = grad.reshape(len(grad), -1).ne(0).any(1).nonzero().squeeze(1)
            return rows, grad.index_select(0, rows)
        if grad.is_coalesced():
            return grad.indices()[0], grad.values()
        ids, values = grad._indices()[0], grad._values()
        ordered, order = torch.sort(ids, stable=True)
        rows, counts = torch.unique_consecutive(ordered, return_counts=True)
        starts = counts.new_zeros(len(rows))
        torch.cumsum(counts[:-1], 0, out=starts[1:])
        flat = values.reshape(len(values), -1)
        summed = nn_functional.embedding_bag(order, flat, starts, mode="sum")  # duplicate ids add up, in order
        return rows, summed.view(len(rows), *values.shape[1:])

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                state = self.state.setdefault(param, {})
                if not state:
                    state["step"] = 0
                    state["moments"] = param.new_zeros(param.shape[0], 2, *param.shape[1:])
                state["step"] += 1
                rows, values = self._touched(grad)
                moments = state["moments"].index_select(0, rows)  # (U, 2, dim): exp_avg, exp_avg_sq
                exp_avg, exp_avg_sq = moments[:, 0], moments[:, 1]
                _update_moments(exp_avg, exp_avg_sq, values, group["betas"])
                state["moments"].index_copy_(0, rows, moments)
                denom, step_size = _denominator_and_step(exp_avg_sq, group, state["step"])
                touched = param.index_select(0, rows).add_(exp_avg.div_(denom).mul_(-step_size))
                param.index_copy_(0, rows, touched)  # rows are unique: the sum index_add_ would write


def _update_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, betas) -> None:
    """Adam's moment updates, in place (torch.optim.Adam's single-tensor arithmetic)."""
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])


def _denominator_and_step(exp_avg_sq: torch.Tensor, group: dict, t: float) -> tuple[torch.Tensor, float]:
    """Adam's bias-corrected denominator √v̂ + ε and step size lr / (1 − β₁ᵗ) at step t."""
    beta1, beta2 = group["betas"]
    # sqrt_ on a contiguous copy: on a strided view (a moment of RowSparseAdam's (U, 2, dim)) sqrt runs
    # about 4x slower than the copy and the contiguous sqrt together (measured)
    root = exp_avg_sq.clone(memory_format=torch.contiguous_format).sqrt_()
    denom = root.div_(math.sqrt(1 - beta2**t)).add_(group["eps"])
    return denom, group["lr"] / (1 - beta1**t)
