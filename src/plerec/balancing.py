"""Loss balancing ([train] balancing): how one step's per-task losses become the loss and its gradients.

Every method plugs into the training step at one seam:

    loss = balancing.loss(task_losses, rows, epoch, step)   # (,) from the (T,) masked task losses
    loss = loss + model.auxiliary_loss(logits)                # where the model has one (not balanced; / world
                                                              # size under DDP: each rank adds its share)
    balancing.backward(loss, scale)                           # gradients into every parameter's .grad
    ... the optimisers step ...
    balancing.after_step()

and `end_epoch` sees each epoch's mean training losses. Only `pcgrad` computes per-task gradients of the
shared parameters and `gradnorm` per-task gradients of one layer; `fixed` is today's weighted sum and costs
nothing more.

Which parameters are shared (PCGrad): every parameter of the model except those of its per-task towers
(`model.body.towers`): the embeddings, experts (task experts included), gates, bottoms and stitches. A model
may say otherwise with a `task_parameters()` method; a model without towers has every parameter shared.
The last shared layer (GradNorm): `model.last_shared_weight()` where the model has it, else per family the
last weight of the layer every tower reads through (`last_shared_weight` below).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from plerec.config import BALANCING_METHODS, Experiment
from plerec.distributed import DistContext, all_reduce_sum

Schedule = Callable[[Experiment, int | float], Tensor]  # Eq. 10's weights at epoch or step t


def loss_weights(exp: Experiment, t: int | float) -> Tensor:
    """Eq. 10: ω_k(t) = ω_k0 · γ_k^t, with t the epoch or the step (train.weight_schedule)."""
    return torch.tensor([task.weight * task.gamma**t for task in exp.tasks], dtype=torch.float32)


class Balancing:
    """`fixed`: the sum of the task losses weighted by Eq. 10, ω_k(t) = ω_k0 · γ_k^t."""

    name = "fixed"

    def __init__(self, exp: Experiment, model: nn.Module, ctx: DistContext, schedule: Schedule = loss_weights):
        self.exp, self.ctx, self.schedule = exp, ctx, schedule
        self.per_epoch = exp.train.weight_schedule == "epoch"
        self.num_tasks = len(exp.tasks)

    def loss(self, task_losses: Tensor, rows: Tensor | None, epoch: int, step: int) -> Tensor:
        """The balanced loss of one step. task_losses (T,); rows (T,), each task's labelled rows in the global
        batch under DDP (None in one process, where a task without rows has loss exactly 0)."""
        weights = self.schedule(self.exp, epoch if self.per_epoch else step).to(task_losses.device)
        return (weights * task_losses).sum()

    def backward(self, loss: Tensor, scale: float) -> None:
        """Gradients of `loss` · scale (scale: the world size, DDP averages gradients over ranks)."""
        (loss * scale).backward()

    def parameters(self) -> list[nn.Parameter]:
        """The method's own parameters that the training optimisers update (uncertainty's s_k)."""
        return []

    def after_step(self) -> None:
        """After the optimisers' step (GradNorm updates its weights here)."""

    def end_epoch(self, epoch_losses: Tensor) -> None:
        """An epoch's mean training loss of every task, (T,), the same on every rank (DWA's input)."""

    def weights(self) -> dict[str, float]:
        """The current task weights (and the method's other learned values) as history.json records them."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _present(task_losses: Tensor, rows: Tensor | None) -> Tensor:
    """(T,) bool: the tasks with labelled rows in this step's (global) batch."""
    return rows > 0 if rows is not None else task_losses.detach() != 0


