"""A tiny two-task CSV table (`a`, `b`, `cat`; binary `click`, regression `watch`) and the experiment over it,
split 60/20/20, shared by the train, balancing, report and tracking tests."""

import numpy as np
import pandas as pd

from plerec.config import Experiment, experiment_from_dict


def write_table(path, rows: int = 300, seed: int = 0, *, missing: float | None = None) -> None:
    """`click` from `a`, `watch` from `b`; with `missing`, that share of `watch` is NaN (outside its space)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    frame = pd.DataFrame({"a": a, "b": b, "cat": rng.choice(["x", "y", "z"], rows)})
    frame["click"] = (a + 0.5 * rng.normal(size=rows) > 0).astype(int)
    watch = 2 * b + 0.1 * rng.normal(size=rows)
    # Drawn after `watch`, and only when asked: the rows without missing labels stay those of the same seed.
    frame["watch"] = watch if missing is None else np.where(rng.random(rows) < missing, np.nan, watch)
    frame.to_csv(path, index=False)


def experiment(path, *, model: dict | None = None, tasks: list | None = None, seed: int = 0, **train) -> Experiment:
    """PLE over the table at `path` unless `model` says otherwise; `train` overrides 2 epochs of batch 64."""
    return experiment_from_dict(
        {
            "seed": seed,
            "data": {"path": str(path), "split": [0.6, 0.2, 0.2]},
            "features": {"numeric": ["a", "b"], "categorical": ["cat"]},
            "tasks": tasks
            or [
                {"name": "click", "kind": "binary", "label": "click"},
                {"name": "watch", "kind": "regression", "label": "watch"},
            ],
            "model": model or {"name": "ple", "expert_dims": [4], "tower_dims": [4], "embedding_dim": 2},
            "train": {"epochs": 2, "batch_size": 64, "progress": False, **train},
        }
    )
