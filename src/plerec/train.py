"""The training loop: masked per-task losses (Eq. 9), dynamic weights (Eq. 10), early stopping, checkpoints."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from plerec import jsonio
from plerec.balancing import Balancing, check_balancing, describe, loss_weights, make_balancing
from plerec.checkpoint import MODEL_FORMAT as CHECKPOINT_FORMAT
from plerec.checkpoint import (
    OPTIONAL_WEIGHTS,
    STATE_FORMAT,
    differences,
    read_checkpoint,
    read_checkpoint_file,
    write_checkpoint_file,
)
from plerec.compiled import CompilePlan, cache_folder
from plerec.config import Experiment, experiment_to_dict, key_defaults, write_experiment
from plerec.data.batches import InMemoryBatches, local_rows
from plerec.data.coverage import LabelCounts, check_label_counts
from plerec.data.encode import Encoder, encode_file
from plerec.data.fitter import fit_encoder_chunked
from plerec.data.stream import (
    ParquetBatches,
    check_stream,
    count_labels,
    load_encoder,
    local_eval_chunks,
    save_encoder,
)
from plerec.data.table import load_splits
from plerec.data.tables import EncodedTable
from plerec.distributed import (
    SINGLE_PROCESS,
    DistContext,
    all_reduce_sum,
    barrier,
    check_batch_size,
    gather_rows,
    init_distributed,
)
from plerec.fingerprint import NO_EFFECT, data_changes, data_fingerprint
from plerec.metrics import HIGHER_IS_BETTER, METRICS_BY_KIND, TaskMetricAccumulator
from plerec.models import MultiTaskModel, build_model
from plerec.observe import RunObserver, configured_observers, epoch_json, epoch_line, json_log
from plerec.optim import Adam, RowSparseAdam
from plerec.safe_io import run_lock


@dataclass(slots=True)
class PreparedData:
    """The encoder fitted on the training split, and every split: as column tensors in memory, or (with
    [data] streaming) as Parquet paths read a row group at a time."""

    encoder: Encoder
    splits: dict[str, EncodedTable]
    streams: dict[str, str] = field(default_factory=dict)

    def has(self, split: str) -> bool:
        return split in self.splits or split in self.streams

    @property
    def split_names(self) -> list[str]:
        return [s for s in ("train", "valid", "test") if self.has(s)]

    def for_task(self, k: int) -> PreparedData:
        """Task k alone: the same rows, features and encoder, task k's labels only (views, no copy)."""
        encoder = replace(self.encoder, tasks=[self.encoder.tasks[k]])
        splits = {
            name: replace(table, labels=table.labels[:, k : k + 1], label_mask=table.label_mask[:, k : k + 1])
            for name, table in self.splits.items()
        }
        return PreparedData(encoder, splits, dict(self.streams))


@dataclass(slots=True)
class FitResult:
    model: MultiTaskModel
    encoder: Encoder
    metrics: dict[str, dict[str, dict[str, float]]]  # valid/test -> task -> metric -> value
    history: list[dict] = field(default_factory=list)  # one record per epoch
    best_epoch: int = 0
    train_seconds: float = 0.0  # the training steps only, without evaluation
    best_epochs: dict[str, int] = field(default_factory=dict)  # the single-task baseline: each task's own
    compiled: dict = field(default_factory=dict)  # [train] compile: what was decided and measured (CompilePlan.summary)


def prepare_data(exp: Experiment, encoder: Encoder | None = None) -> PreparedData:
    """Read and split the data, fit the encoder on train (unless given or [data] prepared), encode once.

    With [data] streaming, nothing is loaded: the encoder comes from `prepared` or one pass over train.
    """
    if encoder is None and exp.data.prepared:
        encoder = load_encoder(exp.data.prepared, exp)
    files = {s: getattr(exp.data, s) for s in ("train", "valid", "test") if getattr(exp.data, s)}
    if exp.data.streaming:
        encoder = encoder or fit_encoder_chunked(exp, exp.data.train, exp.data.csv)
        for path in files.values():  # valid and test too: a bad file fails now, not after an epoch
            check_stream(path, encoder)
        for split, path in files.items():  # one pass over the label columns only
            check_label_counts(exp.tasks, count_labels(path, encoder), split, path)
        _release_freed_memory()
        return PreparedData(encoder, {}, files)
    if exp.data.train:  # separate files: read and encoded a chunk at a time, never whole DataFrames
        encoder = encoder or fit_encoder_chunked(exp, exp.data.train, exp.data.csv)
        splits = {}
        for split, path in files.items():
            _release_freed_memory()  # the previous file's reading buffers: not under the next file's
            splits[split] = encode_file(path, encoder, exp.data.csv)
    else:
        frames = load_splits(exp.data, exp.seed)
        encoder = encoder or Encoder.fit(exp, frames["train"])
        splits = {name: encoder.transform(frame) for name, frame in frames.items()}
        del frames
    for split, table in splits.items():  # an AUC or a loss that cannot be computed is an error now
        one_file = split not in files  # cut from [data] path by the split fractions (a `test` file is not)
        source = exp.data.path if one_file else files[split]
        counts = LabelCounts.of(table.labels, table.label_mask)
        check_label_counts(exp.tasks, counts, split, source, one_file=one_file)
    encoder.drop_lookups()  # every split is encoded: the value -> id tables are not needed in training
    _release_freed_memory()
    return PreparedData(encoder, splits)


