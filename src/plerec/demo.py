"""The main job: synthetic data with the paper's settings, five models, per-task metrics and MTL gains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from plerec.config import experiment_from_dict
from plerec.data.synth import SynthConfig, write_parquet
from plerec.report import metrics_table
from plerec.train import fit, prepare_data

DEMO_MODELS = ("single", "shared_bottom", "mmoe", "cgc", "ple")


def demo_experiment(data_path: Path, *, epochs: int, seed: int, progress: bool) -> dict:
    """The experiment of the demo as a plain dict (the same keys as an experiment TOML file)."""
    return {
        "seed": seed,
        "data": {"path": str(data_path), "split": [0.7, 0.15, 0.15]},
        "features": {"numeric": ["x*"]},
        "tasks": [
            {"name": "y1", "kind": "regression", "label": "y1"},
            {"name": "y2", "kind": "regression", "label": "y2"},
        ],
        "model": {"name": "ple", "expert_dims": [64], "tower_dims": [32]},
        "train": {"lr": 1e-3, "batch_size": 256, "epochs": epochs, "patience": 3, "progress": progress},
    }


def run_demo(
    out: Path,
    *,
    rows: int = 100_000,
    correlation: float = 0.5,
    epochs: int = 20,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> str:
    """Train every demo model on the same split; return the Markdown table of metrics and MTL gains."""
    say = log or (lambda _msg: None)
    out = Path(out)
    data_path = out / "synthetic.parquet"
    synth = SynthConfig(rows=rows, correlation=correlation, seed=seed)
    write_parquet(synth, data_path)
    say(f"synthetic data: {rows} rows, d={synth.dim}, correlation {correlation} -> {data_path}")
    base = experiment_from_dict(demo_experiment(data_path, epochs=epochs, seed=seed, progress=progress))
    data = prepare_data(base)
    per_model = {
        "single": {"bottom_dims": [64], "tower_dims": [32]},
        "shared_bottom": {"bottom_dims": [64], "tower_dims": [32]},
        "mmoe": {"num_experts": 3, "expert_dims": [64], "tower_dims": [32]},
        "cgc": {"num_task_experts": 1, "num_shared_experts": 1, "expert_dims": [64], "tower_dims": [32]},
        "ple": {
            "num_levels": 2,
            "num_task_experts": 1,
            "num_shared_experts": 1,
            "expert_dims": [64],
            "tower_dims": [32],
        },
    }
    results = {}
    for name in DEMO_MODELS:
        say(f"training {name}")
        (out / name / "last.pt").unlink(missing_ok=True)  # the demo always trains from scratch
        result = fit(base.with_model(name, per_model[name]), data, out_dir=out / name, log=say)
        results[name] = result.metrics["test"]
    table = metrics_table(results, base.task_kinds)
    (out / "summary.md").write_text(table + "\n")
    return table
