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
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Expected lr > 0, eps > 0 and betas in [0, 1), but got lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

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
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                grad = grad.coalesce()  # duplicate ids add up, as in the dense gradient
                rows, values = grad.indices()[0], grad.values()
                exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
                exp_avg_sq.addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                t = state["step"]
                step_size = group["lr"] / (1 - beta1**t)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                param.index_add_(0, rows, exp_avg.div_(denom).mul_(-step_size))
        return loss
