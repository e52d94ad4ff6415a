"""A compiled training step: the dense body of a model compiled by `torch.compile` (Inductor), `[train] compile`.

Only the body (everything after the feature input) is compiled. The embedding lookup stays eager, so its
gradient stays sparse for `RowSparseAdam` (Inductor cannot take a sparse gradient). The compiled body sees
one shape only, the training batch of `batch_size` rows (`dynamic=False`): the last, smaller batch of an
epoch and every evaluation batch run the eager body, so nothing recompiles after the first step.

Compilation costs seconds per process (15.4 s for the benchmark's PLE on a quiet 2-core machine,
benchmarks/PROFILE.md), paid once per model shape when Inductor's on-disk caches already hold the graph
(`cache_folder`). `compile = "auto"` compiles only when the run's remaining steps pay for it:

    remaining steps × (eager step − compiled step) > compile seconds

with the figures this machine measured for the same model shape before (COMPILE_RECORD in the cache
folder), or, for a shape never compiled here, the eager step timed over the run's first PROBE_STEPS steps,
the saving PRIOR_SAVING of it and PRIOR_COMPILE_SECONDS (a cold cache). Every compiled run records its
measured compile time and step times there (the last RECORDED_RUNS runs' step times, decided on by their
medians), so the next decision rests on this machine's own figures.
Where "auto" compiled on a probe and the compiled step then times no faster than the probe's eager step
(TIMED_STEPS of each, medians), the run goes back to the eager body: the compile is spent, the steps left
are not; the record written says so to the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plerec import jsonio

BACKEND = "inductor"  # what torch.compile is given (tests count the compilations through it)
COMPILE_RECORD = "plerec_compile_times.json"
PROBE_SKIP = 3  # eager steps left out of the timing (allocator and oneDNN warm-up)
PROBE_STEPS = 20  # eager steps timed after them, for "auto"
TIMED_STEPS = 20  # compiled steps timed after the first (the compiling one), for the record
RECORDED_RUNS = 5  # runs whose step times the record keeps per shape ("auto" reads their median)
PRIOR_SAVING = 0.17  # of an eager step: PLE's body fwd+bwd 22.6 vs 27.3 ms compiled (benchmarks/PROFILE.md)
PRIOR_COMPILE_SECONDS = 15.4  # a cold cache, the same measurement


def cache_folder(setting: str = "") -> Path:
    """Where Inductor keeps compiled graphs between processes: `[train] compile_cache` when set, else
    TORCHINDUCTOR_CACHE_DIR when set, else $XDG_CACHE_HOME/plerec/inductor (~/.cache/plerec/inductor)."""
    if setting:
        return Path(setting).expanduser().resolve()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "plerec" / "inductor"


def shape_key(model, rows: int, bf16: bool) -> str:
    """One model shape on one torch and device kind: what a compiled graph (and its timings) belongs to."""
    described = jsonio.dumps(
        {
            "model": model.name,
            "config": repr(model.config),
            "input": model.input.out_dim,
            "tasks": int(model.output_scale.numel()),
            "rows": rows,
            "bf16": bf16,
            "torch": torch.__version__,
            "device": next(model.parameters()).device.type,
        },
        sort_keys=True,
    )
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def pays_off(remaining_steps: int, eager_step: float, compiled_step: float, compile_seconds: float) -> bool:
    """Whether compiling now saves more time over the remaining steps than it costs."""
    return remaining_steps * (eager_step - compiled_step) > compile_seconds


def read_record(folder: Path) -> dict:
    """The measured figures per shape key; empty where the file is absent or unreadable (it is a cache)."""
    try:
        record = json.loads((folder / COMPILE_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


@dataclass
class CompilePlan:
    """When a run's body is compiled, and what that cost: `start` once the run knows its remaining steps, then
    `before_step` and `after_step` around every training step (rank 0 says what it decided)."""

    setting: bool | str
    model: object  # MultiTaskModel
    rows: int  # the training batch on this process
    bf16: bool
    folder: Path
    say: Callable[[str], None]
    distributed: bool = False  # under torchrun "auto" stays off (not measured there)
    remaining: int = 0  # steps left in the run when it (re)started
    decided: bool = False  # compiled, or eager for good
    compiled: bool = False
    eager_times: list[float] = field(default_factory=list)  # full eager batches, while "auto" probes
    eager_step: float | None = None  # their median after PROBE_SKIP, once probed
    compiled_times: list[float] = field(default_factory=list)
    compile_seconds: float | None = None
    reverted: bool = False  # "auto" went back to eager: the compiled step was no faster than the eager one
    steps: int = 0
    _started: float = 0.0

    def start(self, remaining: int) -> None:
        """Decide what can be decided before any step: always (true), never (false, or "auto" where a known
        shape does not pay); otherwise "auto" times the first eager steps."""
        self.remaining = remaining
        if self.setting is False:
            self.decided = True
        elif self.setting is True:
            self._compile("compile = true")
        elif self.distributed:
            self.decided = True
            self.say("compile = auto: off (under torchrun it is not measured; set compile = true to compile)")
        elif next(self.model.parameters()).device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
            self.decided = True
            self.say("compile = auto: off (Inductor needs a C++ compiler on CPU, and there is no g++ or $CXX here)")
        else:
            known = read_record(self.folder).get(self.key) or {}
            cost = known.get("warm_compile_seconds", known.get("cold_compile_seconds"))
            if cost is not None and {"eager_step", "compiled_step"} <= known.keys():
                gain = remaining * (known["eager_step"] - known["compiled_step"])
                self._decide(
                    pays_off(remaining, known["eager_step"], known["compiled_step"], cost),
                    f"measured here before: {gain:.1f} s saved over {remaining} steps against {cost:.1f} s to compile",
                )

    @property
    def key(self) -> str:
        return shape_key(self.model, self.rows, self.bf16)

    def before_step(self) -> None:
        self._started = time.perf_counter()

    def after_step(self, rows: int) -> None:
        """After a step of `rows` rows: time it (only full batches are the compiled shape)."""
        seconds = time.perf_counter() - self._started
        self.steps += 1
        if rows != self.rows:
            return
        if not self.decided:  # "auto", probing
            self.eager_times.append(seconds)
            if len(self.eager_times) == PROBE_SKIP + PROBE_STEPS:
                self.eager_step = eager = statistics.median(self.eager_times[PROBE_SKIP:])
                left = self.remaining - self.steps
                gain = left * eager * PRIOR_SAVING
                self._decide(
                    pays_off(left, eager, eager * (1 - PRIOR_SAVING), PRIOR_COMPILE_SECONDS),
                    f"an eager step takes {eager * 1e3:.1f} ms; {PRIOR_SAVING:.0%} of it over {left} steps saves "
                    f"about {gain:.1f} s against about {PRIOR_COMPILE_SECONDS:.0f} s to compile",
                )
        elif self.compiled:
            if self.compile_seconds is None:  # the step that compiled, less what an eager step takes
                self.compile_seconds = max(seconds - (self.eager_step or 0.0), 0.0)
            elif len(self.compiled_times) < TIMED_STEPS:
                self.compiled_times.append(seconds)
                if len(self.compiled_times) == TIMED_STEPS:
                    compiled = statistics.median(self.compiled_times)
                    self._write_record(compiled)
                    self._keep_or_revert(compiled)

    def fall_back(self, error: Exception) -> bool:
        """After a step raised `error`: where "auto" had just compiled (the first compiled step), go back to the
        eager body and say why, and return True (the caller runs the step again); else False."""
        if not (self.compiled and self.setting == "auto" and self.compile_seconds is None):
            return False
        self.compiled = False
        self.model.compile_body(None, 0)
        self.say(f"compile = auto: compiling failed ({type(error).__name__}: {error}); training goes on eager")
        return True

    def _decide(self, compile: bool, why: str) -> None:
        self.decided = True
        if compile:
            self._compile(f"compile = auto: on ({why})")
        else:
            self.say(f"compile = auto: off ({why})")

    def _compile(self, why: str) -> None:
        self.decided = self.compiled = True
        self.folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.folder)  # read by Inductor when it first compiles
        self.model.compile_body(torch.compile(self.model.body, backend=BACKEND, dynamic=False), self.rows)
        self.say(f"{why}: the model body is compiled for batches of {self.rows} rows (cache {self.folder})")

    def _write_record(self, compiled: float) -> None:
        """This shape's measured figures (`compiled`: the median compiled step), for "auto" next time; the compile
        time is reported either way."""
        record = read_record(self.folder)
        entry = record.setdefault(self.key, {})
        # The step times of the last RECORDED_RUNS runs, and their medians for "auto": one slow process (the
        # compiled step varies by a third between processes on some CPUs) does not decide alone.
        for name, value in (("compiled_step", compiled), ("eager_step", self.eager_step)):
            if value is None:
                continue
            earlier = entry.get(name + "s", [entry[name]] if isinstance(entry.get(name), (int, float)) else [])
            entry[name + "s"] = [*earlier, value][-RECORDED_RUNS:]
            entry[name] = statistics.median(entry[name + "s"])
        # The first compile of a shape here is cold; every later one reads Inductor's caches (warm).
        entry["warm_compile_seconds" if "cold_compile_seconds" in entry else "cold_compile_seconds"] = (
            self.compile_seconds
        )
        jsonio.write_json(self.folder / COMPILE_RECORD, record)
        versus = f" against {self.eager_step * 1e3:.2f} ms eager" if self.eager_step is not None else ""
        self.say(
            f"compile: {self.compile_seconds:.1f} s to compile; a compiled step takes {compiled * 1e3:.2f} ms{versus}"
        )

    def _keep_or_revert(self, compiled: float) -> None:
        """Under "auto", back to the eager body when the compiled step (`compiled`, the median) is no faster than
        the eager one timed in this process (a probe); what was measured is in the record either way."""
        if self.setting != "auto" or self.eager_step is None or compiled < self.eager_step:
            return
        self.compiled, self.reverted = False, True
        self.model.compile_body(None, 0)
        self.say(
            f"compile = auto: back to eager (a compiled step takes {compiled * 1e3:.2f} ms, an eager one "
            f"{self.eager_step * 1e3:.2f} ms on this machine)"
        )

    def summary(self) -> dict:
        """Whether the body was compiled, and the seconds this process measured (None where not measured)."""
        return {
            "compiled": self.compiled or self.reverted,
            "reverted": self.reverted,
            "compile_seconds": self.compile_seconds,
            "compiled_step": statistics.median(self.compiled_times) if self.compiled_times else None,
            "eager_step": self.eager_step,
        }

    def close(self) -> None:
        """The model back to its eager body (the fitted model is used for scoring, and may be saved or copied)."""
        self.model.compile_body(None, 0)