def _release_freed_memory() -> None:
    """Hand the reading buffers freed above back to the OS (Arrow's memory pool and glibc keep them
    otherwise), so that they do not add to the process's peak memory during training."""
    import pyarrow

    pyarrow.default_memory_pool().release_unused()  # measured: ~100 MB kept by mimalloc after reading
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def masked_task_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    is_binary: torch.Tensor,
    counts: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 9: each task's loss is the mean over its own sample space only. Returns (T,).

    `counts` (T,) replaces the per-task row counts of this batch as denominators; DDP passes the counts
    of the whole global batch so that the ranks' gradients add up to the one-process gradient.
    `scale` (T,) divides each regression residual: with the training labels' std (the model's
    output_scale) the MSE is that of standardised labels, so a task in the thousands does not swamp the
    others. A task with no labelled row in the batch contributes exactly 0 (and a zero gradient), never NaN.
    """
    # Labels outside a task's space may be anything (NaN included); zero them before the loss and
    # select rather than multiply by the mask, since NaN * 0 is NaN (and so would be its gradient).
    mask = mask.bool()
    labels = labels.masked_fill(~mask, 0.0)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (B, T)
    residual = logits - labels if scale is None else (logits - labels) / scale  # (B, T)
    squared = residual.square()  # (B, T)
    per_row = torch.where(mask, torch.where(is_binary, bce, squared), 0.0)  # (B, T)
    denominators = mask.sum(0) if counts is None else counts
    return per_row.sum(0) / denominators.clamp_min(1)  # (T,)


def set_output_scale(model: MultiTaskModel, exp: Experiment, encoder: Encoder) -> None:
    """Regression tasks with `standardize` (the default) predict σ·out + μ, σ and μ the training labels' std
    and mean: the network learns standardised labels and every output stays in the label's units."""
    scale, shift = torch.ones(len(exp.tasks)), torch.zeros(len(exp.tasks))
    for k, task in enumerate(exp.tasks):
        if task.kind != "regression" or not task.standardize:
            continue
        stats = encoder.label_stats.get(task.name)
        if stats is None:
            raise ValueError(
                f"The encoder has no statistics of the labels of regression task `{task.name}` (a [data] prepared "
                "folder written by an older plerec): run `plerec prepare` again, or set standardize = false"
            )
        scale[k], shift[k] = (stats["std"] if stats["std"] > 0 else 1.0), stats["mean"]
    with torch.no_grad():
        model.output_scale.copy_(scale)
        model.output_shift.copy_(shift)


def make_optimizers(
    model: MultiTaskModel, exp: Experiment, balancing_params: Sequence[torch.Tensor] = ()
) -> list[Adam | RowSparseAdam]:
    """Adam for the dense parameters; with [train] sparse_embeddings (the default), RowSparseAdam updates only
    the embedding rows a batch touches (a dense Adam step over every row dominates at large vocabularies),
    without weight decay, which applies to the dense parameters only. That rule holds on every device: where
    the tables' gradients are dense (NCCL under DDP), their touched rows are the non-zero ones. With
    sparse_embeddings = false, one Adam (and its weight decay) updates everything. A balancing method's own
    parameters (uncertainty's log-variances) get an Adam of their own, at train.lr without weight decay."""
    tables = [table.weight for table in model.input.embedding_tables()]
    own = [Adam(balancing_params, lr=exp.train.lr)] if balancing_params else []
    if not exp.train.sparse_embeddings:
        return [Adam(model.parameters(), lr=exp.train.lr, weight_decay=exp.train.weight_decay), *own]
    dense = [p for p in model.parameters() if all(p is not t for t in tables)]
    return [
        Adam(dense, lr=exp.train.lr, weight_decay=exp.train.weight_decay),
        RowSparseAdam(tables, lr=exp.train.lr),
        *own,
    ]


@torch.inference_mode()
def predict(model: MultiTaskModel, table: EncodedTable, batch_size: int = 4096) -> torch.Tensor:
    """Logits (N, T) for a whole split, in order.

    Every batch's logits are copied into one tensor allocated first. Kept as a list of small tensors
    until the end, they would sit between the batches' larger temporaries and keep the C heap from
    reusing or returning that memory (measured on 200,000 rows: the process grew by 142 MiB at batch 4096
    that way against 56 this way, one batch's temporaries; by 76 MiB against 0 at batch 1024).
    """
    model.eval()
    device = next(model.parameters()).device
    logits = torch.empty(len(table), table.labels.shape[1])
    for start in range(0, len(table), batch_size):
        batch = table.batch(slice(start, start + batch_size)).to(device)
        logits[start : start + len(batch)] = model(*batch.inputs)
    return logits


def evaluate(model: MultiTaskModel, table: EncodedTable, exp: Experiment) -> dict[str, dict[str, float]]:
    """Per-task metrics over each task's own sample space (one process, one table in memory); with [evaluate]
    group, GAUC over the group codes the table carries."""
    if exp.evaluate.group and table.groups is None:
        raise ValueError(
            f"Expected the table to carry the group codes of the [evaluate] group column {exp.evaluate.group!r} "
            "(GAUC), but it has none: encode it with an encoder whose `group` is that column"
        )
    metric = TaskMetricAccumulator(exp.task_kinds, exp.evaluate.calibration_bins)
    groups = table.groups if exp.evaluate.group else None
    metric.update(predict(model, table, exp.train.eval_batch_size), table.labels, table.label_mask, groups)
    return metric.compute()


