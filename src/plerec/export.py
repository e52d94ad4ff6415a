"""A trained model for other runtimes: ONNX or TorchScript, with a JSON sidecar that says how to encode raw rows.

The exported graph takes the encoded inputs — `sparse` (B, S) int64 category ids and `dense` (B, D) float32
standardised numbers, and, when the model has list fields ([features.lists]), `lists` (B, L) int64 padded
element ids (each list field's `max_length` columns side by side) and `lengths` (B, F) int64 (how many of a
field's columns are real) — and gives one named output (B,) per task: the probability for a binary task, the
value for a regression task. The batch size is dynamic. The sidecar holds what turns raw feature values
into those inputs (vocabularies, means and standard deviations, the missing-value policy, each list field's
columns, length and vocabulary), so any runtime can score raw rows without plerec.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from plerec.config import Experiment, experiment_to_dict
from plerec.data.encode import Encoder
from plerec.jsonio import write_json
from plerec.models import MultiTaskModel
from plerec.safe_io import atomic_write, check_target

EXPORT_FORMATS = ("onnx", "torchscript")
SIDECAR_FORMAT = "plerec-export-1"
INPUT_NAMES = ("sparse", "dense")
LIST_INPUT_NAMES = ("lists", "lengths")  # after INPUT_NAMES, when the encoder has list fields


def input_names(encoder: Encoder) -> tuple[str, ...]:
    """The exported graph's inputs: sparse and dense, then lists and lengths for a model with list fields
    (a model without them keeps the two-input signature of earlier exports)."""
    return INPUT_NAMES + LIST_INPUT_NAMES if encoder.lists else INPUT_NAMES


class TaskOutputs(nn.Module):
    """The model with the outputs a serving stack wants: probabilities for binary tasks, values for regression.

    Returns a tuple of (B,) tensors in task order, or a dict keyed by task name (`as_dict`, for TorchScript,
    where outputs have no names of their own).
    """

    def __init__(self, model: MultiTaskModel, task_names: Sequence[str], kinds: Sequence[str], as_dict: bool = False):
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # A sparse embedding changes only how gradients are stored; the lookup is the same, and exporters
        # handle the dense form.
        self.model.input.set_sparse(False)
        self.task_names = list(task_names)
        self.register_buffer("binary", torch.tensor([k == "binary" for k in kinds]), persistent=False)
        self.as_dict = as_dict

    def forward(self, sparse: Tensor, dense: Tensor, lists: Tensor | None = None, lengths: Tensor | None = None):
        logits = self.model(sparse, dense, lists, lengths)  # (B, T)
        outputs = torch.where(self.binary, torch.sigmoid(logits), logits)  # (B, T)
        columns = [outputs[:, k] for k in range(len(self.task_names))]  # T × (B,)
        if self.as_dict:
            return dict(zip(self.task_names, columns, strict=True))
        return tuple(columns)


def example_inputs(encoder: Encoder, batch: int = 3) -> tuple[Tensor, ...]:
    """Encoded inputs of the right widths and dtypes (`input_names` order). A batch of at least 2, so that
    exporters do not specialise the batch dimension to the values 0 or 1."""
    sparse = torch.zeros(batch, len(encoder.categorical), dtype=torch.int64)
    dense = torch.zeros(batch, len(encoder.dense_names), dtype=torch.float32)
    if not encoder.lists:
        return sparse, dense
    lists = torch.zeros(batch, encoder.list_width, dtype=torch.int64)  # (B, L)
    lengths = torch.ones(batch, len(encoder.lists), dtype=torch.int64)  # (B, F)
    return sparse, dense, lists, lengths


def export_model(
    model: MultiTaskModel, encoder: Encoder, exp: Experiment, fmt: str, out: str | Path
) -> tuple[Path, Path]:
    """Write the model to `out` in `fmt` and the sidecar to `out` + ".json"; returns both paths."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"Expected the export format to be one of {EXPORT_FORMATS}, but got {fmt!r}")
    names = [t.name for t in exp.tasks]
    inputs_named = input_names(encoder)
    clash = sorted(set(names) & set(inputs_named))
    if clash:
        raise ValueError(f"Task names {clash} clash with the exported inputs {list(inputs_named)}; rename the tasks")
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = Path(str(out) + ".json")
    for path in (out, sidecar):  # both refused before either is written
        check_target(path)
    kinds = [t.kind for t in exp.tasks]
    inputs = example_inputs(encoder)
    if fmt == "onnx":
        atomic_write(out, lambda handle: _export_onnx(TaskOutputs(model, names, kinds), inputs, names, handle.name))
    else:
        with warnings.catch_warnings():
            # The tracer warns about Python branches on weight shapes (constants for a given model), and
            # torch 2.13 marks TorchScript deprecated (ONNX is the format to prefer; see the README).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(TaskOutputs(model, names, kinds, as_dict=True), inputs, strict=False)
            atomic_write(out, lambda handle: torch.jit.save(traced, handle))
    write_json(sidecar, sidecar_dict(encoder, exp, fmt, out.name))
    return out, sidecar