class Uncertainty(Balancing):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, Eq. 7 and 10).

    Each task k has a learned log-variance s_k = log σ_k² (initially 0), trained by the optimiser with the
    network (learning rate train.lr, no weight decay):
        regression:  ½ · exp(−s_k) · L_k + ½ · s_k    (Gaussian likelihood, Eq. 7)
        binary:          exp(−s_k) · L_k + ½ · s_k    (the paper's classification form, Eq. 10: 1/σ² · L + log σ)
    A task's ½ · s_k term counts in the steps whose batch holds rows of the task: a batch without them would
    otherwise drive s_k down for nothing.
    """

    name = "uncertainty"

    def __init__(self, exp, model, ctx, schedule=loss_weights):
        super().__init__(exp, model, ctx, schedule)
        device = ctx.device
        self.log_vars = nn.Parameter(torch.zeros(self.num_tasks, device=device))
        self.factors = torch.tensor([1.0 if t.kind == "binary" else 0.5 for t in exp.tasks], device=device)

    def loss(self, task_losses, rows, epoch, step):
        s = self.log_vars
        present = _present(task_losses, rows).to(s.dtype)
        # Under DDP each rank's loss is its share of the global one: the regulariser is split over the ranks.
        return (self.factors * torch.exp(-s) * task_losses).sum() + 0.5 * (present * s).sum() / self.ctx.world_size

    def backward(self, loss, scale):
        (loss * scale).backward()
        if self.ctx.enabled and self.log_vars.grad is not None:  # s is outside DDP's model: average it here
            all_reduce_sum(self.log_vars.grad, self.ctx).div_(self.ctx.world_size)

    def parameters(self):
        return [self.log_vars]

    def weights(self):
        s = self.log_vars.detach().cpu()
        names = [t.name for t in self.exp.tasks]
        return {
            "weights": dict(zip(names, (self.factors.cpu() * torch.exp(-s)).tolist(), strict=True)),
            "log_variances": dict(zip(names, s.tolist(), strict=True)),
        }

    def state_dict(self):
        return {"log_vars": self.log_vars.detach().cpu().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])


class GradNorm(Balancing):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Eq. 1-2).

    Task weights w_k (initially 1) scale the loss Σ_k w_k · L_k. On the last shared layer's weights W, with
        G_k = ‖∇_W w_k L_k‖₂,  L̃_k = L_k(t) / L_k(0),  r_k = L̃_k / mean_j L̃_j,
    the weights descend L_grad = Σ_k |G_k − mean_j(G_j) · r_k^α|, the target treated as a constant, by their
    own Adam ([train.gradnorm] lr), and are renormalised to sum to T after every update. L_k(0) is task k's
    loss on the first batch that holds rows of it; a task without rows in a step is left out of the means
    and keeps its weight. The weights used by step t's loss are those before its update.
    """

    name = "gradnorm"

    def __init__(self, exp, model, ctx, schedule=loss_weights):
        super().__init__(exp, model, ctx, schedule)
        self.alpha = exp.train.gradnorm.alpha
        self.layer = last_shared_weight(model)
        self.task_weights = torch.ones(self.num_tasks, device=ctx.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.task_weights], lr=exp.train.gradnorm.lr)
        self.initial = torch.zeros(self.num_tasks, device=ctx.device)  # L_k(0); 0 until task k had rows
        self.norms = torch.zeros(self.num_tasks, device=ctx.device)  # the last step's ‖∇_W L_k‖, for tests

    def loss(self, task_losses, rows, epoch, step):
        losses = task_losses.detach()
        present = _present(task_losses, rows)
        self.initial = torch.where((self.initial == 0) & present, losses, self.initial)
        norms = []
        for k in range(self.num_tasks):
            (grad,) = torch.autograd.grad(task_losses[k], self.layer, retain_graph=True, allow_unused=True)
            if grad is not None and grad.is_sparse:  # an embedding table: rows summed before the norm
                grad = grad.coalesce().values()
            norms.append(grad.norm() if grad is not None else torch.zeros((), device=losses.device))
        self.norms = torch.stack(norms)  # (T,) ‖∇_W L_k‖, no graph
        self.gradient_step(losses, present)
        return (self.task_weights.detach() * task_losses).sum()

    def gradient_step(self, losses: Tensor, present: Tensor) -> None:
        """∂L_grad/∂w into the weights' .grad from this step's losses and gradient norms (self.norms)."""
        counted = present.to(losses.dtype)
        n = counted.sum().clamp_min(1)
        g = self.task_weights * self.norms  # (T,) G_k, a function of w only
        ratio = torch.where(self.initial > 0, losses / self.initial.clamp_min(1e-30), torch.ones_like(losses))
        r = ratio / ((ratio * counted).sum() / n).clamp_min(1e-30)  # relative inverse training rate
        target = ((g * counted).sum() / n * r.pow(self.alpha)).detach()
        self.optimizer.zero_grad(set_to_none=True)
        ((g - target).abs() * counted).sum().backward()

    def after_step(self):
        self.optimizer.step()
        with torch.no_grad():
            w = self.task_weights.clamp_(min=1e-6)  # Adam may overshoot below 0: a weight stays positive
            w.mul_(self.num_tasks / w.sum())

    def weights(self):
        names = [t.name for t in self.exp.tasks]
        return {"weights": dict(zip(names, self.task_weights.detach().cpu().tolist(), strict=True))}

    def state_dict(self):
        return {
            "weights": self.task_weights.detach().cpu().clone(),
            "initial": self.initial.cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state):
        with torch.no_grad():
            self.task_weights.copy_(state["weights"])
        self.initial = state["initial"].to(self.initial.device)
        self.optimizer.load_state_dict(state["optimizer"])