@torch.inference_mode()
def evaluate_split(
    model: MultiTaskModel, data: PreparedData, split: str, exp: Experiment, ctx: DistContext = SINGLE_PROCESS
) -> tuple[dict[str, dict[str, float]], int]:
    """Per-task metrics of a split, and how many rows were scored. Under DDP each rank scores its own
    disjoint rows and the predictions are gathered, so the metrics equal the one-process metrics.

    Every evaluation, the per-epoch validation included, computes GAUC (with [evaluate] group) and the
    calibration: both are a sort or a pass over the scored rows (0.7 s and 0.1 s per task at 1M rows),
    small against scoring them, and the validation history then shows them epoch by epoch."""
    batch_size = exp.train.eval_batch_size
    grouped = bool(exp.evaluate.group)  # the tables carry group codes (EncodedTable.groups) for GAUC
    if grouped and data.encoder.group != exp.evaluate.group:
        raise ValueError(
            f"Expected the data to be encoded with the [evaluate] group column {exp.evaluate.group!r} (GAUC), but "
            f"its encoder carries {data.encoder.group!r}: set `encoder.group` to it before prepare_data"
        )
    if split in data.splits:
        rows = local_rows(data.splits[split], ctx)
        local = (predict(model, rows, batch_size), rows.labels, rows.label_mask, *([rows.groups] if grouped else []))
    else:
        chunks = [
            (predict(model, chunk, batch_size), chunk.labels, chunk.label_mask, *([chunk.groups] if grouped else []))
            for chunk in local_eval_chunks(data.streams[split], data.encoder, ctx)
        ]
        num_tasks = len(exp.tasks)
        empty = (
            torch.empty(0, num_tasks),
            torch.empty(0, num_tasks, dtype=data.encoder.label_dtype),  # as the other ranks' labels
            torch.empty(0, num_tasks, dtype=torch.bool),
            *([torch.empty(0, dtype=torch.int64)] if grouped else []),
        )
        local = tuple(torch.cat(parts) for parts in zip(*chunks, strict=True)) if chunks else empty
    sizes = [local[0].shape[0]]
    if ctx.enabled:
        counts = torch.zeros(ctx.world_size, dtype=torch.long)
        counts[ctx.rank] = sizes[0]
        sizes = all_reduce_sum(counts, ctx).tolist()
    gathered = [gather_rows(t, sizes, ctx) for t in local]
    metric = TaskMetricAccumulator(exp.task_kinds, exp.evaluate.calibration_bins)
    metric.update(*gathered)
    metrics = metric.compute()
    if hasattr(model.body, "step_logits") and split in data.splits and not ctx.enabled:
        _add_step_metrics(metrics, model, data.splits[split], exp)
    return metrics, int(sum(sizes))


def _add_step_metrics(metrics: dict[str, dict[str, float]], model: MultiTaskModel, table: EncodedTable, exp) -> None:
    """A funnel with conditional heads (esmm): each later step's own head (the CVR given the click) scored on
    the rows where the step before it is 1, as `cvr_auc`, `cvr_logloss` and `cvr_n` of that step's task.
    In-memory splits in one process only (a streamed or DDP evaluation leaves them out, as the README says)."""
    from plerec.models.funnel import cvr_metrics

    for t in range(1, len(exp.tasks)):
        with torch.inference_mode():
            step = cvr_metrics(model, table, click_task=t - 1, batch_size=exp.train.eval_batch_size)
        metrics.setdefault(exp.tasks[t].name, {}).update({f"cvr_{key}": value for key, value in step.items()})


def monitor_keys(exp: Experiment) -> dict[str, str]:
    """The validation metric that selects the best epoch for each monitored task: [train] monitor_metric,
    where `auto` is AUC for a binary task and MSE for a regression task, and `loss` each task's own loss."""
    names = [t.name for t in exp.tasks] if exp.train.monitor == "mean" else [exp.train.monitor]
    metric = exp.train.monitor_metric
    keys = {}
    for name in names:
        kind = exp.task_kinds[name]
        if metric == "auto":
            keys[name] = "auc" if kind == "binary" else "mse"
        elif metric == "loss":
            keys[name] = "logloss" if kind == "binary" else "mse"
        elif metric not in METRICS_BY_KIND[kind]:
            raise ValueError(f"[train] monitor_metric {metric!r} does not apply to {kind} task `{name}`")
        else:
            keys[name] = metric
    return keys


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo); empty where that cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of bfloat16 matrix hardware: where "auto" turns bf16 on


def use_bf16(setting: bool | str, device: torch.device, flags: frozenset[str] | None = None) -> tuple[bool, str | None]:
    """Whether training runs under bfloat16 autocast, and for "auto" why (for the log; None otherwise):
    [train] bf16 as given, or for "auto" on where it was measured faster at equal AUC (benchmarks/PROFILE.md,
    eighth and ninth rounds): a CPU with AMX (`amx_bf16`: PLE training 1.5× the fp32 rate, test AUC within
    0.0003) or with AVX-512 BF16 (`avx512_bf16`, AMD EPYCs without AMX: Zen 5 2.1–2.6×, Zen 4 1.5–1.8×, test
    AUC means within 0.0003 over three seeds). Elsewhere "auto" stays fp32: AVX2 has no
    bfloat16 arithmetic (emulated, slower), and on GPUs it is not measured (set bf16 = true there)."""
    if setting != "auto":
        return bool(setting), None
    if device.type != "cpu":
        return False, f"off (not measured on {device.type}: set bf16 = true to ask for it)"
    present = [f for f in BF16_FLAGS if f in (cpu_flags() if flags is None else flags)]
    if present:
        return True, f"on (the CPU has {present[0]})"
    return False, f"off (fp32: no {' or '.join(BF16_FLAGS)} here)"


