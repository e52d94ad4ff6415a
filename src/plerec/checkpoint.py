"""Checkpoint files: written atomically and durably, verified by a checksum, read without running code.

A checkpoint file is a 48-byte header followed by a `torch.save` body:

    magic (8 bytes, b"PLEREC1\\n") | body length (8 bytes, little-endian) | SHA-256 of the body (32 bytes)

Writing goes to a temporary file in the same folder, which is flushed, fsync'ed and renamed over the
target (then the folder is fsync'ed), so a crash at any moment leaves either the old file or the new
one, never a mixture. Reading checks the length and the checksum before the body is deserialised with
`torch.load(weights_only=True)`, which accepts tensors and plain containers only: a checkpoint cannot
run code. A truncated or corrupted file is reported as such, never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plerec.safe_io import atomic_write

MAGIC = b"PLEREC1\n"
HEADER = struct.Struct("<8sQ32s")


def write_checkpoint_file(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise `payload` and replace `path` with it atomically (temporary file, fsync, rename)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    header = HEADER.pack(MAGIC, len(body), hashlib.sha256(body).digest())
    atomic_write(path, lambda handle: (handle.write(header), handle.write(body)))


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file, after its length and checksum have been verified; a model checkpoint
    or a training state is also checked key by key (`check_payload`)."""
    path = Path(path)
    payload, size = _read_payload(path)
    if payload.get("format") in WEIGHTS_KEY:
        check_payload(path, payload, size)
    return payload


def _read_payload(path: Path) -> tuple[dict[str, Any], int]:
    """The deserialised body of a checkpoint file and its length in bytes."""
    if not path.is_file():
        raise ValueError(f"Checkpoint {path} does not exist")
    raw = path.read_bytes()
    if len(raw) < HEADER.size or not raw.startswith(MAGIC):
        raise ValueError(
            f"Expected {path} to be a plerec checkpoint (starting with {MAGIC!r}), but it is not "
            f"({len(raw)} bytes; a file written by torch.save or by another program is not accepted)"
        )
    _magic, length, digest = HEADER.unpack_from(raw)
    body = memoryview(raw)[HEADER.size :]
    if len(body) != length:
        raise ValueError(
            f"Checkpoint {path} is truncated or padded: its header announces {length} bytes of data, "
            f"but the file holds {len(body)}. Use an earlier checkpoint or retrain"
        )
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(
            f"Checkpoint {path} is corrupted: the SHA-256 checksum of its {length} bytes does not match "
            "the one written with it. Use an earlier checkpoint or retrain"
        )
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as err:  # a body that passes the checksum but was not written by plerec
        raise ValueError(f"Checkpoint {path} could not be read safely (weights only): {err}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"Expected {path} to hold a dictionary, but it holds {type(payload).__name__}")
    return payload, len(body)


# The payloads plerec writes (plerec.train), each with the key of the model's weights, and what they hold.
MODEL_FORMAT = "plerec-checkpoint-1"
STATE_FORMAT = "plerec-training-state-1"
WEIGHTS_KEY = {MODEL_FORMAT: "state_dict", STATE_FORMAT: "model"}
PAYLOAD_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    MODEL_FORMAT: {"model_name": str, "experiment": dict, "encoder": dict, "state_dict": dict},
    STATE_FORMAT: {
        "experiment": dict,
        "encoder": dict,
        "model": dict,
        "optimizers": list,
        "best_state": (dict, type(None)),
        "progress": dict,
        "running": torch.Tensor,
        "source": dict,
        "rng": torch.Tensor,
    },
}
OPTIONAL_WEIGHTS = ("output_scale", "output_shift")  # absent from checkpoints made before standardised labels


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checked model checkpoint or training state: its payload, experiment, encoder and model weights."""

    payload: dict[str, Any]
    experiment: Any  # plerec.config.Experiment
    encoder: Any  # plerec.data.encode.Encoder
    weights: dict[str, torch.Tensor]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A model checkpoint (best.pt) or training state (last.pt), after every check of `check_payload`."""
    path = Path(path)
    payload, size = _read_payload(path)
    if payload.get("format") not in WEIGHTS_KEY:
        raise ValueError(
            f"Expected {path} to be a plerec checkpoint ({MODEL_FORMAT}) or training state ({STATE_FORMAT}), "
            f"but its key `format` is {payload.get('format', '(missing)')!r}"
        )
    return check_payload(path, payload, size)


