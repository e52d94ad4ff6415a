"""What a run was computed from: the experiment's keys, and its data files by size, schema and a content hash.

`plerec compare` keeps one in each run's run.json and training keeps one in last.pt, so that a rerun after
the experiment or the data changed trains again (compare) or is refused (`--resume`) rather than reusing a
run of something else. A file's modification time is not used: a copy keeps or changes it regardless of
the bytes. The content hash (BLAKE2b) covers the whole of a small file, and of a large one its first and
last MiB and four 64 KiB chunks at fixed fractions of its size: a few MiB read per file, whatever its size,
which finds a file rewritten, regenerated, truncated or appended to (not a single byte changed in the
middle of a large file outside the sample; Parquet pages carry their own checksums for that).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import zlib
from pathlib import Path

from plerec.config import DataConfig, Experiment, experiment_to_dict

END_BYTES = 1 << 20  # hashed at each end of a file
CHUNK_BYTES = 64 << 10  # hashed at each fixed fraction of the size below
FRACTIONS = (0.2, 0.4, 0.6, 0.8)
DATA_ROLES = ("path", "train", "valid", "test")

# Keys that change how a run goes or is shown, never what it computes. `train.epochs` and `train.patience`
# may differ on `--resume` (train.RESUMABLE_CHANGES: a finished run can be extended), but a finished run of
# 2 epochs is not a run of 4: for `compare` they count.
NO_EFFECT = (
    "train.progress",
    "train.threads",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.device",
    "train.compile",  # the same step, fused: equal to eager within float tolerance (tests/test_compile.py)
    "train.compile_cache",
    "train.log_format",
    "train.tensorboard",
    "train.tensorboard_dir",
    "train.mlflow",
    "train.mlflow_uri",
    "train.mlflow_experiment",
    "rank",
)


def run_fingerprint(exp: Experiment, data: dict | None = None) -> dict:
    """The experiment (every key that changes what is computed) and the data (`data_fingerprint`)."""
    return {"experiment": experiment_fingerprint(exp), "data": data_fingerprint(exp.data) if data is None else data}


def experiment_fingerprint(exp: Experiment, ignore: tuple[str, ...] = NO_EFFECT) -> dict:
    """experiment_to_dict(exp) without the `ignore` keys (`section` or `section.key`)."""
    values = experiment_to_dict(exp)
    for key in ignore:
        section, _, name = key.partition(".")
        if not name:
            values.pop(section, None)
        elif isinstance(values.get(section), dict):
            values[section].pop(name, None)
    return values


def data_fingerprint(data: DataConfig) -> dict:
    """Each data path of the experiment ([data] path, train, valid, test; the prepared encoder): for each of
    its files, the size, a content hash and, where cheap, the schema and row count (Parquet metadata) or the
    header (CSV)."""
    paths = {role: getattr(data, role) for role in DATA_ROLES if getattr(data, role)}
    if data.prepared:
        paths["prepared"] = str(Path(data.prepared) / "encoder.json")
    return {role: path_fingerprint(path) for role, path in paths.items()}


def path_fingerprint(path: str | Path) -> dict:
    """{"path", "folder", "files": {name: file fingerprint}}: one file, or every *.parquet file under a folder."""
    path = Path(path)
    if path.is_dir():
        files = {str(f.relative_to(path)): f for f in sorted(path.rglob("*.parquet"))}
    else:
        files = {path.name: path} if path.exists() else {}
    return {
        "path": str(path),
        "folder": path.is_dir(),
        "files": {name: file_fingerprint(f) for name, f in files.items()},
    }


def file_fingerprint(path: Path) -> dict:
    info = path.stat()  # the cache key only: the same file unchanged is not hashed again by one process
    return dict(_file_fingerprint(str(path), info.st_size, info.st_mtime_ns, info.st_ino))


@functools.lru_cache(maxsize=4096)
def _file_fingerprint(path: str, size: int, _mtime_ns: int, _inode: int) -> tuple:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= 2 * END_BYTES + len(FRACTIONS) * CHUNK_BYTES:
            digest.update(f.read())
        else:
            for offset, length in [(0, END_BYTES), *((int(size * q), CHUNK_BYTES) for q in FRACTIONS)]:
                f.seek(offset)
                digest.update(f.read(length))
            f.seek(size - END_BYTES)
            digest.update(f.read(END_BYTES))
    found = {"size": size, "blake2b": digest.hexdigest()}
    name = path.lower()
    if name.endswith((".parquet", ".pq")):
        from plerec.data.table import open_parquet

        reader = open_parquet(Path(path))
        found["rows"] = reader.metadata.num_rows
        found["schema"] = [f"{field.name}: {field.type}" for field in reader.schema_arrow]
    elif not name.endswith(".json"):
        found["header"] = _first_line(path)
    return tuple(found.items())


def _first_line(path: str) -> str | None:
    """The CSV's first line (its header, or its first row), None where it cannot be read (a broken gzip
    stream: reading the data reports it, naming the file)."""
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            return f.readline(64 << 10).decode("utf-8", "replace").rstrip("\r\n")
    except (OSError, EOFError, zlib.error):
        return None


def data_changes(saved: dict | None, current: dict) -> list[tuple[str, str]]:
    """(file, what changed) for every data file that differs between two `data_fingerprint`s, e.g.
    ("data.csv", "size 1000 -> 1200 bytes"). A path that only one of them has is a change of the experiment
    (its [data] key), reported there."""
    saved = saved or {}
    found = []
    for role in DATA_ROLES + ("prepared",):
        if role not in saved or role not in current or saved[role]["path"] != current[role]["path"]:
            continue
        root, before, now = Path(current[role]["path"]), saved[role]["files"], current[role]["files"]
        folder = saved[role].get("folder", False) or current[role]["folder"]
        for name in sorted(set(before) | set(now)):
            where = str(root / name) if folder else str(root)
            if name not in now:
                found.append((where, f"it was removed from {root}" if folder else "it is gone"))
            elif name not in before:
                found.append((where, f"it was added to {root}"))
            elif (detail := _file_change(before[name], now[name])) is not None:
                found.append((where, detail))
    return found


def _file_change(before: dict, now: dict) -> str | None:
    if before == now:
        return None
    parts = []
    if before.get("size") != now.get("size"):
        parts.append(f"size {before.get('size')} -> {now.get('size')} bytes")
    if before.get("rows") != now.get("rows"):
        parts.append(f"rows {before.get('rows')} -> {now.get('rows')}")
    if before.get("schema") != now.get("schema"):
        added = [c for c in now.get("schema") or [] if c not in (before.get("schema") or [])]
        removed = [c for c in before.get("schema") or [] if c not in (now.get("schema") or [])]
        parts.append(f"columns added {added}, removed {removed}" if added or removed else "columns reordered")
    if before.get("header") != now.get("header"):
        parts.append(f"header {before.get('header')!r} -> {now.get('header')!r}")
    if not parts:
        parts.append(f"its content differs, at the same size of {now.get('size')} bytes")
    return ", ".join(parts)
