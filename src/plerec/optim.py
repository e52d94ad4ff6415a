"""A sparse-aware Adam for embedding tables: only the rows a batch touches are read and written.

A dense Adam step walks every row of every table at every step; with vocabularies in the hundreds of
thousands that step costs more than the whole model. This optimiser ("lazy" Adam) keeps Adam's moments
per row and updates a row only when its gradient is present, with exactly torch.optim.Adam's
arithmetic, so a row touched at every step ends with the weights dense Adam gives it.
(torch.optim.SparseAdam places ε differently, so its updates differ where gradients are small.)
"""

from __future__ import annotations

import math

import torch


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam for parameters with sparse gradients (nn.Embedding(sparse=True)).

    Duplicate ids of a batch are summed by scattering into a persistent zeroed buffer and the touched
    rows are read off a persistent bitmap, instead of coalescing (sorting) the gradient: both scratch
    buffers are cleared again on the touched rows only. Both moments of a row live side by side in one
    (rows, 2, dim) tensor, so a step reads and writes them with one gather and one scatter.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Expected lr > 0, eps > 0 and betas in [0, 1), but got lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self._scratch: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}  # not state: never saved

    def _touched(self, param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the gradient touches (ascending) and their summed gradients."""
        if grad.is_coalesced():
            return grad.indices()[0], grad.values()
        if param not in self._scratch:
            self._scratch[param] = (torch.zeros_like(param), param.new_zeros(len(param), dtype=torch.bool))
        total, seen = self._scratch[param]
        ids, values = grad._indices()[0], grad._values()
        total.index_add_(0, ids, values)  # duplicate ids add up, as in the dense gradient
        seen[ids] = True
        rows = seen.nonzero().squeeze(1)
        summed = total.index_select(0, rows)
        total.index_fill_(0, rows, 0.0)
        seen[rows] = False
        return rows, summed

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if not grad.is_sparse:
                    raise ValueError("Expected a sparse gradient (nn.Embedding(sparse=True)), but got a dense one")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["moments"] = param.new_zeros(param.shape[0], 2, *param.shape[1:])
                state["step"] += 1
                rows, values = self._touched(param, grad)
                moments = state["moments"].index_select(0, rows)  # (U, 2, dim): exp_avg, exp_avg_sq
                exp_avg, exp_avg_sq = moments[:, 0], moments[:, 1]
                exp_avg.lerp_(values, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["moments"].index_copy_(0, rows, moments)
                t = state["step"]
                step_size = group["lr"] / (1 - beta1**t)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                param.index_add_(0, rows, exp_avg.div_(denom).mul_(-step_size))
        return loss
