"""AdaTT: adaptive task-to-task fusion (Li et al., KDD 2023), stacked fusion levels and per-task towers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plerec.models.family import MAX_EXPERTS, MAX_LEVELS, ModelConfig, Towers, _check_positive
from plerec.models.layers import ParallelMLP, gate_mix


@dataclass(frozen=True, kw_only=True, slots=True)
class AdaTTConfig(ModelConfig):
    """AdaTT hyperparameters: `num_levels` fusion levels, each with `num_task_experts` experts per task and
    `num_shared_experts` shared ones (0: AdaTT-sp, task-specific units only), every expert of `expert_dims`."""

    num_levels: int = 2
    num_task_experts: int = 2
    num_shared_experts: int = 1
    expert_dims: tuple[int, ...] = (128,)

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check_positive("num_levels", [self.num_levels], limit=MAX_LEVELS)
        # Every task needs native experts: its fusion unit adds their linear combination (the residual).
        _check_positive("num_task_experts", [self.num_task_experts], limit=MAX_EXPERTS)
        value = self.num_shared_experts
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EXPERTS:
            raise ValueError(f"Expected `num_shared_experts` to be an integer in 0 .. {MAX_EXPERTS}, but got {value}")
        _check_positive("expert_dims", self.expert_dims, allow_empty=False)


class FusionLevel(nn.Module):
    """One AdaTT level: task expert units, optional shared experts, a fusion unit per stream.

    Task k's m experts read task k's input x_k; the shared experts read the shared input. Task k's fusion
    unit outputs AllExpertGF_k + NativeExpertLF_k: a softmax gate on x_k (a linear map, no bias) weighs every
    expert of the level, every task's and the shared ones, and a learned linear combination v_k of
    task k's own m experts is added, the residual that keeps each task's own experts in its output.
    With `shared_gate`, the shared unit fuses the same way (its gate on the shared input, its residual over
    the shared experts) to feed the next level's shared experts.
    """

    def __init__(
        self,
        *,
        num_tasks: int,
        in_dim: int,
        num_task_experts: int,
        num_shared_experts: int,
        expert_dims: tuple[int, ...],
        shared_gate: bool,
    ):
        super().__init__()
        self.num_tasks, self.num_task_experts, self.num_shared_experts = num_tasks, num_task_experts, num_shared_experts
        num_experts = num_tasks * num_task_experts + num_shared_experts
        self.experts = ParallelMLP(num_experts, in_dim, expert_dims)
        self.out_dim = self.experts.out_dim
        self.gates = ParallelMLP(num_tasks, in_dim, [num_experts], final_activation=False, bias=False, gate=True)
        # v_k starts as the mean of task k's experts (with one expert, the expert itself).
        self.native_weights = nn.Parameter(torch.full((num_tasks, num_task_experts), 1.0 / num_task_experts))
        self.shared_gate = (
            ParallelMLP(1, in_dim, [num_experts], final_activation=False, bias=False, gate=True)
            if shared_gate
            else None
        )
        self.shared_weights = (
            nn.Parameter(torch.full((num_shared_experts,), 1.0 / num_shared_experts)) if shared_gate else None
        )
        self.every_expert = tuple(range(num_experts))

    def forward(self, task_inputs: Tensor, shared_input: Tensor | None) -> tuple[Tensor, Tensor | None, dict]:
        """task_inputs (B, d) read by every task, or (K, B, d); shared_input (B, d) or None (no shared experts).
        Returns the task outputs (K, B, H), the shared output (B, H) or None, and the gates' weights."""
        k, m, s = self.num_tasks, self.num_task_experts, self.num_shared_experts
        if task_inputs.dim() == 2 and (s == 0 or shared_input is task_inputs):
            outputs = self.experts(task_inputs)  # (E, B, H): every expert reads the same rows
        else:
            per_task = task_inputs if task_inputs.dim() == 3 else task_inputs.expand(k, *task_inputs.shape)
            streams = [per_task if m == 1 else per_task.repeat_interleave(m, dim=0)]  # (K*m, B, d)
            if s:
                if shared_input is None:
                    raise ValueError("Expected a shared input for a level with shared experts, but got None")
                streams.append(shared_input.expand(s, *shared_input.shape))  # (s, B, d)
            outputs = self.experts(torch.cat(streams))  # (E, B, H)
        b, h = outputs.shape[1], outputs.shape[2]
        weights = torch.softmax(self.gates(task_inputs), dim=-1)  # (K, B, E): every expert of the level
        mixed = gate_mix(weights, outputs, (self.every_expert,) * k)  # (K, B, H)
        native = outputs[: k * m].view(k, m, b, h)  # (K, m, B, H): each task's own experts
        mixed = mixed + torch.einsum("km,kmbh->kbh", self.native_weights, native)  # (K, B, H)
        gates = {"task": weights}
        shared_out = None
        if self.shared_gate is not None and self.shared_weights is not None:
            if shared_input is None:
                raise ValueError("Expected a shared input for the shared fusion unit, but got None")
            shared_w = torch.softmax(self.shared_gate(shared_input)[0], dim=-1)  # (B, E)
            shared_out = gate_mix(shared_w.unsqueeze(0), outputs, (self.every_expert,))[0]  # (B, H)
            shared_out = shared_out + torch.einsum("s,sbh->bh", self.shared_weights, outputs[k * m :])  # (B, H)
            gates["shared"] = shared_w
        return mixed, shared_out, gates


class AdaTT(nn.Module):
    """Adaptive Task-to-Task Fusion Network (Li et al., KDD 2023).

    `num_levels` fusion levels: level j's task k experts and gate read task k's output of level j−1 (the
    input x at level 0), its shared experts the shared unit's output of level j−1; the last level has no
    shared fusion unit. Then one tower per task on its last-level output.
    """

    def __init__(self, config: AdaTTConfig, in_dim: int, num_tasks: int):
        super().__init__()
        self.levels = nn.ModuleList()
        d = in_dim
        for j in range(config.num_levels):
            level = FusionLevel(
                num_tasks=num_tasks,
                in_dim=d,
                num_task_experts=config.num_task_experts,
                num_shared_experts=config.num_shared_experts,
                expert_dims=config.expert_dims,
                shared_gate=config.num_shared_experts > 0 and j + 1 < config.num_levels,
            )
            self.levels.append(level)
            d = level.out_dim
        self.towers = Towers(num_tasks, d, config.tower_dims)

    def extract(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """What every tower receives, (T, B, H), and every gate's weights keyed like `L0.task1`, `L0.shared`."""
        task_in: Tensor = x
        shared_in: Tensor | None = x
        gates: dict[str, Tensor] = {}
        for j, level in enumerate(self.levels):
            task_in, shared_in, level_gates = level(task_in, shared_in)
            gates.update({f"L{j}.task{k}": w for k, w in enumerate(level_gates["task"])})
            if "shared" in level_gates:
                gates[f"L{j}.shared"] = level_gates["shared"]
        return task_in, gates

    def gate_experts(self) -> dict[str, list[str]]:
        """For every gate of `extract`, the names of the experts it weighs, in weight order (all of the level's)."""
        names: dict[str, list[str]] = {}
        for j, level in enumerate(self.levels):
            experts = [f"L{j}.task{k}.{i}" for k in range(level.num_tasks) for i in range(level.num_task_experts)]
            experts += [f"L{j}.shared{i}" for i in range(level.num_shared_experts)]
            names.update({f"L{j}.task{k}": experts for k in range(level.num_tasks)})
            if level.shared_gate is not None:
                names[f"L{j}.shared"] = experts
        return names

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.extract(x)[0])
