"""Ranking (DESIGN.md §5): the task predictions fused into one score by Eq. 1, and items ranked per user.

    score = Π_k p_k^{w_k} × f(length)

computed in log space, log score = Σ_k w_k · log p_k + log f(length), in float64:

- a binary task enters with its probability, log p = logsigmoid(logit) (exact for any logit, never -inf
  from rounding the probability to 0);
- a regression task enters with its predicted value, which must be positive (an error names the row
  otherwise); a task with w_k = 0 is left out, whatever it predicts;
- f is "none" (f = x, x > 0), "log" (f = ln(1 + x), x > 0) or "sigmoid" (f = σ((x − c) / s), any x).

Within each group (user), rank 1 is the highest log score; equal scores keep the order of the input rows,
so ranks are distinct and deterministic. Groups are listed in the order they first appear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from plerec.config import Experiment, RankConfig, TaskConfig
from plerec.data.encode import Encoder
from plerec.data.tables import EncodedTable
from plerec.models import MultiTaskModel
from plerec.safe_io import atomic_write

RESERVED_COLUMNS = ("score", "log_score", "rank")


def task_outputs(logits: torch.Tensor, tasks: Sequence[TaskConfig]) -> np.ndarray:
    """(N, T) float64: the probability of each binary task, the value of each regression task."""
    logits = logits.double()
    binary = torch.tensor([t.kind == "binary" for t in tasks])
    return torch.where(binary, torch.sigmoid(logits), logits).numpy()  # (N, T)


def fused_log_score(
    logits: torch.Tensor,
    tasks: Sequence[TaskConfig],
    config: RankConfig,
    length: np.ndarray | None = None,
    rows: Sequence | None = None,
) -> np.ndarray:
    """Eq. 1 in log space: (N,) float64. `length` is the raw length column (needed when config.length is set);
    `rows` labels the rows in error messages (default 0…N-1)."""
    logits = logits.double()  # (N, T)
    n = logits.shape[0]
    rows = list(range(n)) if rows is None else list(rows)
    total = torch.zeros(n, dtype=torch.float64)
    for k, task in enumerate(tasks):
        if task.rank_weight == 0:
            continue
        if task.kind == "binary":
            log_p = F.logsigmoid(logits[:, k])
        else:
            value = logits[:, k]
            bad = ~(value > 0)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"Task `{task.name}` (regression) predicts {float(value[i]):.6g} for row {rows[i]}: Eq. 1 needs a "
                    f"positive value to raise to rank_weight = {task.rank_weight:g}. Set its rank_weight = 0 to "
                    "leave it out of the score"
                )
            log_p = torch.log(value)
        total += task.rank_weight * log_p
    score = total.numpy()
    if config.length:
        if length is None:
            raise ValueError(f"Expected the length column `{config.length}` of [rank], but got none")
        score = score + log_length_factor(np.asarray(length, dtype=np.float64), config, rows)
    return score


def log_length_factor(length: np.ndarray, config: RankConfig, rows: Sequence | None = None) -> np.ndarray:
    """log f(length) for [rank] length_transform; (N,) float64."""
    rows = list(range(len(length))) if rows is None else list(rows)
    name, transform = config.length, config.length_transform
    bad = ~np.isfinite(length)
    expected = "a finite number"
    if transform in ("none", "log"):
        bad |= ~(length > 0)
        expected = f"a positive number (length_transform = {transform!r} takes log f, with f(x) = " + (
            "x)" if transform == "none" else "ln(1 + x))"
        )
    if bad.any():
        i = int(bad.argmax())
        raise ValueError(f"Length column `{name}`, row {rows[i]}: expected {expected}, but got {float(length[i])!r}")
    if transform == "none":
        return np.log(length)
    if transform == "log":
        return np.log(np.log1p(length))
    z = (length - config.length_center) / config.length_scale
    return -np.logaddexp(0.0, -z)  # log σ(z), exact for any z


def rank_within_groups(groups: Sequence, log_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, ranks): row indices grouped (groups in order of first appearance) and sorted by descending
    score within each group, ties in input order; and each listed row's rank, 1 = best."""
    codes, _ = pd.factorize(pd.Series(groups), use_na_sentinel=True)
    if (codes < 0).any():
        raise ValueError(f"Expected a group for every row, but row {int(np.argmax(codes < 0))} has none")
    n = len(codes)
    order = np.lexsort((np.arange(n), -log_score, codes))  # last key sorts first
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])  # first row of each group
    sizes = np.diff(np.r_[starts, n])
    ranks = np.arange(n) - np.repeat(starts, sizes) + 1
    return order, ranks