def check_payload(path: Path, payload: dict[str, Any], size: int) -> Checkpoint:
    """Every key of a checkpoint payload present with its type; the model its experiment and encoder describe
    within the size limits of plerec.models.family, and small enough for the file (`size` bytes of data) to
    hold its weights; the weights of that model's every shape and dtype. Nothing is allocated
    before these checks pass: the model is sized on the meta device."""
    from plerec.config import experiment_from_dict
    from plerec.data.encode import Encoder
    from plerec.models.family import state_shapes

    fmt = payload["format"]
    for key, kind in PAYLOAD_KEYS[fmt].items():
        if key not in payload:
            raise ValueError(f"Checkpoint {path} is incomplete: its key `{key}` is missing")
        if not isinstance(payload[key], kind):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(
                f"Expected key `{key}` of checkpoint {path} to be {expected}, but got {type(payload[key]).__name__}"
            )
    try:
        exp = experiment_from_dict(payload["experiment"], source=str(path))
    except (ValueError, TypeError, RecursionError) as err:
        raise ValueError(f"Checkpoint {path}, key `experiment`: {err}") from None
    if "model_name" in payload and payload["model_name"] != exp.model_name:
        raise ValueError(
            f"Expected key `model_name` of checkpoint {path} to be its experiment's model {exp.model_name!r}, "
            f"but got {payload['model_name']!r}"
        )
    try:
        encoder = Encoder.from_state_dict(payload["encoder"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"Checkpoint {path}, key `encoder`: {err}") from None
    try:
        shapes = state_shapes(exp.model_name, exp.model, num_tasks=len(exp.tasks), **encoder.model_inputs())
    except ValueError as err:
        raise ValueError(f"Checkpoint {path} describes a model that cannot be built: {err}") from None
    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
    if needed > size:
        raise ValueError(
            f"Checkpoint {path} cannot hold the model its experiment and encoder describe: its weights take "
            f"{needed} bytes, but the file holds {size} bytes of data"
        )
    weights_key = WEIGHTS_KEY[fmt]
    _check_weights(path, weights_key, payload[weights_key], shapes, exp.model_name)
    if fmt == STATE_FORMAT and payload["best_state"] is not None:
        _check_weights(path, "best_state", payload["best_state"], shapes, exp.model_name)
    return Checkpoint(payload, exp, encoder, payload[weights_key])


def _check_weights(path: Path, key: str, weights: dict, shapes: dict, model_name: str) -> None:
    problems = [f"missing {k}" for k in shapes if k not in weights and k not in OPTIONAL_WEIGHTS]
    problems += [f"unexpected {k!r}" for k in weights if k not in shapes]
    for k, (shape, dtype) in shapes.items():
        found = weights.get(k)
        if found is None:
            continue
        if not isinstance(found, torch.Tensor) or found.layout != torch.strided:
            problems.append(f"{k} is a {type(found).__name__}, expected a dense tensor")
        elif tuple(found.shape) != shape:
            problems.append(f"{k} has shape {tuple(found.shape)}, expected {shape}")
        elif found.dtype != dtype:
            problems.append(f"{k} has dtype {found.dtype}, expected {dtype}")
    if problems:
        raise ValueError(
            f"The weights in {path} (key `{key}`) do not fit the model its experiment describes ({model_name}): "
            + "; ".join(problems[:8])
        )


def differences(saved: Any, current: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    """Every key whose value differs between two experiment dictionaries, as `key: saved -> current`.

    Lists of tables with a `name` (the tasks) are compared by name, so a reordering is reported clearly.
    `defaults` (config.key_defaults(), or its part for `prefix`) holds every key's default: a key that
    `saved` lacks and `current` holds at its default is not a change (a record written before plerec had
    the key was computed as the default computes); held at another value, it is reported as
    `key: (absent, so default) -> current`.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        defaults = defaults if isinstance(defaults, dict) else {}
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                if key not in defaults:
                    found.append(f"{where}: (absent) -> {current[key]!r}")
                elif _normalise(defaults[key]) != _normalise(current[key]):
                    found.append(f"{where}: (absent, so {defaults[key]!r}) -> {current[key]!r}")
            elif key not in current:
                found.append(f"{where}: {saved[key]!r} -> (absent)")
            else:
                found.extend(differences(saved[key], current[key], where, defaults.get(key)))
        return found
    if _named_tables(saved) and _named_tables(current):
        saved_names = [t["name"] for t in saved]
        current_names = [t["name"] for t in current]
        if saved_names != current_names:
            return [f"{prefix} names: {saved_names} -> {current_names}"]
        return [
            d for a, b in zip(saved, current, strict=True) for d in differences(a, b, f"{prefix}.{a['name']}", defaults)
        ]
    if _normalise(saved) != _normalise(current):
        return [f"{prefix}: {saved!r} -> {current!r}"]
    return []


def _named_tables(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, dict) and "name" in v for v in value) and bool(value)


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


__all__ = [
    "Checkpoint",
    "check_payload",
    "differences",
    "read_checkpoint",
    "read_checkpoint_file",
    "write_checkpoint_file",
]
