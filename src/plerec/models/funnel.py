"""Conversion funnels: ESMM and AITM, whose tasks are consecutive steps (impression → click → purchase → …).

Task t of a funnel of T tasks is "step t happened", labelled over the entire impression space: a purchase
label is click AND purchase, 1 only where the click is. Both models return logits (B, T) of those
probabilities, so the plain binary cross-entropy of every task trains them; neither takes other task kinds.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plerec.metrics import task_metrics
from plerec.models.family import ModelConfig, _check_positive
from plerec.models.layers import ParallelMLP

if typing.TYPE_CHECKING:
    from plerec.data.tables import EncodedTable
    from plerec.models.family import MultiTaskModel

FUNNEL_MODELS = ("esmm", "aitm")


def check_funnel_tasks(model: str, tasks: Sequence) -> None:
    """Refuse tasks a funnel model cannot train: fewer than two, a task that is not binary, or a task with a
    `space` (every step's label is over the entire impression space). `tasks` are [[tasks]] configs
    (anything with `name`, `kind` and `space`), in funnel order."""
    if len(tasks) < 2:
        raise ValueError(
            f"Expected `{model}` to have at least 2 [[tasks]] (funnel steps such as click, then purchase), "
            f"but got {len(tasks)}"
        )
    for task in tasks:
        if task.kind != "binary":
            raise ValueError(
                f"Expected every [[tasks]] entry of the `{model}` funnel to be binary, but `{task.name}` is "
                f"{task.kind!r}"
            )
        if getattr(task, "space", "present") != "present":
            raise ValueError(
                f"Expected [[tasks]] `{task.name}` of the `{model}` funnel to be labelled over the entire space "
                f"(no `space`), but got space = {task.space!r}: label it with the step itself (e.g. purchase, 1 "
                "only where click is 1) so the model learns p(click and purchase) over every impression"
            )


def _check_num_tasks(model: str, num_tasks: int) -> None:
    if num_tasks < 2:
        raise ValueError(
            f"Expected `{model}` to have at least 2 tasks (funnel steps such as click, then purchase), "
            f"but got {num_tasks}"
        )


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """log(e^a + e^b) in the plain operations every exporter (ONNX, TorchScript) takes."""
    high = torch.maximum(a, b)
    return high + torch.log1p(torch.exp(-(a - b).abs()))


def chain_logits(step_logits: Tensor) -> Tensor:
    """Logits of p_t = Π_{i≤t} q_i from the logits a_i of the conditional probabilities q_i = σ(a_i). (B, T).

    log p_t = Σ_{i≤t} log σ(a_i). 1 − p_t is not taken as 1 − exp(log p_t), which cancels to 0 (an infinite
    logit) once p_t is near 1; it is summed instead from positive terms, 1 − p_t = (1 − p_{t−1}) + p_{t−1}(1 − q_t),
    so log(1 − p_t) = logaddexp(log(1 − p_{t−1}), log p_{t−1} + log σ(−a_t)), finite for any finite a. The
    logit is log p_t − log(1 − p_t); column 0 is a_0 itself.
    """
    columns = [step_logits[:, 0]]
    log_p = F.logsigmoid(step_logits[:, 0])  # (B,)
    log_not_p = F.logsigmoid(-step_logits[:, 0])  # (B,)
    for t in range(1, step_logits.shape[1]):
        a = step_logits[:, t]
        log_not_p = _logaddexp(log_not_p, log_p + F.logsigmoid(-a))
        log_p = log_p + F.logsigmoid(a)
        columns.append(log_p - log_not_p)
    return torch.stack(columns, dim=1)  # (B, T)


@dataclass(frozen=True, kw_only=True, slots=True)
class ESMMConfig(ModelConfig):
    """ESMM: one tower of `tower_dims` per funnel step over the shared embeddings."""

    tower_dims: tuple[int, ...] = (200, 80)


class ESMM(nn.Module):
    """Entire Space Multi-task Model (Ma et al., SIGIR 2018).

    Over one shared embedding, a CTR tower and a CVR tower read the input; pCTR = σ(CTR logit), pCVR =
    σ(CVR logit), and pCTCVR = pCTR × pCVR over the entire impression space. The model outputs the CTR logit
    for task 0 and logit(pCTCVR) for task 1, so the tasks' binary cross-entropies are exactly the paper's
    L_CTR + L_CTCVR: the CVR tower has no loss of its own, it learns only through pCTCVR, on every
    impression rather than on clicked ones (no sample selection bias). With T > 2 steps, task t's output is
    logit(Π_{i≤t} q_i), q_i each step's conditional probability from its own tower.
    """

    def __init__(self, config: ESMMConfig, in_dim: int, num_tasks: int):
        super().__init__()
        _check_num_tasks("esmm", num_tasks)
        self.towers = ParallelMLP(num_tasks, in_dim, [*config.tower_dims, 1], final_activation=False)

    def task_parameters(self) -> list[nn.Parameter]:
        """None: every tower feeds the later steps' outputs too (PCGrad projects them all as shared)."""
        return []

    def step_logits(self, x: Tensor) -> Tensor:
        """Every step's conditional logit a_t (B, T): CTR, then CVR given the click, and so on."""
        return self.towers(x).squeeze(-1).transpose(0, 1)  # (T, B, 1) -> (B, T)

    def forward(self, x: Tensor) -> Tensor:
        return chain_logits(self.step_logits(x))


@dataclass(frozen=True, kw_only=True, slots=True)
class AITMConfig(ModelConfig):
    """AITM: per-task towers of `tower_dims` (the last width is the AIT module's), and the weight α of the
    behavioural expectation calibrator (`calibrator_weight`, 0.6 as in the authors' published run)."""

    tower_dims: tuple[int, ...] = (128, 64, 32)
    calibrator_weight: float = 0.6

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check_positive("tower_dims", self.tower_dims, allow_empty=False)
        if not (math.isfinite(self.calibrator_weight) and self.calibrator_weight >= 0):
            raise ValueError(
                f"Expected [model] `calibrator_weight` to be a finite number >= 0, but got {self.calibrator_weight}"
            )


class AITM(nn.Module):
    """Adaptive Information Transfer Multi-task framework (Xi et al., KDD 2021).

    Each task t has a tower over the shared embeddings, giving q_t. Task 1's representation is z_1 = q_1. For
    t ≥ 2 the transfer layer h_{t−1} (one ReLU layer of width k) turns z_{t−1} into p_{t−1} = h_{t−1}(z_{t−1}),
    what step t−1 passes on, and the AIT module mixes the two: z_t = Σ_u w_u h_1(u) over u ∈ {p_{t−1}, q_t},
    w_u = softmax_u(⟨h_2(u), h_3(u)⟩ / √k), with h_1, h_2, h_3 learned linear maps (value, query, key) of
    width k. Task t's logit is a linear layer on z_t. The behavioural expectation calibrator
    (`auxiliary_loss`) adds α · mean over rows of Σ_t max(ŷ_t − ŷ_{t−1}, 0): a later step should never be
    more likely than the one before it.
    """

    def __init__(self, config: AITMConfig, in_dim: int, num_tasks: int):
        super().__init__()
        _check_num_tasks("aitm", num_tasks)
        k = config.tower_dims[-1]
        self.num_tasks = num_tasks
        self.calibrator_weight = config.calibrator_weight
        self.towers = ParallelMLP(num_tasks, in_dim, config.tower_dims)  # q_t, ReLU to the last layer
        self.transfers = ParallelMLP(num_tasks - 1, k, [k])  # h_{t−1}: z_{t−1} -> p_{t−1}
        # Per transfer step t, its value, query and key maps (h_1, h_2, h_3), read by both items: networks
        # 3(t−1) .. 3(t−1)+2 of the bank (its weights are used directly, one step at a time).
        self.projections = ParallelMLP(3 * (num_tasks - 1), k, [k], final_activation=False, bias=False)
        self.outputs = ParallelMLP(num_tasks, k, [1], final_activation=False)

    def extract(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Every task's z_t, (T, B, k), and each AIT module's weights over [p_{t−1}, q_t], (B, 2), as `task{t}.ait`."""
        q = self.towers(x)  # (T, B, k)
        k = q.shape[-1]
        z = [q[0]]
        gates: dict[str, Tensor] = {}
        for t in range(1, self.num_tasks):
            w, b = self.transfers.weights[0][t - 1], self.transfers.biases[0][t - 1]  # (k, k), (k,)
            p = torch.relu(torch.addmm(b, z[-1], w))  # (B, k)
            items = torch.stack([p, q[t]], dim=1)  # (B, 2, k)
            maps = self.projections.weights[0][3 * (t - 1) : 3 * t]  # (3, k, k)
            value, query, key = (items @ m for m in maps)  # (B, 2, k) each
            weights = torch.softmax((query * key).sum(-1) / math.sqrt(k), dim=-1)  # (B, 2)
            z.append((weights.unsqueeze(-1) * value).sum(1))  # (B, k)
            gates[f"task{t}.ait"] = weights
        return torch.stack(z), gates

    def gate_experts(self) -> dict[str, list[str]]:
        return {f"task{t}.ait": [f"task{t - 1}.transfer", f"task{t}.tower"] for t in range(1, self.num_tasks)}

    def forward(self, x: Tensor) -> Tensor:
        return self.outputs(self.extract(x)[0]).squeeze(-1).transpose(0, 1)  # (T, B, 1) -> (B, T)

    def task_parameters(self) -> list[nn.Parameter]:
        """None: every tower feeds the later steps' outputs too (PCGrad projects them all as shared)."""
        return []

    def auxiliary_loss(self, logits: Tensor) -> Tensor:
        """The behavioural expectation calibrator, α · mean over rows of Σ_{t≥2} max(ŷ_t − ŷ_{t−1}, 0), ŷ = σ(logits).

        A scalar tensor to add to the weighted task losses; `logits` (B, T) are the model's outputs."""
        probs = torch.sigmoid(logits)  # (B, T)
        excess = torch.relu(probs[:, 1:] - probs[:, :-1])  # (B, T-1)
        return self.calibrator_weight * excess.sum(1).mean()


@torch.inference_mode()
def cvr_metrics(
    model: MultiTaskModel, table: EncodedTable, click_task: int = 0, batch_size: int = 4096
) -> dict[str, float]:
    """CVR metrics of a funnel model on clicked rows: the conditional probability of the step after
    `click_task` (MultiTaskModel.funnel_step_logits, the logits of `funnel_probabilities`) against that
    step's label, on the rows whose click label is 1 (and whose conversion label is present). Returns
    {"auc", "logloss", "n"} as plerec.metrics.task_metrics gives them ("auc" left out where the clicked rows
    hold one class; {"n": 0} without clicked rows).

    `table` is an EncodedTable whose tasks are the model's; the conversion task is click_task + 1.
    """
    num_tasks = table.labels.shape[1]
    if not 0 <= click_task < num_tasks - 1:
        raise ValueError(
            f"Expected `click_task` to index a task followed by a conversion task (0 .. {num_tasks - 2}), "
            f"but got {click_task}"
        )
    model.eval()
    device = next(model.parameters()).device
    logits = []
    for start in range(0, len(table), batch_size):
        batch = table.batch(slice(start, start + batch_size)).to(device)
        logits.append(model.funnel_step_logits(*batch.inputs)[:, click_task + 1].cpu())  # (B,)
    step = torch.cat(logits).numpy() if logits else np.zeros(0, dtype=np.float32)
    labels = table.labels.to(torch.float64)
    clicked = table.label_mask[:, click_task] & (labels[:, click_task] == 1) & table.label_mask[:, click_task + 1]
    return task_metrics("binary", step, labels[:, click_task + 1].numpy(), clicked.numpy())
