"""The model family of DESIGN.md §2. Every body maps the input representation x (B, d) to logits (B, T).

All bodies share one argument vocabulary: `tower_dims` for the per-task towers, `expert_dims` for the
layers inside each expert, `num_task_experts` / `num_shared_experts` / `num_levels` for extraction
layers. A tower is a ReLU MLP ending in one linear output per task.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from plerec.errors import did_you_mean, unknown_key
from plerec.models.layers import ExtractionLayer, FeatureInput, ParallelMLP

# What a model may be: checked when a config is read and before any weight is allocated, so that a typo or a
# crafted checkpoint fails with a message instead of exhausting memory or time.
MAX_WIDTH = 65_536  # embedding_dim and every layer width
MAX_LAYERS = 64  # entries of tower_dims, bottom_dims, expert_dims
MAX_LEVELS = 64  # PLE levels
MAX_EXPERTS = 1_024  # experts of one kind in one level (num_experts, num_task_experts, num_shared_experts)
MAX_EMBEDDING_ROWS = 2**31  # all embedding rows together (every copy, every field, hash buckets included)
MAX_PARAMETERS = 2**32  # 16 GiB of float32


DENSE_INITS = ("uniform", "he")
BATCH_NORM_PLACES = ("gates", "experts", "towers")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Hyperparameters every model has."""

    embedding_dim: int = 8
    embedding_init_std: float = 1e-4
    tower_dims: tuple[int, ...] = (64,)
    # The weights of the experts', bottoms', gates' and towers' layers (every ParallelMLP): "uniform" is
    # nn.Linear's U(±1/√fan_in) with such biases; "he" is N(0, 2/fan_in) with zero biases (He et al. 2015).
    # Neither is better everywhere (benchmarks/README.md): "he" trains the benchmark's CTR models faster in
    # one epoch, and doubles the demo's test MSE.
    dense_init: str = "uniform"
    # Where the body normalises over the batch (layers.BankNorm), any of BATCH_NORM_PLACES: "gates" (each gate's
    # logits, before its softmax), "experts" (every layer of the experts and bottoms: the banks that end in a
    # ReLU), "towers" (the hidden layers of the banks that end in an output layer: towers, `single`'s
    # networks). None by default: the papers' networks. All three is torch-rechub's MLP.
    batch_norm: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_positive("embedding_dim", [self.embedding_dim])
        if self.dense_init not in DENSE_INITS:
            raise ValueError(
                f"Expected `dense_init` to be one of {', '.join(DENSE_INITS)}, but got {self.dense_init!r}"
            )
        for place in self.batch_norm:
            if place not in BATCH_NORM_PLACES:
                raise ValueError(
                    f"Expected `batch_norm` to list places among {', '.join(BATCH_NORM_PLACES)}, but got {place!r}."
                    f"{did_you_mean(place, BATCH_NORM_PLACES) if isinstance(place, str) else ''}"
                )
        if len(set(self.batch_norm)) != len(self.batch_norm):
            raise ValueError(f"Expected `batch_norm` to list each place once, but got {list(self.batch_norm)}")
        if not (self.embedding_init_std > 0 and math.isfinite(self.embedding_init_std)):
            raise ValueError(f"Expected `embedding_init_std` to be finite and > 0, but got {self.embedding_init_std}")
        _check_positive("tower_dims", self.tower_dims)


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedBottomConfig(ModelConfig):
    """Models built from bottom MLPs (shared, per task, or both) and towers."""

    bottom_dims: tuple[int, ...] = (128,)

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check_positive("bottom_dims", self.bottom_dims, allow_empty=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class SingleTaskConfig(ModelConfig):
    """One network per task: its own embeddings, its own bottom of `bottom_dims`, then its tower.

    `bottom_dims = []` leaves the tower alone on the input (the PLE paper's synthetic single-task model).
    """

    bottom_dims: tuple[int, ...] = (128,)

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check_positive("bottom_dims", self.bottom_dims)


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig(ModelConfig):
    num_experts: int = 4
    expert_dims: tuple[int, ...] = (128,)

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check_positive("num_experts", [self.num_experts], limit=MAX_EXPERTS)
        _check_positive("expert_dims", self.expert_dims, allow_empty=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class LevelConfig:
    """One extraction layer: experts per task, shared experts, and the widths inside every expert."""

    num_task_experts: int = 1
    num_shared_experts: int = 1
    expert_dims: tuple[int, ...] = (128,)

    def __post_init__(self) -> None:
        for name in ("num_task_experts", "num_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Expected `{name}` to be an integer >= 0, but got {value}")
            if value > MAX_EXPERTS:
                raise ValueError(f"Expected `{name}` to be at most {MAX_EXPERTS}, but got {value}")
        if self.num_task_experts + self.num_shared_experts == 0:
            raise ValueError("Expected a level to have at least one task or shared expert, but got none")
        _check_positive("expert_dims", self.expert_dims, allow_empty=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class PLEConfig(ModelConfig):
    """PLE hyperparameters. `levels`, when given, sets every level explicitly and overrides the
    uniform `num_levels` / `num_task_experts` / `num_shared_experts` / `expert_dims`."""

    num_levels: int = 2
    num_task_experts: int = 1
    num_shared_experts: int = 1
    expert_dims: tuple[int, ...] = (128,)
    levels: tuple[LevelConfig, ...] = field(default=())

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check_positive("num_levels", [self.num_levels], limit=MAX_LEVELS)
        if len(self.levels) > MAX_LEVELS:
            raise ValueError(
                f"Expected [model] `levels` to list at most {MAX_LEVELS} levels, but got {len(self.levels)}"
            )
        if not self.levels:
            LevelConfig(
                num_task_experts=self.num_task_experts,
                num_shared_experts=self.num_shared_experts,
                expert_dims=self.expert_dims,
            )  # validates the uniform settings
        levels = self.resolved_levels()
        # Level j's shared experts read level j-1's shared gate, which mixes level j-1's experts and is selected
        # by level j-1's shared stream: the input x at level 0, else level j-2's shared gate output. A level
        # j >= 1 without shared experts has no shared stream, so the level after it can have no shared experts.
        for j in range(1, len(levels) - 1):
            if levels[j + 1].num_shared_experts and not levels[j].num_shared_experts:
                raise ValueError(
                    f"Expected [model] level {j} to have shared experts, because level {j + 1} has some: they read "
                    f"level {j}'s shared gate, which needs a shared stream that level {j} (no shared experts) "
                    f"does not have. Give level {j} a shared expert or level {j + 1} none"
                )

    def resolved_levels(self) -> tuple[LevelConfig, ...]:
        if self.levels:
            return self.levels
        one = LevelConfig(
            num_task_experts=self.num_task_experts,
            num_shared_experts=self.num_shared_experts,
            expert_dims=self.expert_dims,
        )
        return (one,) * self.num_levels


@dataclass(frozen=True, kw_only=True, slots=True)
class CGCConfig(ModelConfig):
    num_task_experts: int = 1
    num_shared_experts: int = 1
    expert_dims: tuple[int, ...] = (128,)

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        LevelConfig(
            num_task_experts=self.num_task_experts,
            num_shared_experts=self.num_shared_experts,
            expert_dims=self.expert_dims,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class MLMMoEConfig(MoEConfig):
    """ML-MMoE: `num_experts` experts of `expert_dims` on each of its two levels."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AsymmetricConfig(SharedBottomConfig):
    source_task: int = 0

    def __post_init__(self) -> None:
        SharedBottomConfig.__post_init__(self)
        if not isinstance(self.source_task, int) or isinstance(self.source_task, bool) or self.source_task < 0:
            raise ValueError(f"Expected `source_task` to be an integer >= 0, but got {self.source_task}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ColumnsConfig(SharedBottomConfig):
    """Per-task columns with `bottom_dims` layers (cross-stitch)."""

    bottom_dims: tuple[int, ...] = (128, 64)


@dataclass(frozen=True, kw_only=True, slots=True)
class SluiceConfig(ColumnsConfig):
    num_subspaces: int = 2

    def __post_init__(self) -> None:
        SharedBottomConfig.__post_init__(self)
        _check_positive("num_subspaces", [self.num_subspaces])


def _check_positive(name: str, values, *, allow_empty: bool = True, limit: int = MAX_WIDTH) -> None:
    values = list(values)
    if not values and not allow_empty:
        raise ValueError(f"Expected `{name}` to list at least one width, but got []")
    if len(values) > MAX_LAYERS:
        raise ValueError(f"Expected `{name}` to list at most {MAX_LAYERS} widths, but got {len(values)}")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Expected `{name}` to hold positive integers, but got {values}")
        if v > limit:
            raise ValueError(f"Expected `{name}` to hold integers of at most {limit}, but got {values}")


class Towers(nn.Module):
    """One tower per task, computed together; reads (B, H) shared by all tasks or (T, B, H)."""

    def __init__(self, num_tasks: int, in_dim: int, tower_dims: tuple[int, ...]):
        super().__init__()
        self.mlp = ParallelMLP(num_tasks, in_dim, [*tower_dims, 1], final_activation=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h).squeeze(-1).transpose(0, 1)  # (T, B, 1) -> (B, T)


class SingleTask(nn.Module):
    """One independent network per task (bottom + tower) on the task's own embeddings: the baseline of the
    MTL gain (PLE Eq. 11). Nothing is shared, so no task's loss has a gradient on another task's weights;
    `fit` trains it as one one-task fit per task (each selected on its own validation metric)."""

    def __init__(self, config: SingleTaskConfig, in_dim: int, num_tasks: int):
        super().__init__()
        self.nets = ParallelMLP(num_tasks, in_dim, [*config.bottom_dims, *config.tower_dims, 1], final_activation=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (T, B, d), task t's input from its own embeddings (FeatureInput with one copy per task)."""
        return self.nets(x).squeeze(-1).transpose(0, 1)  # (T, B, 1) -> (B, T)


class SharedBottom(nn.Module):
    """Hard parameter sharing (Caruana 1997): one shared bottom MLP, one tower per task."""

    def __init__(self, config: SharedBottomConfig, in_dim: int, num_tasks: int):
        super().__init__()
        self.bottom = ParallelMLP(1, in_dim, config.bottom_dims)
        self.towers = Towers(num_tasks, self.bottom.out_dim, config.tower_dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.bottom(x)[0])


class OMoE(nn.Module):
    """One-gate mixture of experts (Ma et al., KDD 2018, §4): one softmax gate shared by all tasks."""

    def __init__(self, config: MoEConfig, in_dim: int, num_tasks: int):
        super().__init__()
        self.layer = ExtractionLayer(
            num_tasks=1,
            in_dim=in_dim,
            num_task_experts=0,
            num_shared_experts=config.num_experts,
            expert_dims=config.expert_dims,
            shared_gate=False,
        )
        self.towers = Towers(num_tasks, self.layer.out_dim, config.tower_dims)

    def extract(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mixed, _, gates = self.layer(x, x)
        return mixed[0], {"L0.gate": gates["task"][0]}

    def gate_experts(self) -> dict[str, list[str]]:
        return {"L0.gate": [f"L0.shared{i}" for i in range(self.layer.num_shared_experts)]}

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.extract(x)[0])


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020, §4.3): stacked extraction layers.

    At level j task k's experts and gate read task k's output of level j-1 and the shared experts read
    the shared gate's output; the last level has no shared gate. With one level this is CGC (§4.2); a
    level with no task experts is an MMoE layer (Ma et al., KDD 2018).
    """

    def __init__(self, levels: tuple[LevelConfig, ...], tower_dims: tuple[int, ...], in_dim: int, num_tasks: int):
        super().__init__()
        self.levels = nn.ModuleList()
        d = in_dim
        for j, lv in enumerate(levels):
            # A shared gate exists only where a next level's shared experts consume it.
            feeds_next = j + 1 < len(levels) and levels[j + 1].num_shared_experts > 0
            layer = ExtractionLayer(
                num_tasks=num_tasks,
                in_dim=d,
                num_task_experts=lv.num_task_experts,
                num_shared_experts=lv.num_shared_experts,
                expert_dims=lv.expert_dims,
                shared_gate=feeds_next,
            )
            self.levels.append(layer)
            d = layer.out_dim
        self.towers = Towers(num_tasks, d, tower_dims)

    def extract(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """What every tower receives, (T, B, H), and every gate's weights keyed like `L0.task1`."""
        task_in: Tensor = x
        shared_in: Tensor | None = x
        gates: dict[str, Tensor] = {}
        for j, layer in enumerate(self.levels):
            task_in, shared_in, level_gates = layer(task_in, shared_in)
            for k in range(level_gates["task"].shape[0]):
                gates[f"L{j}.task{k}"] = level_gates["task"][k]
            if "shared" in level_gates:
                gates[f"L{j}.shared"] = level_gates["shared"]
        return task_in, gates

    def gate_experts(self) -> dict[str, list[str]]:
        """For every gate of `extract`, the names of the experts it weighs, in weight order."""
        names: dict[str, list[str]] = {}
        for j, layer in enumerate(self.levels):
            own = [[f"L{j}.task{k}.{i}" for i in range(layer.num_task_experts)] for k in range(layer.num_tasks)]
            shared = [f"L{j}.shared{i}" for i in range(layer.num_shared_experts)]
            for k in range(layer.num_tasks):
                names[f"L{j}.task{k}"] = own[k] + shared
            if layer.shared_gate is not None:
                names[f"L{j}.shared"] = [e for task in own for e in task] + shared
        return names

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.extract(x)[0])


class MLMMoE(nn.Module):
    """Multi-level MMoE, the ML-MMoE baseline of the PLE paper (Tang et al., RecSys 2020, §5.1, Fig. 1).

    Two MMoE levels (Ma et al., KDD 2018): each second-level expert reads its own softmax mixture of the
    first-level experts, and each task reads its own mixture of the second-level experts. Every gate
    takes the raw input x as its selector, unlike PLE whose deeper gates read the previous level.
    """

    def __init__(self, config: MLMMoEConfig, in_dim: int, num_tasks: int):
        super().__init__()
        n = config.num_experts
        # Level 1 is an MMoE layer whose "tasks" are the n second-level experts.
        self.level1 = ExtractionLayer(
            num_tasks=n,
            in_dim=in_dim,
            num_task_experts=0,
            num_shared_experts=n,
            expert_dims=config.expert_dims,
            shared_gate=False,
        )
        self.experts2 = ParallelMLP(n, self.level1.out_dim, config.expert_dims)
        self.task_gates = ParallelMLP(num_tasks, in_dim, [n], final_activation=False, bias=False, gate=True)
        self.towers = Towers(num_tasks, self.experts2.out_dim, config.tower_dims)

    def extract(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mixed1, _, gates1 = self.level1(x, x)  # (n, B, H1): one input per second-level expert
        outputs2 = self.experts2(mixed1)  # (n, B, H2)
        weights = torch.softmax(self.task_gates(x), dim=-1)  # (T, B, n), selected by the raw input
        mixed2 = torch.einsum("tbn,nbh->tbh", weights, outputs2)  # (T, B, H2)
        gates = {f"L0.expert{i}": w for i, w in enumerate(gates1["task"])}
        gates.update({f"L1.task{k}": w for k, w in enumerate(weights)})
        return mixed2, gates

    def gate_experts(self) -> dict[str, list[str]]:
        n = self.experts2.num
        names = {f"L0.expert{i}": [f"L0.shared{j}" for j in range(n)] for i in range(n)}
        names.update({f"L1.task{k}": [f"L1.shared{j}" for j in range(n)] for k in range(self.task_gates.num)})
        return names

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.extract(x)[0])


class AsymmetricSharing(nn.Module):
    """Asymmetric sharing, a baseline of the PLE paper (Tang et al., RecSys 2020, §2 and Fig. 1c).

    Every task has its own bottom; the source task's bottom output is also fed into every other task's
    bottom, so knowledge flows one way: from the source task to the others.
    """

    def __init__(self, config: AsymmetricConfig, in_dim: int, num_tasks: int):
        super().__init__()
        if not 0 <= config.source_task < num_tasks:
            raise ValueError(
                f"Expected [model] `source_task` to index one of the {num_tasks} tasks, but got {config.source_task}"
            )
        self.source_task = config.source_task
        self.source = ParallelMLP(1, in_dim, config.bottom_dims)
        self.others = (
            ParallelMLP(num_tasks - 1, in_dim + self.source.out_dim, config.bottom_dims) if num_tasks > 1 else None
        )
        self.towers = Towers(num_tasks, self.source.out_dim, config.tower_dims)

    def forward(self, x: Tensor) -> Tensor:
        source = self.source(x)  # (1, B, H)
        if self.others is None:
            return self.towers(source)
        others = self.others(torch.cat([x, source[0]], dim=1))  # (T-1, B, H)
        k = self.source_task
        return self.towers(torch.cat([others[:k], source, others[k:]]))  # (T, B, H) in task order


class CustomizedSharing(nn.Module):
    """Customized sharing, a baseline of the PLE paper (Tang et al., RecSys 2020, §2 and Fig. 1d).

    A shared bottom and one task-specific bottom per task; each tower reads both, concatenated.
    """

    def __init__(self, config: SharedBottomConfig, in_dim: int, num_tasks: int):
        super().__init__()
        self.shared = ParallelMLP(1, in_dim, config.bottom_dims)
        self.specific = ParallelMLP(num_tasks, in_dim, config.bottom_dims)
        self.towers = Towers(num_tasks, self.shared.out_dim + self.specific.out_dim, config.tower_dims)

    def forward(self, x: Tensor) -> Tensor:
        specific = self.specific(x)  # (T, B, H)
        shared = self.shared(x).expand_as(specific)  # (T, B, H)
        return self.towers(torch.cat([shared, specific], dim=-1))  # towers read (T, B, 2H)


def _stitch_init(size: int, self_weight: float = 0.9) -> Tensor:
    """A mixing matrix near the identity: each column keeps most of itself (Misra et al. §3.2 init)."""
    if size == 1:
        return torch.ones(1, 1)
    off = (1.0 - self_weight) / (size - 1)
    return torch.full((size, size), off) + torch.eye(size) * (self_weight - off)


class CrossStitch(nn.Module):
    """Cross-stitch networks (Misra, Shrivastava, Gupta, Hebert, CVPR 2016).

    One column (MLP) per task; after every layer a learned matrix α (T×T, initialised near the
    identity) replaces each task's activation by a linear combination of every task's: h'_k = Σ_j α_kj h_j.
    """

    def __init__(self, config: ColumnsConfig, in_dim: int, num_tasks: int):
        super().__init__()
        self.layers = nn.ModuleList()
        self.stitches = nn.ParameterList()
        d = in_dim
        for h in config.bottom_dims:
            self.layers.append(ParallelMLP(num_tasks, d, [h]))
            self.stitches.append(nn.Parameter(_stitch_init(num_tasks)))
            d = h
        self.towers = Towers(num_tasks, d, config.tower_dims)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer, alpha in zip(self.layers, self.stitches, strict=True):
            h = torch.einsum("kj,jbh->kbh", alpha, layer(h))  # (T, B, H)
        return self.towers(h)


class Sluice(nn.Module):
    """Sluice networks (Ruder, Bingel, Augenstein, Søgaard, AAAI 2019).

    Like cross-stitch, but every task's layer is split into subspaces and a learned α mixes all
    subspaces of all tasks; a learned β per task weights the outputs of every layer (a skip
    connection), whose weighted concatenation feeds the tower. (The paper's optional orthogonality
    penalty between subspaces is not applied.)
    """

    def __init__(self, config: SluiceConfig, in_dim: int, num_tasks: int):
        super().__init__()
        g = config.num_subspaces
        for h in config.bottom_dims:
            if h % g:
                raise ValueError(
                    f"Expected every `bottom_dims` width to divide into {g} subspaces, "
                    f"but got {list(config.bottom_dims)}"
                )
        self.num_tasks, self.num_subspaces = num_tasks, g
        self.layers = nn.ModuleList()
        self.alphas = nn.ParameterList()
        d = in_dim
        for h in config.bottom_dims:
            self.layers.append(ParallelMLP(num_tasks, d, [h]))
            self.alphas.append(nn.Parameter(_stitch_init(num_tasks * g)))
            d = h
        self.betas = nn.Parameter(torch.full((num_tasks, len(config.bottom_dims)), 1.0))
        self.towers = Towers(num_tasks, sum(config.bottom_dims), config.tower_dims)

    def forward(self, x: Tensor) -> Tensor:
        t, g = self.num_tasks, self.num_subspaces
        h = x
        outputs = []
        for layer, alpha in zip(self.layers, self.alphas, strict=True):
            out = layer(h)  # (T, B, H)
            b, width = out.shape[1], out.shape[2]
            parts = out.view(t, b, g, width // g).permute(0, 2, 1, 3).reshape(t * g, b, width // g)  # (T*G, B, H/G)
            mixed = torch.einsum("ij,jbh->ibh", alpha, parts)  # (T*G, B, H/G)
            h = mixed.view(t, g, b, width // g).permute(0, 2, 1, 3).reshape(t, b, width)  # (T, B, H)
            outputs.append(h)
        skip = torch.cat([self.betas[:, i, None, None] * o for i, o in enumerate(outputs)], dim=-1)  # (T, B, ΣH)
        return self.towers(skip)


def _ple(config: PLEConfig, in_dim: int, num_tasks: int) -> PLE:
    return PLE(config.resolved_levels(), config.tower_dims, in_dim, num_tasks)


def _cgc(config: CGCConfig, in_dim: int, num_tasks: int) -> PLE:
    level = LevelConfig(
        num_task_experts=config.num_task_experts,
        num_shared_experts=config.num_shared_experts,
        expert_dims=config.expert_dims,
    )
    return PLE((level,), config.tower_dims, in_dim, num_tasks)


def _mmoe(config: MoEConfig, in_dim: int, num_tasks: int) -> PLE:
    level = LevelConfig(num_task_experts=0, num_shared_experts=config.num_experts, expert_dims=config.expert_dims)
    return PLE((level,), config.tower_dims, in_dim, num_tasks)


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build a body from its config, and what it is."""

    build: object
    config: type
    summary: str
    per_task_input: bool = False  # every task gets embeddings of its own (FeatureInput copies)


MODELS: dict[str, ModelSpec] = {
    "single": ModelSpec(
        SingleTask, SingleTaskConfig, "one independent network per task: own embeddings, bottom, tower", True
    ),
    "shared_bottom": ModelSpec(SharedBottom, SharedBottomConfig, "hard sharing: a shared bottom, task towers"),
    "omoe": ModelSpec(OMoE, MoEConfig, "shared experts mixed by one gate for all tasks"),
    "mmoe": ModelSpec(_mmoe, MoEConfig, "shared experts, one gate per task (Ma et al. 2018)"),
    "cgc": ModelSpec(_cgc, CGCConfig, "task + shared experts, task gates (PLE paper §4.2)"),
    "ple": ModelSpec(_ple, PLEConfig, "stacked extraction layers (Tang et al. 2020)"),
    "ml_mmoe": ModelSpec(MLMMoE, MLMMoEConfig, "two MMoE levels, every gate selected by the raw input"),
    "asymmetric": ModelSpec(AsymmetricSharing, AsymmetricConfig, "one task's bottom feeds every other's"),
    "customized": ModelSpec(CustomizedSharing, SharedBottomConfig, "shared + task-specific bottoms, concatenated"),
    "cross_stitch": ModelSpec(CrossStitch, ColumnsConfig, "task columns mixed by learned α (Misra et al. 2016)"),
    "sluice": ModelSpec(Sluice, SluiceConfig, "subspaces mixed by α, layers skipped by β (Ruder et al. 2019)"),
}


class MultiTaskModel(nn.Module):
    """Feature input followed by a body from the registry. Returns logits (B, T), never probabilities."""

    def __init__(self, name: str, config: ModelConfig, vocab_sizes, num_dense: int, num_tasks: int, lists=(), dims=()):
        super().__init__()
        self.name = name
        self.config = config
        copies = num_tasks if MODELS[name].per_task_input else 1
        self.input = FeatureInput(
            vocab_sizes, num_dense, config.embedding_dim, config.embedding_init_std, copies, tuple(lists), tuple(dims)
        )
        self.body = MODELS[name].build(config, self.input.out_dim, num_tasks)
        if config.batch_norm:
            add_batch_norm_(self.body, config.batch_norm)
        # A regression task trained on standardised labels predicts σ·out + μ, in the label's units; (1, 0) for
        # the others. Set by training from the training labels (train.set_output_scale), saved with the weights.
        self.register_buffer("output_scale", torch.ones(num_tasks))
        self.register_buffer("output_shift", torch.zeros(num_tasks))

    def forward(
        self, sparse: Tensor, dense: Tensor, lists: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        x = self.input(sparse, dense, lists, lengths)
        body = self.body
        compiled = self.__dict__.get("_compiled_body")  # (the compiled body, the one batch size it was made for)
        if compiled is not None and self.training and len(sparse) == compiled[1] and torch.is_grad_enabled():
            body = compiled[0]
        return torch.addcmul(self.output_shift, body(x), self.output_scale)  # (B, T)

    def compile_body(self, compiled: Callable[[Tensor], Tensor] | None, rows: int) -> None:
        """Training batches of exactly `rows` rows run `compiled` (torch.compile of `self.body`, plerec.compiled);
        every other call (another batch size, evaluation, no gradient) the eager body. None: eager only. Kept
        out of the module's children, so the state dict, copies and exports never see it."""
        if compiled is None:
            self.__dict__.pop("_compiled_body", None)
        else:
            self.__dict__["_compiled_body"] = (compiled, rows)

    def has_gates(self) -> bool:
        return hasattr(self.body, "extract")

    @torch.no_grad()
    def gate_weights(
        self, sparse: Tensor, dense: Tensor, lists: Tensor | None = None, lengths: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Every gate's softmax weights over its experts, (B, E) each; empty for models without gates."""
        if not self.has_gates():
            return {}
        return self.body.extract(self.input(sparse, dense, lists, lengths))[1]

    def gate_experts(self) -> dict[str, list[str]]:
        """Gate name -> the names of the experts it weighs (`L{level}.task{k}.{i}` or `L{level}.shared{i}`)."""
        return self.body.gate_experts() if self.has_gates() else {}

    def auxiliary_loss(self, logits: Tensor) -> Tensor | None:
        """The body's loss term beyond the tasks' own, from this model's `logits` (B, T), to add to the
        weighted task losses (AITM's calibrator); None for every body without one."""
        extra = getattr(self.body, "auxiliary_loss", None)
        return None if extra is None else extra(logits)

    def funnel_step_logits(
        self, sparse: Tensor, dense: Tensor, lists: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        """A funnel body's per-step conditional logits (B, T): step t given step t-1 (ESMM's CVR given click)."""
        if not hasattr(self.body, "step_logits"):
            raise TypeError(f"Expected a funnel model with per-step conditional logits (esmm), but got {self.name}")
        return self.body.step_logits(self.input(sparse, dense, lists, lengths))

    def funnel_probabilities(
        self, sparse: Tensor, dense: Tensor, lists: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        """σ of `funnel_step_logits`, (B, T): pCTR, pCVR given the click, …; their running products are the outputs."""
        return torch.sigmoid(self.funnel_step_logits(sparse, dense, lists, lengths))


def model_config(name: str, params: dict | None = None) -> ModelConfig:
    """The config of model `name` from plain values (as read from TOML), rejecting unknown keys."""
    if name not in MODELS:
        raise ValueError(f"Unknown model `{name}`.{did_you_mean(name, MODELS)} Expected one of: {', '.join(MODELS)}")
    cls = MODELS[name].config
    valid = {f.name for f in fields(cls)}
    values = {}
    for key, value in (params or {}).items():
        if key not in valid:
            raise unknown_key(key, valid, f"[model] for `{name}`")
        if key == "levels":
            if not isinstance(value, list | tuple):
                raise ValueError(f"Expected [model] `levels` to be a list of tables, but got {value!r}")
            if len(value) > MAX_LEVELS:  # before building them: a crafted list can be long
                raise ValueError(f"Expected [model] `levels` to list at most {MAX_LEVELS} levels, but got {len(value)}")
            value = tuple(_level(j, lv) for j, lv in enumerate(value))
        else:
            value = _typed(value, typing.get_type_hints(cls)[key], f"[model] `{key}`")
        values[key] = value
    return cls(**values)


def _typed(value, hint, where: str):
    """A TOML value checked against a hyperparameter's type (int, float or a tuple of ints)."""
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"Expected {where} to be {'a number' if hint is float else 'an integer'}, but got {value!r}")
    if hint is float:
        return float(value)
    if typing.get_origin(hint) is tuple:
        of_strings = typing.get_args(hint)[0] is str
        kind = "strings" if of_strings else "integers"
        if not isinstance(value, list | tuple) or (of_strings and not all(isinstance(v, str) for v in value)):
            raise ValueError(f"Expected {where} to be a list of {kind}, but got {value!r}")
        return tuple(value)
    return value


def _level(j: int, level) -> LevelConfig:
    if isinstance(level, LevelConfig):
        return level
    if not isinstance(level, dict):
        raise ValueError(f"Expected [model] levels[{j}] to be a table, but got {level!r}")
    valid = {f.name for f in fields(LevelConfig)}
    for key in level:
        if key not in valid:
            raise unknown_key(key, valid, f"[model] levels[{j}]")
    hints = typing.get_type_hints(LevelConfig)
    return LevelConfig(**{k: _typed(v, hints[k], f"[model] levels[{j}] `{k}`") for k, v in level.items()})


def build_model(
    name: str, config: ModelConfig | dict | None, vocab_sizes, num_dense: int, num_tasks: int, lists=(), dims=()
) -> MultiTaskModel:
    """A MultiTaskModel for `num_tasks` tasks over the given sparse vocabularies, dense width, list fields
    (ListSpec) and per-field embedding widths (0: embedding_dim); `Encoder.model_inputs()` gives them all."""
    if not isinstance(config, ModelConfig):
        config = model_config(name, config)
    if num_tasks < 1:
        raise ValueError(f"Expected at least one task, but got {num_tasks}")
    state_shapes(name, config, vocab_sizes, num_dense, num_tasks, lists, dims)  # the limits, before any allocation
    model = MultiTaskModel(name, config, vocab_sizes, num_dense, num_tasks, lists, dims)
    if config.dense_init == "he":
        he_init_(model)
    return model


def add_batch_norm_(body: nn.Module, places: tuple[str, ...]) -> None:
    """A BankNorm in every ParallelMLP of the body at the [model] batch_norm `places` (ParallelMLP.add_batch_norm).
    The feature input's attention MLP is not the body's and has none."""
    for module in body.modules():
        if isinstance(module, ParallelMLP):
            module.add_batch_norm(places)


@torch.no_grad()
def he_init_(model: nn.Module) -> None:
    """Every ParallelMLP layer's weights drawn from N(0, 2 / fan_in), its biases zero (He et al. 2015: the
    variance of a ReLU layer's output kept from layer to layer), in place."""
    for module in model.modules():
        if isinstance(module, ParallelMLP):
            for weight in module.weights:  # (E, fan_in, fan_out)
                weight.normal_(0.0, math.sqrt(2.0 / weight.shape[1]))
            for bias in module.biases or ():
                bias.zero_()


def state_shapes(
    name: str, config: ModelConfig, vocab_sizes, num_dense: int, num_tasks: int, lists=(), dims=()
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of every tensor of the model's state dict, with nothing allocated: the model is
    built on the meta device, after its embedding rows are checked against MAX_EMBEDDING_ROWS (the config's
    own limits bound the rest), and its parameter count is checked against MAX_PARAMETERS."""
    copies = num_tasks if MODELS[name].per_task_input else 1
    ids = sum(vocab_sizes) + sum(s.vocab_size for s in lists)
    rows = copies * ids
    if rows > MAX_EMBEDDING_ROWS:
        raise ValueError(
            f"Expected at most {MAX_EMBEDDING_ROWS} embedding rows in all, but the vocabularies and hash buckets "
            f"({ids} ids{f' for each of {copies} tasks' if copies > 1 else ''}) need {rows}; "
            "lower [features] hash_buckets or max_vocab"
        )
    with torch.device("meta"):
        state = MultiTaskModel(name, config, vocab_sizes, num_dense, num_tasks, lists, dims).state_dict()
    count = sum(t.numel() for t in state.values())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"Expected a model of at most {MAX_PARAMETERS} parameters, but {name} with these settings has {count} "
            f"({4 * count / 2**30:.1f} GiB); lower embedding_dim, the layer widths, the experts or the vocabularies"
        )
    return {key: (tuple(t.shape), t.dtype) for key, t in state.items()}


def stack_single_task(models, vocab_sizes, num_dense: int, lists=(), dims=()) -> MultiTaskModel:
    """The K-task `single` model assembled from K one-task `single` models (task order): every parameter of
    the K-task model is the one-task models' parameters stacked along its first axis (the embedding copies,
    the banks of task networks), so it computes exactly what each one-task model computes."""
    if not models or any(m.name != "single" or m.config != models[0].config for m in models):
        raise ValueError("Expected one-task `single` models with one config to stack, but got others")
    stacked = MultiTaskModel("single", models[0].config, vocab_sizes, num_dense, len(models), lists, dims)
    states = [m.state_dict() for m in models]
    stacked.load_state_dict({key: torch.cat([s[key] for s in states]) for key in stacked.state_dict()})
    return stacked.to(next(models[0].parameters()).device)


# The funnel models and AdaTT build on this module's configs and towers, so they are registered last.
from plerec.models.adatt import AdaTT, AdaTTConfig  # noqa: E402
from plerec.models.funnel import AITM, ESMM, AITMConfig, ESMMConfig  # noqa: E402

MODELS.update(
    {
        "esmm": ModelSpec(ESMM, ESMMConfig, "CTR, CVR towers; pCTCVR = pCTR·pCVR on all impressions (Ma et al. 2018)"),
        "aitm": ModelSpec(AITM, AITMConfig, "funnel towers linked by attention transfer, calibrated (Xi et al. 2021)"),
        "adatt": ModelSpec(AdaTT, AdaTTConfig, "task and shared experts fused by task-to-task gates (Li et al. 2023)"),
    }
)
