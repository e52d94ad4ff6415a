"""A small two-task experiment over train/valid/test Parquet files, shared by the DDP and resume tests."""

from pathlib import Path

import numpy as np
import pandas as pd

EXPERIMENT = """
seed = {seed}
[data]
train = "{root}/train.parquet"
valid = "{root}/valid.parquet"
test = "{root}/test.parquet"
[features]
numeric = ["f*"]
categorical = ["c*"]
[[tasks]]
name = "click"
kind = "binary"
label = "click"
[[tasks]]
name = "watch"
kind = "regression"
label = "watch"
space = "click == 1"
[model]
name = "ple"
embedding_dim = 3
expert_dims = [6]
tower_dims = [4]
[train]
batch_size = 8
epochs = {epochs}
patience = 0
progress = false
{extra}
"""


def frame(n: int, rng: np.random.Generator, ids: int = 5) -> pd.DataFrame:
    """`click` from f0; `watch` (2·f1) only after a click, NaN (outside its space) otherwise."""
    table = pd.DataFrame(
        {
            "f0": rng.normal(size=n),
            "f1": rng.normal(size=n),
            "c0": rng.integers(0, ids, n),
            "c1": rng.choice(list("abcdef"), n),
        }
    )
    table["click"] = (table.f0 + rng.normal(size=n) > 0).astype(int)
    table["watch"] = np.where(table.click == 1, table.f1 * 2, np.nan)
    return table


def write_splits(root: Path, train_rows: int, *, seed: int = 0, epochs: int = 2, ids: int = 5, extra: str = "") -> Path:
    """train/valid (33 rows)/test (41 rows) Parquet files in 17-row row groups, and exp.toml over them."""
    rng = np.random.default_rng(0)
    for name, rows in (("train", train_rows), ("valid", 33), ("test", 41)):  # odd sizes: uneven shards
        frame(rows, rng, ids).to_parquet(root / f"{name}.parquet", row_group_size=17)
    path = root / "exp.toml"
    path.write_text(EXPERIMENT.format(root=root, seed=seed, epochs=epochs, extra=extra))
    return path