def monitor_name(exp: Experiment) -> str:
    """What the monitor's value is, in words: "valid ctr auc", or "valid mean skill of ctr auc, cvr auc"
    (monitor_value: each task's metric as a scale-free skill, higher is better)."""
    keys = monitor_keys(exp)
    if len(keys) == 1:
        [(name, key)] = keys.items()
        return f"valid {name} {key}"
    return "valid mean skill of " + ", ".join(f"{name} {key}" for name, key in keys.items())


def monitor_value(
    metrics: dict[str, dict[str, float]], exp: Experiment, label_stats: dict[str, dict] | None = None
) -> tuple[float, bool]:
    """The validation number that selects the best epoch, and whether higher is better.

    One monitored task: its metric as it is. Several (monitor = "mean"): tasks of different kinds and
    units cannot be averaged as they are (an MSE of 465 would outweigh every log-loss), so each task's
    metric becomes a scale-free skill, higher is better, and the monitor is their mean:
    AUC as it is; log-loss as 1 − logloss / H(p), H(p) the entropy of the training positive rate (the
    log-loss of predicting p on every row); MSE as 1 − MSE / σ², σ² the training labels' variance (R²
    against the training mean). The skills are fixed affine maps of the metrics, so each task's own
    ordering of epochs is unchanged. A missing or non-finite metric is an error, not a silent NaN.
    """
    keys = monitor_keys(exp)
    values = {}
    for name, key in keys.items():
        value = metrics.get(name, {}).get(key)
        if value is None or not math.isfinite(value):
            n = metrics.get(name, {}).get("n", 0)
            raise ValueError(
                f"Task `{name}` has {'no' if value is None else value} validation {key} (valid split, {n} rows in "
                f"its space): model selection needs it. Check that the valid split holds rows of the task "
                f"(and both classes of a binary task), or monitor another task with [train] monitor"
            )
        values[name] = value
    if len(values) == 1:
        [(name, value)] = values.items()
        return value, HIGHER_IS_BETTER[keys[name]]
    stats = label_stats or {}
    skills = []
    for name, value in values.items():
        key, task = keys[name], stats.get(name, {})
        if key == "auc":
            skills.append(value)
        elif key == "logloss":
            p = task.get("mean", 0.5)
            entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 1.0
            skills.append(1.0 - value / entropy)
        else:
            variance = task.get("std", 1.0) ** 2
            skills.append(1.0 - value / (variance if variance > 0 else 1.0))
    return sum(skills) / len(skills), True


class NonFiniteError(ValueError):
    """A loss or gradient became NaN or infinite; the run stopped before the optimiser step."""


# Keys that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CHANGES = ("train.epochs", "train.patience", *(k for k in NO_EFFECT if k.startswith("train.")))


