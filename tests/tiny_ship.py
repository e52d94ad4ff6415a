"""A tiny trained model for the export, rank and serve tests: two tasks, categorical and numeric features with
missing values, trained for one epoch on a few hundred generated rows."""

from pathlib import Path

import numpy as np
import pandas as pd

from plerec.config import load_experiment
from plerec.train import fit

EXPERIMENT = """\
seed = 3

[data]
train = "train.csv"
valid = "valid.csv"

[features]
categorical = ["cat", "device"]
numeric = ["a", "b"]

[[tasks]]
name = "click"
kind = "binary"
label = "click"
rank_weight = 2.0

[[tasks]]
name = "watch"
kind = "regression"
label = "watch"
rank_weight = 0.0

[model]
name = "ple"
embedding_dim = 3
expert_dims = [8]
tower_dims = [4]

[train]
epochs = 1
batch_size = 32
progress = false

[rank]
group = "user"
item = "item"
length = "duration"
length_transform = "log"
"""


def frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    out = pd.DataFrame(
        {
            "user": rng.choice(["u1", "u2", "u3"], rows),
            "item": rng.integers(100, 200, rows),
            "cat": rng.choice(["x", "y", "z"], rows),
            "device": rng.choice([1, 2], rows),
            "a": np.where(rng.random(rows) < 0.1, np.nan, a),  # missing values: imputed, with an indicator
            "b": b,
            "duration": rng.uniform(1, 60, rows),
        }
    )
    out["click"] = (a + 0.5 * rng.normal(size=rows) > 0).astype(int)
    out["watch"] = np.where(rng.random(rows) < 0.25, np.nan, 2 * b)
    return out


def train_tiny(root: Path, model: str = "ple", overrides: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(checkpoint, experiment file) of a model trained for one epoch under `root`; `overrides` as --set takes
    them (`model.batch_norm=["gates"]`)."""
    frame(240, 0).to_csv(root / "train.csv", index=False)
    frame(60, 1).to_csv(root / "valid.csv", index=False)
    (root / "exp.toml").write_text(EXPERIMENT)
    exp = load_experiment(root / "exp.toml", [*([f"model.name={model}"] if model != "ple" else []), *overrides])
    fit(exp, out_dir=root / "run")
    return root / "run" / "best.pt", root / "exp.toml"


def candidates(rows: int, seed: int) -> pd.DataFrame:
    """Rows to score: features, user, item and duration, no labels; some unseen and missing values."""
    out = frame(rows, seed).drop(columns=["click", "watch"])
    out.loc[out.index[:2], "cat"] = ["never-seen", None]
    out.loc[out.index[2], "a"] = np.nan
    return out