@dataclass(slots=True)
class Scorer:
    """A trained model, its encoder, and how to fuse and rank its predictions: what `plerec rank` and
    `plerec serve` share."""

    model: MultiTaskModel
    encoder: Encoder
    tasks: tuple[TaskConfig, ...]
    rank: RankConfig
    model_name: str = ""
    batch_size: int = 4096

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        taken = {c for c in (self.rank.group, self.rank.item) if c} | set(RESERVED_COLUMNS)
        clash = sorted(set(names) & taken)
        if clash:
            raise ValueError(
                f"Task names {clash} clash with the ranking's output columns {sorted(taken)}; rename the tasks"
            )
        if self.rank.group and self.rank.group == self.rank.item:
            raise ValueError(
                f"Expected [rank] `group` and `item` to be different columns, but both are {self.rank.group!r}"
            )

    @classmethod
    def from_checkpoint(cls, path: str | Path, exp: Experiment | None = None) -> Scorer:
        """The checkpoint's model; task weights and [rank] from `exp` (whose tasks must be the checkpoint's),
        else from the experiment stored in the checkpoint."""
        from plerec.train import load_checkpoint

        model, encoder, trained = load_checkpoint(path)
        if exp is None:
            exp = trained
        elif [(t.name, t.kind) for t in trained.tasks] != [(t.name, t.kind) for t in exp.tasks]:
            raise ValueError(
                f"The checkpoint {path} was trained on tasks {[(t.name, t.kind) for t in trained.tasks]}, but "
                f"{exp.source or 'the experiment'} defines {[(t.name, t.kind) for t in exp.tasks]}"
            )
        return cls(model=model, encoder=encoder, tasks=exp.tasks, rank=exp.rank, model_name=trained.model_name)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def score(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per-task predictions, the fused `score` of Eq. 1 and its `log_score`, indexed like `frame`."""
        table = self.encoder.transform(frame, labels=False)
        return self.score_table(table, self._length(frame), frame.index)

    def score_table(self, table: EncodedTable, length: np.ndarray | None = None, index=None) -> pd.DataFrame:
        """`score` of rows already encoded; `length` is the raw [rank] length column, `index` labels the rows."""
        from plerec.train import predict

        logits = predict(self.model, table, self.batch_size)
        index = pd.RangeIndex(len(table)) if index is None else index
        log_score = fused_log_score(logits, self.tasks, self.rank, length, index)
        out = pd.DataFrame(task_outputs(logits, self.tasks), columns=self.task_names, index=index)
        out["score"] = np.exp(log_score)
        out["log_score"] = log_score
        return out

    def rank_table(self, frame: pd.DataFrame, top_k: int = 0) -> pd.DataFrame:
        """Group, item, per-task predictions, score, log score and rank; rows grouped and in rank order, at most
        `top_k` per group (0: all)."""
        group, item = self.rank.group, self.rank.item
        for key, column in (("group", group), ("item", item)):
            if not column:
                raise ValueError(f"Expected [rank] `{key}` to name a column, but it is not set (--set rank.{key}=…)")
        source = frame.attrs.get("source", "the data")
        for column in (group, item):
            if column not in frame.columns:
                raise ValueError(f"Column `{column}` named in [rank] is not in {source}. {_columns(frame)}")
            missing = frame[column].isna().to_numpy()
            if missing.any():
                raise ValueError(
                    f"Column `{column}` of {source}, row {frame.index[missing.argmax()]}: expected a "
                    f"{'group' if column == group else 'item'} id, but got a missing value"
                )
        scored = self.score(frame)
        order, ranks = rank_within_groups(frame[group].to_numpy(), scored["log_score"].to_numpy())
        out = pd.concat([frame[[group, item]], scored], axis=1).iloc[order].reset_index(drop=True)
        out["rank"] = ranks
        if top_k:
            out = out[out["rank"] <= top_k].reset_index(drop=True)
        return out

    def _length(self, frame: pd.DataFrame) -> np.ndarray | None:
        column = self.rank.length
        if not column:
            return None
        source = frame.attrs.get("source", "the data")
        if column not in frame.columns:
            raise ValueError(f"Length column `{column}` named in [rank] is not in {source}. {_columns(frame)}")
        values = frame[column]
        numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(numeric) & values.notna().to_numpy()
        if bad.any() or pd.api.types.is_bool_dtype(values):
            row = frame.index[bad.argmax()]
            raise ValueError(
                f"Length column `{column}` of {source}, row {row}: expected a number, but got {values.loc[row]!r}"
            )
        return numeric


def _columns(frame: pd.DataFrame) -> str:
    return "Columns: " + ", ".join(map(str, frame.columns))


def write_ranked(table: pd.DataFrame, path: str | Path) -> Path:
    """CSV (optionally gzipped) or Parquet, by the file's suffix."""
    path = Path(path)
    name = path.name.lower()
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith((".parquet", ".pq")):
        return atomic_write(path, lambda handle: table.to_parquet(handle, index=False, write_page_checksum=True))
    if name.endswith((".csv", ".csv.gz")):
        compression = "gzip" if name.endswith(".gz") else None
        return atomic_write(path, lambda handle: table.to_csv(handle, index=False, compression=compression))
    raise ValueError(f"Expected the output {path} to end in .csv, .csv.gz or .parquet, but got {path.name!r}")
