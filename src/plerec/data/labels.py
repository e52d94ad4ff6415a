"""Task labels and sample spaces: (N, T) labels and the (N, T) mask of rows in each task's space.

A task's label that is empty or NaN puts the row outside that task's sample space, as does a row that
does not meet its `space` condition. A label that is not finite, not 0 or 1 for a binary task, or beyond
float32's range stops with an error naming the file, the column and the first bad rows.
"""

from __future__ import annotations

import numpy as np

from plerec.config import TaskConfig
from plerec.data.columns import require_columns, to_float
from plerec.data.conditions import evaluate_condition, known_rows, plain_condition
from plerec.data.frames import bad_rows, pd, plain_column
from plerec.data.frames import missing_values as _missing
from plerec.data.frames import plain_value as _plain

FLOAT32_MAX = float(np.finfo(np.float32).max)


def encode_labels(tasks: list[TaskConfig], frame: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N, T) float32 with 0 outside the space, and the space mask (N, T) bool (Eq. 9's δ)."""
    n = len(frame)
    labels = np.zeros((n, len(tasks)), dtype=np.float32)
    mask = np.zeros((n, len(tasks)), dtype=bool)
    for task in tasks:
        require_columns(frame, list(task.columns), source, f"task `{task.name}`")
    for k, task in enumerate(tasks):
        plain = _plain_labels(task, frame)
        if plain is not None:
            values, in_space = plain
        else:
            cond = task.label_condition
            if cond is not None:  # outside the task where any column the condition reads is missing
                present = known_rows(cond, frame)
                values = evaluate_condition(cond, frame, source).astype(np.float32)
            else:
                column = frame[task.label]
                present = ~_missing(column)
                values = _label_values(task, column, present, source)
            in_space = present
            if task.space_condition is not None:
                in_space = in_space & evaluate_condition(task.space_condition, frame, source)
        labels[:, k] = np.where(in_space, values, 0.0)
        mask[:, k] = in_space
    return labels, mask


def _plain_labels(task: TaskConfig, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """A task's labels and sample space as `encode_labels` computes them, from columns of plain numbers
    without pandas; None where a column is not plain numbers, a condition compares text, or a value is
    bad (then `encode_labels` takes the general path, which names the bad rows)."""
    cond = task.label_condition
    if cond is not None:
        plain = plain_condition(cond, frame)
        if plain is None:
            return None
        holds, present = plain
        values = holds.astype(np.float32)
    else:
        numbers = plain_column(frame, task.label)
        if numbers is None:
            return None
        numbers = numbers.astype(np.float64)
        present = ~np.isnan(numbers)
        if _bad_labels(task, numbers, present).any():
            return None
        values = np.where(present, numbers, 0.0)
    in_space = present
    if task.space_condition is not None:
        plain = plain_condition(task.space_condition, frame)
        if plain is None:
            return None
        in_space = plain[0] & present
    return values, in_space


def _label_values(task: TaskConfig, column: pd.Series, present: np.ndarray, source: str) -> np.ndarray:
    numeric = to_float(column, present)
    bad = _bad_labels(task, numeric, present)
    if bad.any():
        row = column.index[bad.argmax()]
        expected = "0 or 1 (or empty for rows outside the task)" if task.kind == "binary" else "a finite number"
        hint = (
            " Use `condition` to define a binary label from a text column."
            if task.kind == "binary"
            else " Regression labels must be finite and within float32's range (about ±3.4e38)."
        )
        raise ValueError(
            f"Label column `{task.source_column}` of task `{task.name}` in {source}, row {row}: "
            f"expected {expected}, but got {_plain(column.loc[row])!r}.{hint}" + bad_rows(column, bad)
        )
    return np.where(present, numeric, 0.0)


def _bad_labels(task: TaskConfig, numbers: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Rows whose label value the task cannot take: not finite; not 0 or 1 (binary); beyond float32."""
    bad = present & ~np.isfinite(numbers)
    if task.kind == "binary":
        bad |= present & np.isfinite(numbers) & (numbers != 0) & (numbers != 1)
    else:
        bad |= present & (np.abs(numbers) > FLOAT32_MAX)  # labels are float32: it would become inf
    return bad