@dataclass(slots=True)
class Progress:
    """Where a run stands, besides its weights: enough to continue it exactly."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimiser steps in all
    best_value: float | None = None
    best_epoch: int = 0
    stale: int = 0
    stopped: bool = False  # early stopping ended the run
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def fit(
    exp: Experiment,
    data: PreparedData | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    ctx: DistContext | None = None,
    resume: bool = False,
    observers: Sequence[RunObserver] = (),
) -> FitResult:
    """Train `exp.model_name` on the experiment's data; keep the best epoch by the validation monitor.

    With `out_dir`, writes best.pt (the best checkpoint, updated as training goes), last.pt (the whole
    training state, at every epoch end and every `train.checkpoint_every` steps), metrics.json,
    history.json and experiment.toml (every key resolved). `resume=True` continues from last.pt and ends
    with exactly the weights and metrics of an uninterrupted run; without it, a folder that already
    holds a last.pt is refused rather than overwritten. Under torchrun (WORLD_SIZE > 1) it trains with
    DistributedDataParallel; only rank 0 logs and writes. `observers` (plerec.observe.RunObserver) see the
    run on rank 0, besides those [train] asks for (tensorboard, mlflow).
    """
    if exp.model_name == "single" and len(exp.tasks) > 1:  # K independent networks: K one-task fits
        from plerec.single_task import fit_each_task

        return fit_each_task(exp, data, out_dir, log, ctx, resume, observers)
    monitor_keys(exp)  # a monitor that does not apply to its task would otherwise only fail after an epoch
    ctx = ctx or init_distributed(exp.train.device)
    check_batch_size(exp.train.batch_size, ctx)  # before any work
    check_balancing(exp, ctx)
    folder = Path(out_dir) if out_dir is not None else None
    # Locked before last.pt is read (another trainer may be writing it), released however fit ends.
    with run_lock(folder) if folder is not None and ctx.is_main else contextlib.nullcontext():
        return _fit(exp, data, folder, log, ctx, resume, observers)


def _fit(
    exp: Experiment,
    data: PreparedData | None,
    folder: Path | None,
    log: Callable[[str], None] | None,
    ctx: DistContext,
    resume: bool,
    observers: Sequence[RunObserver],
) -> FitResult:
    if log is not None and exp.train.log_format == "json":
        log = json_log(log)
    say = (log or (lambda _msg: None)) if ctx.is_main else (lambda _msg: None)
    saved = _saved_state(folder, exp, resume)  # read (and checked) on every rank, before any work
    if exp.train.threads:
        torch.set_num_threads(exp.train.threads)
    data = data or prepare_data(exp, encoder=Encoder.from_state_dict(saved["encoder"]) if saved else None)
    out = folder if ctx.is_main else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_experiment(exp, out / "experiment.toml")
        if data.streams:
            save_encoder(data.encoder, out)
    run = _Run.start(exp, data, ctx, folder, out, say)
    if saved:
        run.restore(saved)
        p = run.progress
        say(f"resumed from {folder / LAST} at epoch {p.epoch + 1}, batch {p.batch}, step {p.step}")
    if ctx.is_main:
        run.observers = [*observers, *configured_observers(exp, out, observers)]
    p = run.progress
    run.compile_plan.start(remaining=max((exp.train.epochs - p.epoch) * len(run.source) - p.batch, 0))
    try:
        for observer in run.observers:
            observer.start(run)
        while run.progress.epoch < exp.train.epochs and not run.progress.stopped:
            run.train_epoch()  # with a checkpoint every train.checkpoint_every steps
            run.validate()  # the epoch's record, the best epoch so far, early stopping
            run.checkpoint(run.source.state())
        result = run.finish()
        for observer in run.observers:
            observer.finish(run, result)
        return result
    finally:
        run.compile_plan.close()
        for observer in run.observers:
            observer.close()


@dataclass(slots=True)
class _Run:
    """One training run as `_fit` drives it: what it trains with (model, optimisers, the balancing method,
    the batch source) and where it stands (progress, the best weights, the epoch's summed task losses)."""

    exp: Experiment
    data: PreparedData
    ctx: DistContext
    folder: Path | None  # the output folder (every rank: error messages name it)
    out: Path | None  # the same on rank 0, which alone writes; None elsewhere
    say: Callable[[str], None]
    model: MultiTaskModel
    net: torch.nn.Module  # the model, or its DDP wrapper
    optimizers: list
    balancing: Balancing
    source: InMemoryBatches | ParquetBatches
    is_binary: torch.Tensor  # (T,) bool
    autocast: torch.autocast
    compile_plan: CompilePlan  # whether and when the body is compiled ([train] compile)
    progress: Progress = field(default_factory=Progress)
    best_state: dict | None = None  # the best epoch's weights, copied only once later weights differ
    running: torch.Tensor | None = None  # (T,) this rank's task losses summed over the epoch's steps
    started: float = 0.0
    epoch_started: float = 0.0  # when this process began the epoch in progress
    observers: list[RunObserver] = field(default_factory=list)  # rank 0 only (plerec.observe)

    @classmethod
    def start(cls, exp, data, ctx, folder, out, say) -> _Run:
        torch.manual_seed(exp.seed)
        model = build_model(exp.model_name, exp.model, num_tasks=len(exp.tasks), **data.encoder.model_inputs())
        set_output_scale(model, exp, data.encoder)
        # NCCL has no sparse all-reduce: on GPUs under DDP the embedding gradients stay dense.
        model.input.set_sparse(exp.train.sparse_embeddings and not (ctx.enabled and ctx.device.type == "cuda"))
        model.to(ctx.device)
        balancing = make_balancing(exp, model, ctx, schedule=loss_weights)
        if data.streams:
            source = ParquetBatches(data.streams["train"], data.encoder, exp.train.batch_size, exp.seed, ctx)
        else:
            source = InMemoryBatches(data.splits["train"], exp.train.batch_size, exp.seed, ctx)
        bf16, why = use_bf16(exp.train.bf16, ctx.device)
        if why:
            say(f"bf16 = auto: bfloat16 autocast {why}")
        run = cls(
            exp=exp,
            data=data,
            ctx=ctx,
            folder=folder,
            out=out,
            say=say,
            model=model,
            net=DistributedDataParallel(model) if ctx.enabled else model,
            optimizers=make_optimizers(model, exp, balancing.parameters()),
            balancing=balancing,
            source=source,
            is_binary=torch.tensor([t.kind == "binary" for t in exp.tasks], device=ctx.device),
            autocast=torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=bf16),
            compile_plan=CompilePlan(
                setting=exp.train.compile,
                model=model,
                rows=check_batch_size(exp.train.batch_size, ctx),
                bf16=bf16,
                folder=cache_folder(exp.train.compile_cache),
                say=say,
                distributed=ctx.enabled,
            ),
        )
        run.running = torch.zeros(len(exp.tasks), device=ctx.device)
        run.started = time.perf_counter()
        return run

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.exp.tasks]

    def restore(self, saved: dict) -> None:
        """Continue from a training state (last.pt): weights, optimisers, balancing, RNG, batch order, progress."""
        self.progress, self.best_state, self.running = _restore(
            saved, self.model, self.optimizers, self.source, self.ctx, self.balancing
        )
        history = self.progress.history
        self.started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)

    def train_epoch(self) -> None:
        """The rest of the epoch in progress: one `step` per batch, a checkpoint every checkpoint_every steps."""
        exp, progress = self.exp, self.progress
        if self.best_state is None and progress.best_epoch:  # the weights about to change are the best so far
            self.best_state = copy.deepcopy(self.model.state_dict())
        self.net.train()
        steps = len(self.source)
        source_state = self.source.state()  # the epoch's shuffle: a checkpoint taken mid-epoch replays it
        if progress.batch == 0:
            self.running.zero_()
        bar = tqdm(
            total=steps,
            initial=progress.batch,
            desc=f"{exp.model_name} epoch {progress.epoch + 1}/{exp.train.epochs}",
            disable=not (exp.train.progress and self.ctx.is_main and _on_terminal()),
            leave=False,
            dynamic_ncols=True,
        )
        every = exp.train.checkpoint_every
        epoch_start = self.epoch_started = time.perf_counter()
        plan = self.compile_plan
        for i, batch in enumerate(self.source.epoch(skip=progress.batch), start=progress.batch):
            plan.before_step()
            try:
                task_losses = self.step(batch, i, steps)
            except Exception as error:  # only the first compiled step under "auto" is retried (fall_back)
                if not plan.fall_back(error):
                    raise
                task_losses = self.step(batch, i, steps)
            plan.after_step(len(batch.labels))
            self.running += task_losses
            progress.step += 1
            progress.batch = i + 1
            for observer in self.observers:
                observer.step(self, task_losses)
            if bar.disable is False and (i % 50 == 0 or i == steps - 1):
                shown = (self.running / (i + 1)).tolist()
                bar.set_postfix({n: f"{v:.4f}" for n, v in zip(self.names, shown, strict=True)})
            bar.update(1)
            if every and progress.step % every == 0 and progress.batch < steps:
                progress.train_seconds += time.perf_counter() - epoch_start
                self.checkpoint(source_state)
                epoch_start = time.perf_counter()  # writing the checkpoint is not training time
        bar.close()
        progress.train_seconds += time.perf_counter() - epoch_start

    def step(self, batch, i: int, steps: int) -> torch.Tensor:
        """One optimiser step on one batch; returns its task losses (T,), detached. The balancing method is
        the seam: it turns the task losses into the loss and its gradients."""
        ctx, model, progress = self.ctx, self.model, self.progress
        batch = batch.to(ctx.device, non_blocking=True)
        with self.autocast:
            logits = self.net(*batch.inputs).float()  # (B, T)
        counts = None
        if ctx.enabled:  # each task's mean is over its rows in the whole global batch
            counts = all_reduce_sum(batch.label_mask.sum(0).float(), ctx)
        task_losses = masked_task_losses(
            logits, batch.labels, batch.label_mask, self.is_binary, counts, model.output_scale
        )  # (T,)
        loss = self.balancing.loss(task_losses, counts, progress.epoch, progress.step)
        aux = model.auxiliary_loss(logits)  # the model's own penalty (aitm's calibrator), or None: not balanced
        if aux is not None:
            loss = loss + aux / ctx.world_size  # a mean over this rank's rows: its share of the ranks' mean
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.balancing.backward(loss, ctx.world_size)  # × world size: DDP averages gradients over ranks
        if self.exp.train.check_finite and not _all_finite(task_losses, model):
            raise _non_finite_error(
                model, task_losses, self.names, progress.epoch, i, steps, progress.step, self.folder
            )
        for optimizer in self.optimizers:
            optimizer.step()
        self.balancing.after_step()
        return task_losses.detach()

    def validate(self) -> None:
        """End the epoch: score the validation split, record the epoch, keep the best, stop early if stale."""
        exp, progress, names = self.exp, self.progress, self.names
        valid_metrics, valid_rows = evaluate_split(self.model, self.data, "valid", exp, self.ctx)
        value, higher = monitor_value(valid_metrics, exp, self.data.encoder.label_stats)
        best = progress.best_value
        improved = best is None or (value > best if higher else value < best)
        # each rank's task losses are its share of the global batch's: their sum is the global loss
        train_loss = all_reduce_sum(self.running.clone(), self.ctx) / max(len(self.source), 1)  # (T,)
        self.balancing.end_epoch(train_loss)
        record = {
            "epoch": progress.epoch + 1,
            "train_loss": dict(zip(names, train_loss.tolist(), strict=True)),
            "valid": valid_metrics,
            "valid_rows": valid_rows,
            "monitor": value,
            "seconds": time.perf_counter() - self.started,
            "epoch_seconds": time.perf_counter() - self.epoch_started,  # this process's part of the epoch
        }
        if self.balancing.name != "fixed":  # the weights the next epoch starts with
            record["balancing"] = describe(self.balancing)
        progress.history.append(record)
        progress.epoch, progress.batch = progress.epoch + 1, 0
        if improved:
            progress.best_value, progress.best_epoch, progress.stale = value, progress.epoch, 0
            self.best_state = None  # the model as it is now: copied only if another epoch is to change it
            if self.out is not None:
                save_checkpoint(self.out / "best.pt", self.model, self.data.encoder, exp, progress.best_epoch)
        else:
            progress.stale += 1
        monitor, best = monitor_name(exp), (progress.best_epoch, progress.best_value)
        if exp.train.log_format == "json":
            self.say(epoch_json(record, exp.train.epochs, monitor, best))
        else:
            self.say(epoch_line(record, names, exp.train.epochs, monitor, best))
        self.write_history()  # after every epoch: a run that dies keeps its curves
        for observer in self.observers:
            observer.epoch(self, record)
        if not improved and exp.train.patience and progress.stale >= exp.train.patience:
            self.say(f"early stop: no better validation {monitor} for {progress.stale} epochs")
            progress.stopped = True

    def write_history(self) -> None:
        """history.json: every epoch's record so far and the best epoch (rank 0)."""
        if self.out is not None:
            progress = self.progress
            write_json(self.out / "history.json", {"best_epoch": progress.best_epoch, "epochs": progress.history})

    def checkpoint(self, source_state: dict) -> None:
        """Write last.pt. Every rank holds its share of the epoch's losses: rank 0 saves their sum, and
        resumes with it."""
        total = all_reduce_sum(self.running.clone(), self.ctx)
        if self.out is not None:
            _save_state(self.out / LAST, self, total, source_state)

    def finish(self) -> FitResult:
        """Back to the best epoch's weights; score the held-out splits; write metrics.json and history.json."""
        exp, progress, data = self.exp, self.progress, self.data
        if self.best_state is not None:  # a later epoch was worse: back to the best one
            self.model.load_state_dict(self.best_state)
        # The held-out splits only: scoring the whole training split again would cost about an epoch.
        metrics = {
            split: evaluate_split(self.model, data, split, exp, self.ctx)[0]
            for split in data.split_names
            if split != "train"
        }
        result = FitResult(
            self.model,
            data.encoder,
            metrics,
            progress.history,
            progress.best_epoch,
            progress.train_seconds,
            compiled=self.compile_plan.summary(),
        )
        if self.out is not None:
            write_json(self.out / "metrics.json", metrics_record(exp, metrics, progress.train_seconds))
        self.write_history()  # again: a resumed run whose epochs were all done wrote none in this process
        barrier(self.ctx)
        return result


