"""A run watched from outside: TensorBoard event files and an MLflow run ([train] tensorboard, mlflow).

Both are observers (plerec.observe), so they run on rank 0 alone: under torchrun one set of event files
and one MLflow run, whatever the world size. Both log the same numbers under the same names, on one step
axis, the optimiser step (`run.progress.step`), which a resumed run continues:

    per step    train/loss/TASK        the step's task loss (Eq. 9)
                train/weight/TASK      its loss weight: the balancing method's learned weight (uncertainty,
                                       gradnorm, dwa), else Eq. 10's ω_k(t) that the step's loss used
    per epoch   train/epoch_loss/TASK  the epoch's mean training loss (the history's train_loss)
    (at the     valid/TASK/METRIC      every validation metric of the task (auc, logloss, mse, ...)
    epoch's     train/samples_per_second   training rows of the epoch / its seconds (validation included)
    last step)  train/epoch            the epoch number, to read the step axis in epochs
                gate/GATE/EXPERT       gated models: the gate's mean weight on the expert ...
                gate/GATE/entropy      ... and the mean entropy of its weights (nats; log E is uniform)

Under DDP the per-step loss is rank 0's part of the global batch, scaled by the world size: the global
loss where every rank holds as many of the task's labelled rows (the epoch loss is exact, all-reduced).
Reading the losses costs one host sync per step on a GPU.

Gate statistics are computed on the first GATE_ROWS rows of the validation split (in memory, or read
once from its first row groups when streamed): one forward pass over at most that many rows per epoch.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch

from plerec import jsonio
from plerec.config import experiment_to_dict
from plerec.jsonio import write_json
from plerec.observe import RunObserver

if TYPE_CHECKING:
    from plerec.config import Experiment
    from plerec.data.tables import EncodedTable
    from plerec.models import MultiTaskModel
    from plerec.train import FitResult, _Run

GATE_ROWS = 16384  # validation rows the per-epoch gate statistics read
RUN_FILE = "mlflow_run.json"  # in the run's folder: the MLflow run that a resumed training run continues
ARTIFACTS = ("metrics.json", "history.json", "experiment.toml", "best.pt", "report.html")  # those that exist


def step_values(run: _Run, task_losses: torch.Tensor, weights: list[float]) -> dict[str, float]:
    """train/loss/TASK and train/weight/TASK of the step just taken (`weights`: step_weights)."""
    scale = run.ctx.world_size  # rank 0's share of the global batch's mean, as a mean over its rows
    values = {f"train/loss/{name}": v * scale for name, v in zip(run.names, task_losses.tolist(), strict=True)}
    values.update((f"train/weight/{name}", w) for name, w in zip(run.names, weights, strict=True))
    return values


def step_weights(run: _Run) -> list[float]:
    """Each task's loss weight at the step just taken: the method's learned weights where it has them, else
    Eq. 10's schedule at the epoch or step (train.weight_schedule) that the step's loss was weighted by."""
    learned = run.balancing.weights().get("weights")
    if learned:
        return [float(learned[name]) for name in run.names]
    balancing, progress = run.balancing, run.progress
    t = progress.epoch if balancing.per_epoch else progress.step - 1  # the step counter before the step
    return balancing.schedule(run.exp, t).tolist()


def epoch_values(run: _Run, record: dict, rows: float) -> dict[str, float]:
    """The per-epoch values of `record` (one epoch of history.json); `rows`: training rows this process
    trained on in the epoch."""
    values: dict[str, float] = {"train/epoch": record["epoch"]}
    for name, loss in record["train_loss"].items():
        values[f"train/epoch_loss/{name}"] = loss
    for name, metrics in record["valid"].items():
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values[f"valid/{name}/{key}"] = float(value)
    seconds = record["epoch_seconds"]
    if seconds > 0:
        values["train/samples_per_second"] = rows / seconds
    return values


def gate_statistics(
    model: MultiTaskModel, tables: list[EncodedTable], task_names: list[str], batch_size: int = 4096
) -> dict[str, float]:
    """gate/GATE/EXPERT (the gate's mean weight on the expert over the rows of `tables`) and gate/GATE/entropy
    (the mean over rows of the entropy of the gate's weights, in nats); empty for a model without gates.
    `task{k}` in gate and expert names becomes the task's name (as in plerec.compare.expert_utilisation)."""
    from plerec.compare import gate_sums, task_renamer

    n, sums = gate_sums(model, tables, batch_size)
    if n == 0:
        return {}
    rename = task_renamer(task_names)
    values = {}
    for gate, names in model.gate_experts().items():
        means = (sums[gate]["w"] / n).tolist()
        for expert, mean in zip(names, means, strict=True):
            values[f"gate/{rename(gate)}/{rename(expert)}"] = mean
        values[f"gate/{rename(gate)}/entropy"] = float(sums[gate]["entropy"]) / n
    return values


class _Tracker(RunObserver):
    """What both observers share: the numbers of every step and epoch, passed to `write(values, step)`.

    `every` > 1 writes the per-step values every that many steps: the mean task loss over those steps
    (summed on the device: no host sync in between) and the weights at the last one."""

    def __init__(self, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"Expected `every` >= 1 (write the per-step values every so many steps), but got {every}")
        self.every = every
        self.loss_sum: torch.Tensor | None = None  # (T,) the task losses of the steps not written yet
        self.summed = 0
        self.gate_rows: list[EncodedTable] | None = None
        self.skipped = 0  # batches of the epoch in progress done before this process started (resume)
        self.steps = 0  # batches of the epoch in progress done by this process
        self.weights: list[float] | None = None  # the fixed weights, where they never change (every gamma 1)

    def write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def start(self, run: _Run) -> None:
        """A run begins: whatever an earlier run left is dropped (the single-task baseline passes one observer
        to each task's fit in turn)."""
        self.loss_sum, self.summed, self.gate_rows, self.steps = None, 0, None, 0
        self.skipped = run.progress.batch
        self.weights = None
        if run.balancing.name == "fixed" and all(task.gamma == 1 for task in run.exp.tasks):
            self.weights = step_weights(run)  # Eq. 10 without decay: the same at every step (a host copy less)

    def step(self, run: _Run, task_losses: torch.Tensor) -> None:
        self.steps += 1
        self.loss_sum = task_losses if self.loss_sum is None else self.loss_sum + task_losses  # (T,)
        self.summed += 1
        if run.progress.step % self.every == 0:
            self._write_steps(run)

    def _write_steps(self, run: _Run) -> None:
        losses = self.loss_sum if self.summed == 1 else self.loss_sum / self.summed  # (T,)
        self.write(step_values(run, losses, self.weights or step_weights(run)), run.progress.step)
        self.loss_sum, self.summed = None, 0

    def epoch(self, run: _Run, record: dict) -> None:
        if self.summed:  # the epoch's last steps, fewer than `every`
            self._write_steps(run)
        done = self.steps / max(self.skipped + self.steps, 1)  # the part of the epoch this process trained
        values = epoch_values(run, record, _train_rows(run) * done)
        if run.model.gate_experts():
            rows = self._gate_rows(run)
            values.update(gate_statistics(run.model, rows, run.names, run.exp.train.eval_batch_size))
        self.write(values, run.progress.step)
        self.skipped = self.steps = 0

    def _gate_rows(self, run: _Run) -> list[EncodedTable]:
        """The first GATE_ROWS validation rows (views of the split, or chunks read once from its files)."""
        if self.gate_rows is None:
            self.gate_rows = _first_rows(run, "valid", GATE_ROWS)
        return self.gate_rows


def _train_rows(run: _Run) -> int:
    """The rows of one epoch over all ranks: every training row once."""
    if "train" in run.data.splits:
        return len(run.data.splits["train"])
    return sum(group.num_rows for group in run.source.groups)  # ParquetBatches


def _first_rows(run: _Run, split: str, count: int) -> list[EncodedTable]:
    """The first `count` rows of a split as tables: a view of an in-memory split, else the first chunks read
    from its files (each row group in file order, the last one cut)."""
    data = run.data
    if split in data.splits:
        table = data.splits[split]
        return [table.batch_table(slice(0, min(count, len(table))))]
    if split not in data.streams:
        return []
    from plerec.data.stream import local_eval_chunks

    chunks = []
    for chunk in local_eval_chunks(data.streams[split], data.encoder):  # one process: every row group
        chunks.append(chunk.batch_table(slice(0, count)))
        count -= len(chunks[-1])
        if count == 0:
            break
    return chunks


class TensorBoardObserver(_Tracker):
    """TensorBoard event files in `log_dir` (torch.utils.tensorboard; the `tensorboard` extra).

    A resumed run continues the step axis and purges what an interrupted process wrote after the
    checkpoint it resumes from, so every step appears once. Give each run its own folder: TensorBoard
    shows every folder under `tensorboard --logdir` as one run."""

    def __init__(self, log_dir: str | Path, every: int = 1, flush_secs: int = 30):
        super().__init__(every)
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self.writer = None

    @classmethod
    def for_run(cls, exp: Experiment, out: Path | None, every: int = 1) -> TensorBoardObserver:
        """The event files [train] asks for: train.tensorboard_dir, else the run's folder/tensorboard."""
        _require("tensorboard", "[train] tensorboard")
        if exp.train.tensorboard_dir:
            return cls(exp.train.tensorboard_dir, every)
        if out is None:
            raise ValueError(
                "Expected a folder for the TensorBoard event files of [train] tensorboard = true, but the run "
                "has no output folder: set train.tensorboard_dir, or train with an output folder (--out)"
            )
        return cls(out / "tensorboard", every)

    def start(self, run: _Run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().start(run)
        resumed = run.progress.step
        self.writer = SummaryWriter(
            str(self.log_dir),
            purge_step=resumed + 1 if resumed else None,  # hides the interrupted process's later steps
            max_queue=1000,  # events are written by a background thread: the step only enqueues
            flush_secs=self.flush_secs,
        )

    def write(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        # One event for all of a step's values, what add_scalar writes one event per value for: TensorBoard's
        # writer checksums every byte in Python (measured: ~50 us per event of 2 values).
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self.writer.file_writer.add_summary(summary, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes
            self.writer = None


class MLflowObserver(_Tracker):
    """An MLflow run (the `mlflow` extra: mlflow-skinny, or mlflow): the experiment as parameters, the same
    metrics as TensorBoard on the same step axis, the final held-out metrics as final/SPLIT/TASK/METRIC, and
    the run's files (metrics.json, history.json, experiment.toml, best.pt, report.html where they exist) as
    artifacts. A run that never reached `finish` is marked FAILED; resumed (fit with resume=True in the same
    folder and store), it is continued: MLflow keeps every value, so the steps between the checkpoint and the
    interruption appear twice in its metric history (TensorBoard's purge has no MLflow counterpart).

    `uri` is a tracking URI (a file store folder, sqlite:///..., http://...); `run_name` defaults to
    "MODEL-seedSEED", and `tags` are added to plerec.model and plerec.seed. Metrics are sent in batches:
    every 1000 values and at every epoch end (each call to a store costs milliseconds)."""

    def __init__(
        self,
        uri: str,
        experiment: str = "plerec",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        every: int = 1,
    ):
        super().__init__(every)
        self.uri, self.experiment = uri, experiment
        self.run_name, self.tags = run_name, dict(tags or {})
        self.client = None
        self.run_id: str | None = None
        self.pending: list = []
        self.finished = False

    @classmethod
    def for_run(
        cls,
        exp: Experiment,
        out: Path | None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        every: int = 1,
    ) -> MLflowObserver:
        """The MLflow run [train] asks for: in train.mlflow_uri, else a file store in the run's folder/mlruns;
        under train.mlflow_experiment ("plerec" when empty)."""
        _require("mlflow", "[train] mlflow")
        if exp.train.mlflow_uri:
            uri = exp.train.mlflow_uri
        elif out is None:
            raise ValueError(
                "Expected a tracking URI for [train] mlflow = true, but the run has no output folder for a local "
                "store: set train.mlflow_uri, or train with an output folder (--out)"
            )
        else:
            uri = (out / "mlruns").resolve().as_uri()
        return cls(uri, exp.train.mlflow_experiment or "plerec", run_name, tags, every)

    def start(self, run: _Run) -> None:
        super().start(run)
        self.pending, self.finished = [], False
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        folder = _file_store(self.uri)
        if folder is not None:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind it
            if not folder.exists():
                _forget_stores()

        exp = run.exp
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = self._resumed_run(run)
        if self.run_id is not None:  # its parameters are those it began with (MLflow's cannot change)
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"plerec.model": exp.model_name, "plerec.seed": str(exp.seed), **self.tags}
        name = self.run_name or f"{exp.model_name}-seed{exp.seed}"
        if exp.model_name == "single":  # one fit per task (plerec.single_task), each its own MLflow run
            tags["plerec.task"] = exp.tasks[0].name
            name = f"{name}-{exp.tasks[0].name}"
        self.run_id = self.client.create_run(self._experiment_id(), run_name=name, tags=tags).info.run_id
        if run.out is not None:
            write_json(run.out / RUN_FILE, {"uri": self.uri, "run_id": self.run_id})
        params = [Param(_metric_key(k), _clip(v, MAX_PARAM_VAL_LENGTH)) for k, v in flat_params(exp).items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def _resumed_run(self, run: _Run) -> str | None:
        """The MLflow run a resumed training run began, where its folder names one in this store."""
        saved = run.out / RUN_FILE if run.out is not None and run.progress.step else None
        if saved is None or not saved.is_file():
            return None
        try:
            record = json.loads(saved.read_text())
        except ValueError:
            return None
        if not isinstance(record, dict) or record.get("uri") != self.uri:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(str(record.get("run_id"))).info.run_id
        except MlflowException:  # deleted since
            return None

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except MlflowException:  # another run created it in the meantime (plerec compare in parallel)
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def write(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(_metric_key(key), value, now, step) for key, value in values.items())
        if len(self.pending) >= 1000:
            self.flush()

    def epoch(self, run: _Run, record: dict) -> None:
        super().epoch(run, record)
        self.flush()

    def flush(self) -> None:
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        while self.pending:
            batch, self.pending = self.pending[:MAX_METRICS_PER_BATCH], self.pending[MAX_METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, run: _Run, result: FitResult) -> None:
        final = {
            f"final/{split}/{task}/{key}": float(value)
            for split, tasks in result.metrics.items()
            for task, metrics in tasks.items()
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        self.write(final, run.progress.step)
        self.flush()
        if run.out is not None:
            for name in ARTIFACTS:
                if (run.out / name).is_file():
                    self.client.log_artifact(self.run_id, str(run.out / name))
        self.finished = True

    def close(self) -> None:
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, "FINISHED" if self.finished else "FAILED")
            self.run_id = None


def flat_params(exp: Experiment) -> dict[str, str]:
    """Every key of the resolved experiment as a dotted parameter: `train.lr`, `model.expert_dims`,
    `tasks.0.name`; lists of values as JSON (`[8, 4]`)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, inner in enumerate(value):
                walk(f"{prefix}.{i}", inner)
        else:
            flat[prefix] = value if isinstance(value, str) else jsonio.dumps(value, default=str)

    walk("", experiment_to_dict(exp))
    return flat


@functools.cache
def _metric_key(key: str) -> str:
    """MLflow allows letters, digits and `_-. /:` in metric and parameter names: a task or column named with
    any other character gets `_` for it."""
    return re.sub(r"[^\w\-. /:]", "_", key)


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _forget_stores() -> None:
    """MLflow keeps one store object per URI for the process: one built over a folder deleted since (a run
    folder removed and trained again in the same session) fails on its missing subfolders. Rebuilt on use."""
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    clear = getattr(TrackingStoreRegistry._get_store_with_resolved_uri, "cache_clear", None)
    if clear is not None:
        clear()


def _file_store(uri: str) -> Path | None:
    """The folder of a file store URI (a path, or file://); None for any other store."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":  # file:///a/b and file:/a/b
        return Path(url2pathname(parsed.path))
    return Path(uri) if len(parsed.scheme) <= 1 else None  # a path (C:\\... parses as scheme "c")


def _require(package: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        extra = "tensorboard" if package == "tensorboard" else "mlflow"
        raise ValueError(f"{what} = true needs the `{package}` package: pip install 'plerec[{extra}]'")


__all__ = [
    "GATE_ROWS",
    "MLflowObserver",
    "TensorBoardObserver",
    "epoch_values",
    "flat_params",
    "gate_statistics",
    "step_values",
    "step_weights",
]
