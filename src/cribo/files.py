"""Files that are never half-written: atomic writes (temp file, fsync, rename), a full disk told apart, file types
checked before opening.

Every writer of the project goes through here, so a killed or failing write leaves the previous file as it was and
at most a temp file ``.<name>.tmp-<pid>`` beside it (:data:`TEMP_PATTERN`, which a resumed run removes).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TEMP_PATTERN",
    "DiskFullError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_regular_file",
    "disk_full_cause",
    "temp_path",
]

TEMP_PATTERN = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")  # the temp files of temp_path


class DiskFullError(OSError):
    """A file could not be written for lack of space; the file it would have replaced is intact."""


def temp_path(path: Path) -> Path:
    """The temp file a write of ``path`` goes through: ``.<name>.tmp-<pid>`` in the same folder."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform allows it."""
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


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` always holds either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that ``path`` always holds either the old or the new bytes (no temp file left on failure)."""
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that ``path`` always holds either the old or the new text."""
    atomic_write_bytes(path, text.encode())


def disk_full_cause(error: BaseException) -> OSError | None:
    """The ENOSPC error behind ``error`` (itself or one it was raised from), else None. torch.save reports a full
    disk as a RuntimeError chained to the OSError of the failed write."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """Raise OSError unless ``path`` (links followed) is a regular file: opening a FIFO blocks until something
    writes to it, and a device file may never end, so their type is checked before they are opened."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or folder"
        raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))