class DWA(Balancing):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, Eq. 7).

        w_k(t) = T · exp(r_k(t−1) / τ) / Σ_i exp(r_i(t−1) / τ),   r_k(t−1) = L_k(t−1) / L_k(t−2)

    with L_k(t) task k's mean training loss over epoch t, τ = [train.dwa] temperature, and w_k = 1 in the
    first two epochs. The weights change once per epoch, whatever train.weight_schedule says.
    """

    name = "dwa"

    def __init__(self, exp, model, ctx, schedule=loss_weights):
        super().__init__(exp, model, ctx, schedule)
        self.temperature = exp.train.dwa.temperature
        self.epoch_losses: list[Tensor] = []  # the last two epochs' mean losses (float64), oldest first
        self.task_weights = torch.ones(self.num_tasks, device=ctx.device)

    def loss(self, task_losses, rows, epoch, step):
        return (self.task_weights * task_losses).sum()

    def end_epoch(self, epoch_losses):
        self.epoch_losses = [*self.epoch_losses, epoch_losses.detach().double().cpu()][-2:]
        if len(self.epoch_losses) == 2:
            self.task_weights = dwa_weights(self.epoch_losses, self.temperature).to(self.task_weights.device)

    def weights(self):
        names = [t.name for t in self.exp.tasks]
        return {"weights": dict(zip(names, self.task_weights.cpu().tolist(), strict=True))}

    def state_dict(self):
        return {"epoch_losses": [loss.clone() for loss in self.epoch_losses]}

    def load_state_dict(self, state):
        self.epoch_losses = list(state["epoch_losses"])
        if len(self.epoch_losses) == 2:
            self.task_weights = dwa_weights(self.epoch_losses, self.temperature).to(self.task_weights.device)


def dwa_weights(epoch_losses: list[Tensor], temperature: float) -> Tensor:
    """DWA's weights (T,) float32 after the epochs whose mean losses are `epoch_losses` (the last two count);
    ones before two epochs are done. A task whose loss two epochs ago was 0 has rate 1."""
    if len(epoch_losses) < 2:
        return torch.ones(len(epoch_losses[0]) if epoch_losses else 0)
    before, last = epoch_losses[-2], epoch_losses[-1]
    rate = torch.where(before > 0, last / before.clamp_min(1e-300), torch.ones_like(last))  # (T,)
    return (len(rate) * torch.softmax(rate / temperature, dim=0)).float()


class PCGrad(Balancing):
    """PCGrad, gradient surgery (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020, Algorithm 1).

    Each task's gradient g_k of its weighted loss ω_k(t) · L_k (Eq. 10's weights, 1 by default), one vector
    over all the shared parameters, is computed on its own; for each task i, over the other tasks j in a
    random order, a g_i that conflicts with g_j (g_i · g_j < 0) is projected onto g_j's normal plane,
    g_i ← g_i − (g_i · g_j) / ‖g_j‖² · g_j;
    the shared parameters get the sum of the projected g_i. The towers get their ordinary gradient. The order
    comes from a generator of its own seeded by `seed`, so the run's other random numbers are untouched.
    Sparse embedding gradients are projected on the rows the batch touches (the only non-zero ones).
    """

    name = "pcgrad"

    def __init__(self, exp, model, ctx, schedule=loss_weights):
        super().__init__(exp, model, ctx, schedule)
        specific = task_specific_parameters(model)
        ids = {id(p) for p in specific}
        self.shared = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self.specific = [p for p in specific if p.requires_grad]
        self.generator = torch.Generator().manual_seed(exp.seed)
        self.terms: Tensor | None = None
        self.plain: Tensor | None = None

    def loss(self, task_losses, rows, epoch, step):
        weights = self.schedule(self.exp, epoch if self.per_epoch else step).to(task_losses.device)
        self.terms = weights * task_losses  # (T,) each task's weighted loss, differentiated on its own
        self.plain = self.terms.sum()
        return self.plain

    def backward(self, loss, scale):
        terms, extra = self.terms, loss is not self.plain  # extra: an auxiliary loss was added after balancing
        per_task = [
            torch.autograd.grad(terms[k] * scale, self.shared, retain_graph=True, allow_unused=True)
            for k in range(self.num_tasks)
        ]
        # The towers (and, with an auxiliary loss, every parameter) get the ordinary gradient of the whole loss.
        inputs = self.specific + (self.shared if extra else [])
        if inputs:
            (loss * scale).backward(inputs=inputs)
        # One vector per task over every shared parameter (Algorithm 1 projects whole gradients, not layers).
        parts = [_task_rows(p, list(grads)) for p, grads in zip(self.shared, zip(*per_task, strict=True), strict=True)]
        found = [(p, part) for p, part in zip(self.shared, parts, strict=True) if part is not None]
        if not found:
            return
        rows = torch.cat([r for _, (r, _) in found], dim=1)  # (T, P)
        orders = [self._order(i) for i in range(self.num_tasks)]
        projected, plain = project_conflicting(rows, orders), rows.sum(0)  # (P,) each
        start = 0
        for p, (r, as_grad) in found:
            width = r.shape[1]
            new = as_grad(projected[start : start + width])
            if extra and p.grad is not None:  # keep the auxiliary loss's part: ordinary − Σ_k g_k + PCGrad
                p.grad = p.grad + (new - as_grad(plain[start : start + width]))
            else:
                p.grad = new
            start += width
        self.terms = self.plain = None

    def _order(self, i: int) -> list[int]:
        others = [j for j in range(self.num_tasks) if j != i]
        return [others[int(k)] for k in torch.randperm(len(others), generator=self.generator)]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def project_conflicting(grads: Tensor, orders: list[list[int]]) -> Tensor:
    """PCGrad's update: grads (T, P), one task's flattened gradient per row; orders[i] the tasks that task i is
    projected against, in order. Returns (P,) the sum of the projected gradients. Branch-free (no host sync):
    a projection's coefficient is 0 where the gradients do not conflict."""
    squares = (grads * grads).sum(1)  # (T,) ‖g_j‖²
    projected = grads.clone()
    for i, order in enumerate(orders):
        g = projected[i]
        for j in order:
            dot = g @ grads[j]
            g -= torch.where(dot < 0, dot / squares[j], torch.zeros_like(dot)) * grads[j]
    return projected.sum(0)