LAST = "last.pt"


def _saved_state(folder: Path | None, exp: Experiment, resume: bool) -> dict | None:
    """The training state to resume from, after checking that it belongs to this experiment."""
    path = folder / LAST if folder is not None else None
    if not resume:
        if path is not None and path.exists():
            raise ValueError(
                f"{folder} already holds a training checkpoint ({LAST}): pass --resume to continue that run, "
                "or choose another output folder"
            )
        return None
    if path is None:
        raise ValueError("Expected an output folder to resume from, but got none")
    if not path.exists():
        return None  # nothing to resume: a fresh start (a preemptible job can always pass --resume)
    saved = read_checkpoint_file(path)
    if saved.get("format") != STATE_FORMAT:
        raise ValueError(f"Expected {path} to be a plerec training state ({STATE_FORMAT}), but it is not")
    changed = [
        d
        for d in differences(saved["experiment"], experiment_to_dict(exp), defaults=key_defaults())
        if not d.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        raise ValueError(
            f"Cannot resume {path}: the experiment differs from the one it was trained with "
            f"(checkpoint -> now): {'; '.join(changed)}"
        )
    if "data" not in saved:
        raise ValueError(
            f"Cannot resume {path}: it was written by an older plerec that kept no fingerprint of the data, so a "
            "change of the data since could not be noticed. Train again in a new output folder"
        )
    moved = data_changes(saved["data"], data_fingerprint(exp.data))
    if moved:
        raise ValueError(
            f"Cannot resume {path}: "
            + "; ".join(f"the data file {file} changed since the checkpoint ({what})" for file, what in moved)
            + ". Resuming would continue on other rows than the run began with: restore the data, or train again "
            "in a new output folder"
        )
    return saved


def _save_state(path: Path, run: _Run, running: torch.Tensor, source_state: dict) -> None:
    """The whole training state: enough for `_restore` to continue exactly (`running`: the ranks' summed losses)."""
    state = {
        "format": STATE_FORMAT,
        "experiment": experiment_to_dict(run.exp),
        "data": data_fingerprint(run.exp.data),  # hashed once per process while the files stay unchanged
        "encoder": run.data.encoder.state_dict(),
        "model": run.model.state_dict(),
        "optimizers": [o.state_dict() for o in run.optimizers],
        "best_state": run.best_state,
        "progress": asdict(run.progress),
        "running": running.detach().cpu(),
        "source": source_state,
        "rng": torch.get_rng_state(),
    }
    if run.balancing.name != "fixed":  # learned weights, initial losses, the order generator: see balancing.py
        state["balancing"] = run.balancing.state_dict()
    write_checkpoint_file(path, state)


def _restore(
    saved: dict, model, optimizers, source, ctx: DistContext, balancing: Balancing
) -> tuple[Progress, dict | None, torch.Tensor]:
    """Load a training state into the model, optimisers, balancing method, RNG and batch source; return the
    loop's state."""
    model.load_state_dict(saved["model"])
    if balancing.name != "fixed":
        if not isinstance(saved.get("balancing"), dict):
            raise ValueError(
                f"Cannot resume: the training state holds no state of [train] balancing = {balancing.name!r} "
                "(its key `balancing` is missing)"
            )
        balancing.load_state_dict(saved["balancing"])
    if len(saved["optimizers"]) != len(optimizers):
        raise ValueError(
            f"The checkpoint holds {len(saved['optimizers'])} optimiser states, but this run has {len(optimizers)} "
            "(train.sparse_embeddings or the device differ from the interrupted run)"
        )
    for optimizer, state in zip(optimizers, saved["optimizers"], strict=True):
        optimizer.load_state_dict(state)
    torch.set_rng_state(saved["rng"])
    source.load_state(saved["source"])
    progress = Progress(**saved["progress"])
    running = saved["running"].to(ctx.device)  # the sum over ranks: kept by rank 0 only, so it adds up once
    return progress, saved["best_state"], running if ctx.is_main else torch.zeros_like(running)


def _all_finite(task_losses: torch.Tensor, model: MultiTaskModel) -> bool:
    """One check (one host sync) over the losses and every gradient, dense or sparse."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads = [g._values() if g.is_sparse else g for g in grads]  # uncoalesced values: no sort needed
    norms = torch._foreach_norm(grads) if grads else []
    return bool(torch.isfinite(torch.stack([task_losses.sum(), *norms])).all())


def _non_finite_error(model, task_losses, names, epoch, batch, steps, step, folder) -> NonFiniteError:
    where = f"epoch {epoch + 1}, batch {batch + 1} of {steps} (step {step + 1})"
    bad = [f"`{n}` = {v}" for n, v in zip(names, task_losses.tolist(), strict=True) if not math.isfinite(v)]
    if bad:
        what = f"the loss of task {', '.join(bad)}"
    else:
        params = [n for n, p in model.named_parameters() if p.grad is not None and not _grad_finite(p.grad)]
        losses = ", ".join(f"{n} {v:.4g}" for n, v in zip(names, task_losses.tolist(), strict=True))
        what = f"the gradient of {', '.join(f'`{p}`' for p in params[:5])} (task losses: {losses})"
    kept = (
        f"the last good checkpoint is {folder / LAST}; fix the cause, then resume with --resume"
        if folder is not None and (folder / LAST).exists()
        else "no checkpoint had been written yet"
    )
    return NonFiniteError(
        f"Training stopped at {where}: {what} is not finite, before the optimiser step. Nothing after that "
        f"step was applied; {kept}. Usual causes: a learning rate too high (train.lr), extreme label or "
        "feature values"
    )


def _grad_finite(grad: torch.Tensor) -> bool:
    values = grad.coalesce().values() if grad.is_sparse else grad
    return bool(torch.isfinite(values).all())


def metrics_record(exp: Experiment, metrics: dict, train_seconds: float) -> dict:
    """The metrics.json shape other tools read: `split` and `tasks` are the test split (the validation split
    where there is none); `splits` holds every held-out split that was evaluated; `gauc_group` the
    [evaluate] group column, where the tasks' GAUC was computed over its groups."""
    split = "test" if "test" in metrics else "valid"
    return {
        "model": exp.model_name,
        "seed": exp.seed,
        "split": split,
        "tasks": metrics[split],
        "splits": {s: metrics[s] for s in ("valid", "test") if s in metrics},
        "train_seconds": round(train_seconds, 3),
        **({"gauc_group": exp.evaluate.group} if exp.evaluate.group else {}),
    }


def save_checkpoint(path: Path, model: MultiTaskModel, encoder: Encoder, exp: Experiment, epoch: int) -> None:
    """The model with what scoring needs (encoder, experiment), written atomically with a checksum."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": exp.model_name,
        "experiment": experiment_to_dict(exp),
        "encoder": encoder.state_dict(),
        "state_dict": model.state_dict(),
        "epoch": epoch,
    }
    write_checkpoint_file(path, payload)


def load_checkpoint(path: str | Path) -> tuple[MultiTaskModel, Encoder, Experiment]:
    """The model (in eval mode), its encoder and the experiment it was trained with.

    The file's checksum is verified and it is read with weights_only=True: no pickled code runs.
    A training state (last.pt) is accepted too: its current weights are loaded.
    """
    # Every key, the model's size (against the limits and the file's size) and every weight's shape and dtype
    # are checked before the model is built: a crafted file cannot make it allocate or loop without bound.
    checkpoint = read_checkpoint(path)
    exp, encoder = checkpoint.experiment, checkpoint.encoder
    model = build_model(exp.model_name, exp.model, num_tasks=len(exp.tasks), **encoder.model_inputs())
    weights = dict(checkpoint.weights)
    for key in OPTIONAL_WEIGHTS:  # a checkpoint from before standardised regression labels
        weights.setdefault(key, model.state_dict()[key])
    model.load_state_dict(weights)
    model.eval()
    return model, encoder, exp


def write_json(path: Path, value) -> None:
    """Standard JSON, NaN and ±inf as null, written atomically (plerec.jsonio)."""
    jsonio.write_json(path, value)


def _on_terminal() -> bool:
    """A progress bar redraws its line with carriage returns: in a log file or a pipe every redraw would be
    kept, so the bar is shown only on a terminal (the per-epoch lines are written either way)."""
    return sys.stderr is not None and sys.stderr.isatty()


__all__ = [
    "FitResult",
    "NonFiniteError",
    "PreparedData",
    "evaluate",
    "evaluate_split",
    "fit",
    "make_optimizers",
    "load_checkpoint",
    "loss_weights",
    "masked_task_losses",
    "monitor_value",
    "predict",
    "prepare_data",
    "save_checkpoint",
]