def _export_onnx(module: nn.Module, inputs: tuple[Tensor, ...], names: list[str], path: str) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ValueError(
            "ONNX export needs the `onnx` and `onnxscript` packages: pip install 'plerec[serve]'"
        ) from None
    batch = torch.export.Dim("batch")
    # torch's exporter logs a warning per optional vision operator it cannot register; not ours to show.
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                inputs,
                input_names=list((INPUT_NAMES + LIST_INPUT_NAMES)[: len(inputs)]),
                output_names=names,
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                dynamo=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    program.save(path, external_data=False)  # weights inline unless over protobuf's 2 GB limit


def sidecar_dict(encoder: Encoder, exp: Experiment, fmt: str, file_name: str) -> dict:
    """Everything a runtime needs to turn raw rows into the model's inputs and read its outputs."""
    indicators = set(encoder.indicators)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "model_file": file_name,
        "runtime": fmt,
        "model": exp.model_name,
        "inputs": [
            {
                "name": "sparse",
                "dtype": "int64",
                "shape": ["batch", len(encoder.categorical)],
                "columns": list(encoder.categorical),
            },
            {
                "name": "dense",
                "dtype": "float32",
                "shape": ["batch", len(encoder.dense_names)],
                "columns": encoder.dense_names,
            },
        ],
        "outputs": [
            {
                "name": t.name,
                "kind": t.kind,
                "dtype": "float32",
                "shape": ["batch"],
                "value": "probability" if t.kind == "binary" else "value",
                "rank_weight": t.rank_weight,
            }
            for t in exp.tasks
        ],
        "encoding": {
            "categorical": (
                "sparse[:, j] = 1 + the position of the value in `vocabulary`; 0 for a value not in it or missing "
                "(a column with `hash_buckets` instead: 1 + a fixed BLAKE2b hash of the value's text modulo them)"
            ),
            "numeric": (
                "dense[:, j] = (value - mean) / std; a missing value takes `mean` (so 0) and sets its "
                "`indicator` column to 1 (0 otherwise), or is an error when missing_numeric = 'error'"
            ),
            "dense_order": "the numeric columns in order, then the indicator columns in order",
        },
        "categorical": [_categorical(encoder, c) for c in encoder.categorical],
        "numeric": [
            {
                "column": c,
                "mean": encoder.means[c],
                "std": encoder.stds[c],
                "indicator": f"{c}__missing" if c in indicators else None,
            }
            for c in encoder.numeric
        ],
        "missing_numeric": encoder.missing_numeric,
        "rank": experiment_to_dict(exp)["rank"],
        "encoder": encoder.state_dict(),
    }
    if encoder.lists:
        _describe_lists(sidecar, encoder)
    return sidecar


def _categorical(encoder: Encoder, column: str) -> dict:
    """A categorical column's vocabulary, or, for a hashed one (which has none), its number of buckets."""
    if column in encoder.hash_buckets:
        return {"column": column, "vocabulary": None, "hash_buckets": encoder.hash_buckets[column]}
    return {"column": column, "vocabulary": list(encoder.vocabs[column])}


def _describe_lists(sidecar: dict, encoder: Encoder) -> None:
    """The `lists` and `lengths` inputs and how to build them; only for a model with list fields, so that the
    sidecar of one without them stays as it was."""
    fields, start = [], 0
    for name, spec in encoder.lists.items():
        fields.append({"column": name, "start": start, "max_length": spec["max_length"]})
        start += spec["max_length"]
    sidecar["inputs"] += [
        {"name": "lists", "dtype": "int64", "shape": ["batch", encoder.list_width], "fields": fields},
        {"name": "lengths", "dtype": "int64", "shape": ["batch", len(encoder.lists)], "columns": list(encoder.lists)},
    ]
    sidecar["encoding"]["lists"] = (
        "lists[:, start:start + max_length] = the ids of the row's last `max_length` elements (a list is oldest "
        "first), each looked up as a categorical value is (1 + its position in `vocabulary`, or in the vocabulary "
        "of the categorical column `share`; 0 when not in it), then 0s; a missing list is an empty one"
    )
    sidecar["encoding"]["lengths"] = "lengths[:, f] = how many elements list field f kept (at most its max_length)"
    sidecar["lists"] = [
        {
            **field,
            "pooling": spec["pooling"],
            "target": spec["target"] or None,  # attention: the categorical column its elements are scored against
            "elements": spec["elements"],  # "integer" or "text": the training elements' type
            "separator": spec["separator"],  # between the elements of a CSV cell
            "share": spec["share"] or None,
            "vocabulary": None if spec["share"] else list(encoder.vocabs[name]),
        }
        for field, (name, spec) in zip(fields, encoder.lists.items(), strict=True)
    ]


def load_sidecar(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Sidecar {path} does not exist")
    sidecar = json.loads(path.read_text())
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"Expected {path} to be a plerec export sidecar ({SIDECAR_FORMAT}), but it is not")
    return sidecar