def _task_rows(p: Tensor, grads: list[Tensor | None]) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
    """One parameter's per-task gradients as rows (T, n), and the map from such a row back to a gradient of
    `p` (dense, or sparse on the rows the batch touched); None when no task's loss reaches `p`."""
    found = [g for g in grads if g is not None]
    if not found:
        return None
    if found[0].is_sparse:  # coalesced, so that dot products are those of the rows (an id may repeat in a batch)
        coalesced = [g.coalesce() if g is not None else None for g in grads]
        indices = next(g for g in coalesced if g is not None).indices()
        if all(g is None or torch.equal(g.indices(), indices) for g in coalesced):
            shape = next(g for g in coalesced if g is not None).values().shape  # (U, dim)
            values = torch.stack([g.values() if g is not None else p.new_zeros(shape) for g in coalesced])

            def sparse(row: Tensor) -> Tensor:
                return torch.sparse_coo_tensor(
                    indices, row.view(shape), p.shape, is_coalesced=True, check_invariants=False
                )

            return values.flatten(1), sparse
        grads = [g.to_dense() if g is not None else None for g in grads]  # rows differ between tasks: rare
    dense = torch.stack([g if g is not None else torch.zeros_like(p) for g in grads])  # (T, *shape)
    return dense.flatten(1), lambda row: row.view(p.shape)


METHODS: dict[str, type[Balancing]] = {
    "fixed": Balancing,
    "uncertainty": Uncertainty,
    "gradnorm": GradNorm,
    "dwa": DWA,
    "pcgrad": PCGrad,
}
assert tuple(METHODS) == BALANCING_METHODS
PER_TASK_GRADIENTS = ("gradnorm", "pcgrad")  # the methods that differentiate each task's loss on its own
OWN_WEIGHTS = ("uncertainty", "gradnorm", "dwa")  # the methods whose weights replace Eq. 10's


