"""[train] compile: the compiled body computes the eager step, compiles once per run, and "auto" decides by
the measured figures (plerec.compiled)."""

import json

import pytest
import torch
from tiny_experiments import experiment, write_table
from torch._dynamo.testing import CompileCounterWithBackend

from plerec import compiled as compiled_module
from plerec.compiled import COMPILE_RECORD, PROBE_SKIP, PROBE_STEPS, TIMED_STEPS, CompilePlan, pays_off, shape_key
from plerec.models import MODELS, build_model
from plerec.train import fit, masked_task_losses

VOCABS, NUM_DENSE, TASKS, ROWS = [5, 7], 3, 2, 16

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Inductor's notes on CPU capabilities


def _tiny(name: str):
    params = {"embedding_dim": 2, "tower_dims": [4]}
    if name in ("mmoe", "omoe", "ml_mmoe", "cgc", "ple"):
        params["expert_dims"] = [4]
    torch.manual_seed(0)
    return build_model(name, params, VOCABS, NUM_DENSE, TASKS)


def _step(model, sparse, dense, labels):
    """One training step's task losses and every parameter's gradient (dense; None where it has none)."""
    model.zero_grad(set_to_none=True)
    logits = model(sparse, dense)
    mask = torch.ones_like(labels, dtype=torch.bool)
    is_binary = torch.tensor([True, False])
    losses = masked_task_losses(logits, labels, mask, is_binary, None, model.output_scale)
    aux = model.auxiliary_loss(logits)
    (losses.sum() if aux is None else losses.sum() + aux).backward()
    grads = {n: None if p.grad is None else p.grad.to_dense().clone() for n, p in model.named_parameters()}
    return losses.detach(), grads


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_body_gives_the_eager_loss_and_gradients(name):
    """Every model in the registry: the same task losses and the same gradient for every parameter (the
    embeddings' sparse gradients included) with the body compiled by Inductor as eager, within float tolerance."""
    torch._dynamo.reset()
    model = _tiny(name).train()
    g = torch.Generator().manual_seed(1)
    sparse = torch.stack([torch.randint(0, v, (ROWS,), generator=g) for v in VOCABS], dim=1)
    dense = torch.randn(ROWS, NUM_DENSE, generator=g)
    labels = torch.stack([torch.randint(0, 2, (ROWS,), generator=g).float(), torch.randn(ROWS, generator=g)], 1)
    eager_losses, eager_grads = _step(model, sparse, dense, labels)
    counter = CompileCounterWithBackend("inductor")
    model.compile_body(torch.compile(model.body, backend=counter, dynamic=False), ROWS)
    compiled_losses, compiled_grads = _step(model, sparse, dense, labels)
    assert counter.frame_count >= 1, "the compiled body was not used"
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for n, grad in eager_grads.items():
        if grad is None:
            assert compiled_grads[n] is None, n
        else:
            torch.testing.assert_close(compiled_grads[n], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    model.compile_body(None, 0)
    assert "_compiled_body" not in model.__dict__
    assert not any("compiled" in k or "_orig_mod" in k for k in model.state_dict()), "the state dict changed"


def test_a_run_with_a_partial_last_batch_and_evaluation_compiles_once(tmp_path, monkeypatch):
    """240 training rows at batch 64: three full batches and one of 48 per epoch, and evaluation batches of
    another size; over 3 epochs the backend is asked for a graph once (no recompiles), and the run's
    metrics are those of the eager run."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(compiled_module, "BACKEND", counter)
    write_table(tmp_path / "t.csv", rows=400)  # 60 % train: 240 rows
    cache = tmp_path / "cache"
    said = []
    eager = fit(experiment(tmp_path / "t.csv", epochs=3, compile=False))
    run = fit(experiment(tmp_path / "t.csv", epochs=3, compile=True, compile_cache=str(cache)), log=said.append)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert any("compile = true" in line and "batches of 64 rows" in line for line in said), said
    for split in ("valid", "test"):
        for task, values in eager.metrics[split].items():
            for metric, value in values.items():
                assert run.metrics[split][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, task)
    assert "_compiled_body" not in run.model.__dict__, "the fitted model keeps a compiled body"
    assert run.compiled["compiled"] and run.compiled["compile_seconds"] > 0, run.compiled  # what FitResult reports
    assert not eager.compiled["compiled"] and eager.compiled["compile_seconds"] is None, eager.compiled


def test_compile_resumes_to_the_uninterrupted_run(tmp_path):
    """A compiled run of 1 epoch resumed to 3 (compile on again) ends where an uninterrupted compiled run does."""
    write_table(tmp_path / "t.csv", rows=400)
    cache = str(tmp_path / "cache")
    whole = fit(experiment(tmp_path / "t.csv", epochs=3, compile=True, compile_cache=cache), out_dir=tmp_path / "a")
    fit(experiment(tmp_path / "t.csv", epochs=1, compile=True, compile_cache=cache), out_dir=tmp_path / "b")
    resumed = fit(
        experiment(tmp_path / "t.csv", epochs=3, compile=True, compile_cache=cache), out_dir=tmp_path / "b", resume=True
    )
    assert resumed.best_epoch == whole.best_epoch
    for task, values in whole.metrics["test"].items():
        for metric, value in values.items():
            assert resumed.metrics["test"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def _plan(folder, setting, said):
    return CompilePlan(
        setting=setting,
        model=_tiny("ple"),
        rows=ROWS,
        bf16=False,
        folder=folder,
        say=said.append,
    )


def _compile_nothing(plan, why):
    """CompilePlan._compile without torch.compile: the plan only marks the body compiled."""
    plan.decided = plan.compiled = True


def _timed_steps(plan, seconds, monkeypatch, rows=None):
    """Training steps through `plan` that take `seconds` each (the clock is faked), of `rows` rows each (full
    batches, ROWS, unless given)."""
    ticks = iter([t for d in seconds for t in (0.0, d)])  # before_step reads 0, after_step the duration
    monkeypatch.setattr(compiled_module.time, "perf_counter", lambda: next(ticks))
    for n in rows or [ROWS] * len(seconds):
        plan.before_step()
        plan.after_step(n)


def test_auto_compiles_only_where_the_remaining_steps_pay_for_it(tmp_path, monkeypatch):
    """The rule: remaining steps × (eager − compiled step) > compile seconds; for a known shape "auto" decides at
    the start from the recorded figures, both ways, and says why."""
    assert pays_off(1000, 0.010, 0.008, 1.9) and not pays_off(1000, 0.010, 0.008, 2.1)
    compiles = []
    monkeypatch.setattr(CompilePlan, "_compile", lambda self, why: compiles.append(why))
    key = shape_key(_tiny("ple"), ROWS, False)
    record = {key: {"eager_step": 0.010, "compiled_step": 0.008, "cold_compile_seconds": 20.0}}
    (tmp_path / COMPILE_RECORD).write_text(json.dumps(record))
    said = []
    many = _plan(tmp_path, "auto", said)  # 40 s saved against 20 s
    many.start(20_000)
    assert many.decided and len(compiles) == 1
    few = _plan(tmp_path, "auto", said)  # 10 s saved against 20 s
    few.start(5_000)
    assert few.decided and len(compiles) == 1
    assert "compile = auto: off (measured here before: 10.0 s saved over 5000 steps against 20.0 s" in said[-1]
    record[key]["warm_compile_seconds"] = 5.0  # a warm cache costs less: now the short run pays too
    (tmp_path / COMPILE_RECORD).write_text(json.dumps(record))
    _plan(tmp_path, "auto", said).start(5_000)
    assert len(compiles) == 2


def test_auto_times_the_first_eager_steps_for_a_shape_never_compiled(tmp_path, monkeypatch):
    """Without a record, "auto" decides after PROBE_SKIP + PROBE_STEPS full eager steps from their median
    and the prior saving; partial batches are not timed; the same figures decide the same way."""
    compiles = []
    monkeypatch.setattr(CompilePlan, "_compile", lambda self, why: compiles.append(why))
    for remaining, expected in ((100_000, 1), (1_000, 0)):
        compiles.clear()
        said = []
        plan = _plan(tmp_path, "auto", said)
        plan.start(remaining)
        assert not plan.decided
        # full batches of 10 ms, each followed by a partial batch (not the compiled shape, not timed) of 1 s
        pairs = PROBE_SKIP + PROBE_STEPS - 1
        _timed_steps(plan, [0.010, 1.0] * pairs, monkeypatch, rows=[ROWS, ROWS - 1] * pairs)
        assert not plan.decided
        _timed_steps(plan, [0.010], monkeypatch)
        assert plan.decided and len(compiles) == expected, (remaining, said)
        if not expected:
            assert said and said[-1].startswith("compile = auto: off (an eager step takes 10.0 ms"), said


def test_compile_setting_is_checked(tmp_path):
    write_table(tmp_path / "t.csv", rows=50)
    with pytest.raises(ValueError, match="Expected \\[train\\] `compile` to be true, false or \"auto\", but got 'yes'"):
        experiment(tmp_path / "t.csv", compile="yes")


def test_auto_goes_back_to_eager_when_compiling_fails(tmp_path, monkeypatch):
    """Under "auto", a backend that fails in the first compiled step: the run says so, trains that step again
    eager, and ends with the eager run's metrics; under compile = true the same failure stops the run."""

    def broken(graph, example_inputs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(compiled_module, "BACKEND", broken)
    write_table(tmp_path / "t.csv", rows=400)
    cache = tmp_path / "cache"
    eager = fit(experiment(tmp_path / "t.csv", epochs=2, compile=False))
    key = shape_key(eager.model, 64, False)  # the run's model shape: compile leaves the model as it is
    cache.mkdir()
    (cache / COMPILE_RECORD).write_text(
        json.dumps({key: {"eager_step": 1.0, "compiled_step": 0.0, "cold_compile_seconds": 0.0}})
    )
    torch._dynamo.reset()
    said = []
    run = fit(experiment(tmp_path / "t.csv", epochs=2, compile="auto", compile_cache=str(cache)), log=said.append)
    assert any(line.startswith("compile = auto: on (measured here before") for line in said), said
    assert any("compile = auto: compiling failed" in line and "no compiler today" in line for line in said), said
    for task, values in eager.metrics["test"].items():
        assert run.metrics["test"][task] == pytest.approx(values), task
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no compiler today"):
        fit(experiment(tmp_path / "t.csv", epochs=2, compile=True, compile_cache=str(cache)))


def test_auto_goes_back_to_eager_when_the_compiled_step_is_no_faster(tmp_path, monkeypatch):
    """ "auto" compiled on a probe (10 ms eager steps, many steps left); if the timed compiled steps are no
    faster than that, the run returns to the eager body, says so, reports it, and records the figures so that
    the next run's "auto" stays off; a faster compiled step keeps the compiled body."""
    bodies = []
    monkeypatch.setattr(CompilePlan, "_compile", _compile_nothing)
    monkeypatch.setattr(type(_tiny("ple")), "compile_body", lambda self, fn, rows: bodies.append(fn))
    for compiled_ms, reverts in ((12, True), (10, True), (8, False)):
        bodies.clear()
        folder = tmp_path / str(compiled_ms)
        folder.mkdir()
        said = []
        plan = _plan(folder, "auto", said)
        plan.start(100_000)
        eager, compiling = [0.010] * (PROBE_SKIP + PROBE_STEPS), [2.0]
        _timed_steps(plan, eager + compiling + [compiled_ms / 1e3] * TIMED_STEPS, monkeypatch)
        summary = plan.summary()
        assert summary["compiled"] and summary["reverted"] == reverts, (compiled_ms, said)
        assert plan.compiled != reverts and bodies == ([None] if reverts else []), (compiled_ms, bodies)
        assert any(line.startswith("compile = auto: back to eager") for line in said) == reverts, said
        assert summary["compile_seconds"] == pytest.approx(2.0 - 0.010)
        # the record keeps what this machine measured: the next "auto" decides from it before any step
        nxt = _plan(folder, "auto", said)
        nxt.start(100_000)
        assert nxt.decided and nxt.compiled != reverts, (compiled_ms, said[-1])


def test_the_record_keeps_the_median_of_the_last_runs(tmp_path, monkeypatch):
    """One slow compiled process does not keep "auto" off for good: the record holds the step times of the last
    RECORDED_RUNS runs per shape and "auto" decides on their medians; an entry of the older, one-figure form is
    taken as the first of them."""
    monkeypatch.setattr(CompilePlan, "_compile", _compile_nothing)
    key = shape_key(_tiny("ple"), ROWS, False)
    (tmp_path / COMPILE_RECORD).write_text(
        json.dumps({key: {"eager_step": 0.010, "compiled_step": 0.012, "cold_compile_seconds": 1.0}})
    )
    said = []

    def compiled_run(compiled_ms):
        plan = _plan(tmp_path, True, said)
        plan.start(100_000)
        _timed_steps(plan, [2.0] + [compiled_ms / 1e3] * TIMED_STEPS, monkeypatch)  # the compiling step, then timed

    def auto_compiles():
        plan = _plan(tmp_path, "auto", said)
        plan.start(100_000)
        assert plan.decided, said[-1]
        return plan.compiled

    assert not auto_compiles()  # 12 ms compiled against 10 ms eager
    for compiled_ms in (7, 8, 9):
        compiled_run(compiled_ms)
    assert auto_compiles()  # the median of 12, 7, 8 and 9 ms: 8.5
    for compiled_ms in (30, 31, 32):
        compiled_run(compiled_ms)
    entry = json.loads((tmp_path / COMPILE_RECORD).read_text())[key]
    assert entry["compiled_steps"] == pytest.approx([0.008, 0.009, 0.030, 0.031, 0.032])  # the last 5 runs
    assert entry["compiled_step"] == pytest.approx(0.030) and entry["eager_step"] == 0.010  # no probe: eager kept
    assert not auto_compiles()
