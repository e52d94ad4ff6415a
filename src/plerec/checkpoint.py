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
import os
import struct
from pathlib import Path
from typing import Any

import torch

MAGIC = b"PLEREC1\n"
HEADER = struct.Struct("<8sQ32s")


def write_checkpoint_file(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise `payload` and replace `path` with it atomically (temporary file, fsync, rename)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    header = HEADER.pack(MAGIC, len(body), hashlib.sha256(body).digest())
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(header)
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file, after its length and checksum have been verified."""
    path = Path(path)
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
    return payload


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible on every platform."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Every key whose value differs between two experiment dictionaries, as `key: saved -> current`.

    Lists of tables with a `name` (the tasks) are compared by name, so a reordering is reported clearly.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                found.append(f"{where}: (absent) -> {current[key]!r}")
            elif key not in current:
                found.append(f"{where}: {saved[key]!r} -> (absent)")
            else:
                found.extend(differences(saved[key], current[key], where))
        return found
    if _named_tables(saved) and _named_tables(current):
        saved_names = [t["name"] for t in saved]
        current_names = [t["name"] for t in current]
        if saved_names != current_names:
            return [f"{prefix} names: {saved_names} -> {current_names}"]
        return [d for a, b in zip(saved, current, strict=True) for d in differences(a, b, f"{prefix}.{a['name']}")]
    if _normalise(saved) != _normalise(current):
        return [f"{prefix}: {saved!r} -> {current!r}"]
    return []


def _named_tables(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, dict) and "name" in v for v in value) and bool(value)


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


__all__ = ["differences", "read_checkpoint_file", "write_checkpoint_file"]
