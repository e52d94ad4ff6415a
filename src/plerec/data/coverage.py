"""Every task can be trained and evaluated on every split: a split that leaves a task without a row in its
sample space, or a binary task without one of its classes, is an error before training starts, not an AUC
that silently goes missing (or a NaN) after it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plerec.config import TaskConfig


@dataclass(frozen=True, slots=True)
class LabelCounts:
    """A split's rows, and per task (T,) its rows in the task's space and the positive ones among them."""

    rows: int
    labelled: np.ndarray  # (T,) int64
    positives: np.ndarray  # (T,) int64: labelled rows whose label is 1 (what a binary task counts)

    @classmethod
    def of(cls, labels, label_mask) -> LabelCounts:
        """Counts of (N, T) labels and mask, as an EncodedTable or `encode_labels` holds them."""
        mask = np.asarray(label_mask, dtype=bool)
        positive = (np.asarray(labels) == 1) & mask  # (N, T)
        return cls(len(mask), mask.sum(0, dtype=np.int64), positive.sum(0, dtype=np.int64))

    @classmethod
    def zeros(cls, num_tasks: int) -> LabelCounts:
        return cls(0, np.zeros(num_tasks, np.int64), np.zeros(num_tasks, np.int64))

    def __add__(self, other: LabelCounts) -> LabelCounts:
        return LabelCounts(self.rows + other.rows, self.labelled + other.labelled, self.positives + other.positives)


def check_label_counts(
    tasks: Sequence[TaskConfig], counts: LabelCounts, split: str, source: str, one_file: bool = False
) -> None:
    """Raise a ValueError naming the task, the split, its file and the counts when a task has no row of the
    split in its space, or a binary task has only one class there. `one_file`: the split was cut from one
    file by [data] split fractions (the hint then points at them)."""
    for task, labelled, positives in zip(tasks, counts.labelled.tolist(), counts.positives.tolist(), strict=True):
        columns = task.label_source
        fractions = "; with one file cut by [data] split, use more rows or larger fractions" if one_file else ""
        if labelled == 0:
            space = f" and to meet `space` ({task.space})" if task.space_condition is not None else ""
            fix = "check `space`, " if space else ""
            raise ValueError(
                f"Task `{task.name}` has 0 rows in its sample space in the {split} split ({source}): expected some "
                f"of its {counts.rows:,} rows to have a value in {columns}{space}, to "
                f"{'train' if split == 'train' else 'evaluate'} the task on. Fill in the labels, {fix}or remove "
                f"the task{fractions}"
            )
        negatives = labelled - positives
        if task.kind == "binary" and (positives == 0 or negatives == 0):
            purpose = "to learn to tell them apart" if split == "train" else "to compute AUC"
            if task.condition:
                check = (
                    f"check `condition` ({task.condition}) against the values of {columns} in that file — e.g. a "
                    f"{split} file that spells the label `>50K.` where the condition expects `>50K` (a condition "
                    'like `income in [">50K", ">50K."]` accepts both spellings)'
                )
            else:
                check = f"check the values of label {columns} in that file"
            raise ValueError(
                f"Task `{task.name}` has {positives:,} positive and {negatives:,} negative rows in the {split} split "
                f"({source}): expected both classes {purpose}; {check}{fractions}"
            )
