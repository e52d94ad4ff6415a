"""Every file plerec writes: only a regular file or a new path is ever replaced, atomically, and a run
folder is trained in by one process at a time.

`atomic_write` refuses a target that is a symlink, a device, a FIFO, a socket or a folder (renaming over
`/dev/null` as root would replace the host's device node). It writes to a temporary file next to the
target, created exclusively and without following links under a name no other process uses
(`.NAME.<pid>.<random>.tmp`), so neither a link planted at a predictable name nor a second writer can
redirect or mix the data; then flushes, fsyncs, renames it over the target and fsyncs the folder, so a
crash leaves the old file or the new one. On any failure (a full disk included) the temporary file is
removed and the previous file is left as it was.

`hold_run_lock` takes an exclusive `flock` on FOLDER/.lock; the kernel releases it when the process
ends, so the lock file of a process that died blocks nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

LOCK_FILE = ".lock"

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def check_target(path: str | Path) -> bool:
    """Whether `path` exists; a ValueError unless it is missing or a regular file (links not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode):
        return True
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise ValueError(
        f"Expected the output {path} to be a regular file or a new path, but it is {kind}: "
        "plerec never replaces one. Choose another path"
    )


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(handle)` on a binary handle to a fresh temporary file and rename it over `path`.

    A writer that only takes a file name may write to `handle.name` (the temporary file, already created).
    """
    path = Path(path)
    existed = check_target(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    created = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        created = True
        with os.fdopen(fd, "wb") as handle:
            handle.raw.name = str(tmp)  # not the descriptor's number: for writers that take a file name
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        check_target(path)  # the target may have been replaced by a link or a device while we wrote
        os.replace(tmp, path)
    except BaseException as err:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError):
            kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
            reason = err.strerror or str(err)
            failure = OSError(f"Could not write {path}: {reason}; {kept}")
            failure.errno = err.errno
            raise failure from err
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


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


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on FOLDER/.lock (the folder is created); a ValueError if another process does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    check_target(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ValueError(
                f"{folder} is in use by another plerec training (lock held on {path}, pid {holder}): "
                "wait for it or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


__all__ = [
    "LOCK_FILE",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_target",
    "run_lock",
]
