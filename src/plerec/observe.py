"""What a training run tells the world as it goes: the hooks `plerec.train.fit` calls on rank 0, and the
per-epoch lines on stderr (text for people, JSON for machines).

An observer sees the run through its hooks only; it never changes what is computed. `fit` calls, on the
main process alone and in this order: `start(run)` once the model and data are ready, `step(run, losses)`
after every optimiser step, `epoch(run, record)` after each validation, `finish(run, result)` once the
held-out splits are scored, and `close()` however the run ends (an error, Ctrl-C). `run` is the training
run (`plerec.train._Run`): observers read its `exp`, `model`, `data`, `out`, `progress` and `balancing`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from plerec import jsonio

if TYPE_CHECKING:
    import torch

    from plerec.train import FitResult, _Run


class RunObserver:
    """A no-op observer: subclasses override the hooks they need."""

    def start(self, run: _Run) -> None:
        """The model is built (and restored on resume); nothing has been trained in this process yet."""

    def step(self, run: _Run, task_losses: torch.Tensor) -> None:
        """After optimiser step `run.progress.step` (1-based): the batch's task losses (T,), detached."""

    def epoch(self, run: _Run, record: dict) -> None:
        """After the validation of epoch `record["epoch"]`: the record that history.json holds."""

    def finish(self, run: _Run, result: FitResult) -> None:
        """The best weights are back and metrics.json and history.json are written."""

    def close(self) -> None:
        """The run is over, finished or not: release files and connections."""


class ReportObserver(RunObserver):
    """Writes the run's report.html (plerec.report.run) once it is finished, from the model in memory. Put
    first among a run's observers: those after it (MLflow) find the page in place."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.say = say or (lambda _msg: None)

    def finish(self, run: _Run, result: FitResult) -> None:
        if run.out is None:
            return
        from plerec.report.run import write_run_report

        path = write_run_report(run.out, model=result.model, data=run.data, exp=run.exp)
        self.say(f"wrote {path}")


def configured_observers(exp, out, given: Sequence[RunObserver] = ()) -> list[RunObserver]:
    """The observers [train] asks for: TensorBoard event files and an MLflow run (plerec.tracking), but those
    of a kind the caller already `given` (`plerec compare` names each MLflow run). `out` is the run's folder
    (None: fit without one)."""
    found: list[RunObserver] = []
    kinds = {type(observer).__name__ for observer in given}
    if exp.train.tensorboard and "TensorBoardObserver" not in kinds:
        from plerec.tracking import TensorBoardObserver

        found.append(TensorBoardObserver.for_run(exp, out))
    if exp.train.mlflow and "MLflowObserver" not in kinds:
        from plerec.tracking import MLflowObserver

        found.append(MLflowObserver.for_run(exp, out))
    return found


def epoch_line(record: dict, names: list[str], epochs: int, monitor: str, best: tuple[int, float]) -> str:
    """One line per epoch for people: what each number is, said on the line itself.

    `monitor` names the value the best epoch is chosen by, `best` = (epoch, value) of the best epoch so far
    (this one included)."""
    parts = []
    for name in names:
        m = record["valid"][name]
        shown = ", ".join(f"{k} {_number(m[k])}" for k in ("auc", "logloss", "mse") if k in m)
        parts.append(f"{name} {shown}")
    best_epoch, best_value = best
    verdict = "new best" if best_epoch == record["epoch"] else f"best {_number(best_value)} at epoch {best_epoch}"
    return (
        f"epoch {record['epoch']}/{epochs} ({record['epoch_seconds']:.1f}s, {record['seconds']:.1f}s in all): "
        f"valid {'; '.join(parts)} | {monitor} {_number(record['monitor'])}, {verdict}"
    )


def epoch_json(record: dict, epochs: int, monitor: str, best: tuple[int, float]) -> str:
    """The same epoch as one JSON object on one line (NaN and ±inf as null)."""
    value = {
        "event": "epoch",
        "epoch": record["epoch"],
        "epochs": epochs,
        "epoch_seconds": record["epoch_seconds"],
        "seconds": record["seconds"],
        "train_loss": record["train_loss"],
        "valid": record["valid"],
        "monitor": {"name": monitor, "value": record["monitor"], "best_epoch": best[0], "best": best[1]},
    }
    return jsonio.dumps(value)


def message_json(text: str) -> str:
    """Any other line of the run (resumed, early stop) as a JSON object."""
    return jsonio.dumps({"event": "message", "text": text})


def json_log(write: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """A `log` for `fit` that writes every message as a JSON line: epoch lines arrive already encoded."""
    out = write or (lambda line: print(line, file=sys.stderr, flush=True))

    def say(msg: str) -> None:
        out(msg if msg.startswith('{"event": ') else message_json(msg))

    return say


def _number(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"


__all__ = [
    "ReportObserver",
    "RunObserver",
    "configured_observers",
    "epoch_json",
    "epoch_line",
    "json_log",
    "message_json",
]
