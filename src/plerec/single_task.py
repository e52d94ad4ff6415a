"""The single-task baseline of the MTL gain (PLE Eq. 11): one one-task fit per task.

"The single-task model with the same network structures and training samples": task k's network has
its own embeddings and layers, is trained on task k's loss only, and is selected and stopped early on
task k's own validation metric. The K networks share nothing, so they are trained one after the other
as K ordinary one-task runs on the experiment's rows and encoder, and stacked into one K-task `single`
model (models.stack_single_task) that scores, exports, ranks and serves like any other model.

With an output folder, task k's run lives in OUT/tasks/NAME/ (its own best.pt, last.pt, history.json:
an interrupted baseline resumes task by task); OUT itself gets the stacked best.pt, metrics.json,
history.json (each task's best epoch) and experiment.toml.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from plerec import jsonio
from plerec.config import Experiment, write_experiment
from plerec.distributed import DistContext, barrier, init_distributed
from plerec.models import stack_single_task
from plerec.observe import json_log
from plerec.safe_io import run_lock

TASKS_FOLDER = "tasks"


def one_task_experiment(exp: Experiment, k: int) -> Experiment:
    """Task k alone, selected on its own validation metric; everything else as in `exp`."""
    return replace(exp, tasks=(exp.tasks[k],), train=replace(exp.train, monitor="mean"))


def task_folder(out_dir: str | Path, task_name: str) -> Path:
    return Path(out_dir) / TASKS_FOLDER / task_name


def fit_each_task(
    exp: Experiment,
    data=None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    ctx: DistContext | None = None,
    resume: bool = False,
    observers=(),
):
    """Train `exp` (model `single`) as one one-task fit per task; return a FitResult for all tasks. The
    observers watch each task's fit in turn."""
    ctx = ctx or init_distributed(exp.train.device)
    folder = Path(out_dir) if out_dir is not None else None
    # OUT itself; each task's fit locks its own OUT/tasks/NAME
    with run_lock(folder) if folder is not None and ctx.is_main else contextlib.nullcontext():
        return _fit_each_task(exp, data, folder, log, ctx, resume, observers)


def _fit_each_task(exp: Experiment, data, folder: Path | None, log, ctx: DistContext, resume: bool, observers):
    from plerec.train import LAST, FitResult, fit, metrics_record, prepare_data, save_checkpoint, write_json

    if log is not None and exp.train.log_format == "json":
        log = json_log(log)
    say = (log or (lambda _msg: None)) if ctx.is_main else (lambda _msg: None)

    def tagged(msg: str, name: str) -> None:  # a task's fit's messages, named by their task
        if msg.startswith('{"event": '):  # a JSON line (log_format = "json"): the task as one more key
            say(jsonio.dumps({**json.loads(msg), "task": name}))
        else:
            say(f"  {name}: {msg}")

    if folder is not None and not resume:  # refused before any task trains, not after the first
        held = [task_folder(folder, t.name) / LAST for t in exp.tasks]
        held = [p for p in held if p.exists()]
        if held:
            raise ValueError(
                f"{folder} already holds training checkpoints ({', '.join(map(str, held))}): pass --resume to "
                "continue that run, or choose another output folder"
            )
    data = data or prepare_data(exp)
    results = []
    for k, task in enumerate(exp.tasks):
        say(f"single-task model of `{task.name}` ({k + 1} of {len(exp.tasks)}), selected on its own validation")
        sub_out = task_folder(folder, task.name) if folder is not None else None
        results.append(
            fit(
                one_task_experiment(exp, k),
                data.for_task(k),
                sub_out,
                log=lambda msg, name=task.name: tagged(msg, name),
                ctx=ctx,
                resume=resume,
                observers=observers,
            )
        )
    names = [t.name for t in exp.tasks]
    model = stack_single_task([r.model for r in results], **data.encoder.model_inputs())
    metrics = {
        split: {name: r.metrics[split][name] for name, r in zip(names, results, strict=True)}
        for split in results[0].metrics
    }
    best_epochs = {name: r.best_epoch for name, r in zip(names, results, strict=True)}
    history = merged_history(names, [r.history for r in results])
    seconds = sum(r.train_seconds for r in results)
    if folder is not None and ctx.is_main:
        write_experiment(exp, folder / "experiment.toml")
        save_checkpoint(folder / "best.pt", model, data.encoder, exp, max(best_epochs.values()))
        write_json(folder / "metrics.json", metrics_record(exp, metrics, seconds))
        write_json(folder / "history.json", {"best_epoch": best_epochs, "epochs": history})
    barrier(ctx)
    return FitResult(model, data.encoder, metrics, history, max(best_epochs.values()), seconds, best_epochs)


def merged_history(names: list[str], histories: list[list[dict]]) -> list[dict]:
    """One record per epoch with every task still training then: its training loss, validation metrics
    and monitor (`monitor` is a task -> value table here: each task has its own)."""
    merged = []
    for e in range(max(len(h) for h in histories)):
        record: dict = {"epoch": e + 1, "train_loss": {}, "valid": {}, "monitor": {}}
        for name, history in zip(names, histories, strict=True):
            if e < len(history):
                record["train_loss"][name] = history[e]["train_loss"][name]
                record["valid"][name] = history[e]["valid"][name]
                record["monitor"][name] = history[e]["monitor"]
        merged.append(record)
    return merged