def check_balancing(exp: Experiment, ctx: DistContext) -> None:
    """Refuse the combinations a method cannot run, before any work."""
    method = exp.train.balancing
    if ctx.enabled and method in PER_TASK_GRADIENTS:
        raise ValueError(
            f"[train] balancing = {method!r} cannot run under torchrun (DistributedDataParallel): it needs each "
            "task's own gradient, but DDP all-reduces one gradient per backward pass and every rank would see "
            "only its share of the batch. Train it in one process, or choose fixed, uncertainty or dwa"
        )
    if method in OWN_WEIGHTS:
        weighted = [
            f"`{t.name}` (weight {t.weight:g}, gamma {t.gamma:g})" for t in exp.tasks if (t.weight, t.gamma) != (1, 1)
        ]
        if weighted:
            raise ValueError(
                f"Expected [[tasks]] weight = 1 and gamma = 1 with [train] balancing = {method!r}, which sets the "
                f"task weights itself, but got {', '.join(weighted)}. Remove them, or use balancing = 'fixed' "
                "(Eq. 10's weights) or 'pcgrad' (which projects the Eq. 10-weighted losses)"
            )


def make_balancing(exp: Experiment, model: nn.Module, ctx: DistContext, schedule: Schedule = loss_weights) -> Balancing:
    """The method of [train] balancing for `model` (the unwrapped model); `schedule` gives Eq. 10's weights."""
    check_balancing(exp, ctx)
    return METHODS[exp.train.balancing](exp, model, ctx, schedule)


def task_specific_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that only one task's output depends on: `model.task_parameters()` (or its body's) where
    the model defines it (the funnels: none, their towers feed the later steps), else its per-task towers
    (`model.body.towers`); none for a model without towers."""
    body = getattr(model, "body", None)
    own = getattr(model, "task_parameters", None) or getattr(body, "task_parameters", None)
    if callable(own):
        return list(own())
    towers = getattr(body, "towers", None)
    return list(towers.parameters()) if isinstance(towers, nn.Module) else []


def last_shared_weight(model: nn.Module) -> nn.Parameter:
    """GradNorm's W: the weights of the last layer that every task's output depends on.

    `model.last_shared_weight()` where the model defines it; else, by family: the last layer of the last
    extraction level's expert bank (PLE, CGC, MMoE, AdaTT: the bank holds the task experts too, whose gradient
    from the other tasks is zero), of OMoE's experts, of ML-MMoE's second-level experts, of the shared bottom
    (shared_bottom, customized), of the source task's bottom (asymmetric), of the last column layer (cross-stitch
    and sluice, mixed across tasks by α). A model of none of these shapes (the funnel models esmm and aitm,
    whose towers read the embeddings directly): the embedding table of its `embedding_dim`, which every task
    reads.
    """
    own = getattr(model, "last_shared_weight", None)
    if callable(own):
        return own()
    body = getattr(model, "body", None)
    levels, layers = getattr(body, "levels", None), getattr(body, "layers", None)
    banks = [
        levels[-1].experts if isinstance(levels, nn.ModuleList) and len(levels) else None,  # PLE, CGC, MMoE
        getattr(getattr(body, "layer", None), "experts", None),  # OMoE
        getattr(body, "experts2", None),  # ML-MMoE
        getattr(body, "bottom", None),  # shared_bottom
        getattr(body, "shared", None),  # customized
        getattr(body, "source", None),  # asymmetric
        layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None,  # cross_stitch, sluice
    ]
    for bank in banks:
        weights = getattr(bank, "weights", None)
        if isinstance(weights, nn.ParameterList) and len(weights):
            return weights[-1]
    table = getattr(getattr(model, "input", None), "embedding", None)  # every task reads the embeddings
    if isinstance(table, nn.Embedding):
        return table.weight
    raise ValueError(
        f"[train] balancing = 'gradnorm' needs a shared layer, but model {getattr(model, 'name', model)!r} has no "
        "known one and no embedding table; give it a `last_shared_weight()` method"
    )


def describe(balancing: Balancing) -> dict:
    """What history.json records of the method after an epoch: its name and current weights (not for fixed)."""
    return {"method": balancing.name, **balancing.weights()}


__all__ = [
    "DWA",
    "METHODS",
    "Balancing",
    "GradNorm",
    "PCGrad",
    "Uncertainty",
    "check_balancing",
    "dwa_weights",
    "last_shared_weight",
    "loss_weights",
    "make_balancing",
    "project_conflicting",
    "task_specific_parameters",
]
