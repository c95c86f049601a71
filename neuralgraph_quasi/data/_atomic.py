"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Every helper writes to a temporary file in the destination's directory (same
file system, so the final :func:`os.replace` is atomic), flushes and
``fsync`` s it, then renames it over the destination. If writing fails or is
interrupted, the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = ["atomic_open", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "atomic_save_numpy", "fsync_paths", "TMP_SUFFIX"]

#: Suffix of the temporary files (``.<name>.<random>.tmp``); safe to delete when no writer runs.
TMP_SUFFIX = ".tmp"

# mkstemp creates files readable by their owner only; written files get the usual
# permissions instead (0o666 minus the umask, read once at import: os.umask can only be
# read by setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = True,
                **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit, move it onto ``path``.

    Args:
        path: destination; its directory is created if missing.
        mode: ``"wb"`` or ``"w"`` (text; ``kwargs`` go to :func:`open`, e.g. ``newline=""``).
        fsync: flush the data to disk before the rename (durability across power loss;
            the rename is atomic either way).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            os.chmod(tmp, 0o666 & ~_UMASK)
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""
    with atomic_open(path, "w", fsync=fsync, encoding="utf-8", newline="") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, fsync: bool = True) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", fsync=fsync)


def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    """``rows`` as CSV text with header ``columns`` and ``\\n`` line ends."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], columns: Sequence[str],
                     fsync: bool = True) -> None:
    """Write ``rows`` as a CSV with header ``columns`` atomically."""
    atomic_write_text(path, csv_text(rows, columns), fsync=fsync)


def atomic_torch_save(obj: Any, path: str | os.PathLike, fsync: bool = True) -> None:
    """:func:`torch.save` ``obj`` to ``path`` atomically."""
    with atomic_open(path, "wb", fsync=fsync) as handle:
        torch.save(obj, handle)


def atomic_save_numpy(path: str | os.PathLike, array: np.ndarray, fsync: bool = True) -> None:
    """:func:`numpy.save` ``array`` to exactly ``path`` (no ``.npy`` appended) atomically."""
    with atomic_open(path, "wb", fsync=fsync) as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def fsync_paths(paths: list[str | os.PathLike]) -> None:
    """Flush already written files, and their directories, to disk.

    Writing many files with ``fsync=False`` and then calling this once is several times
    cheaper than an ``fsync`` per write, and still makes them durable before, say, an
    index that names them is written.
    """
    dirs = set()
    for path in paths:
        _fsync(path, os.O_RDONLY)
        dirs.add(os.path.dirname(os.path.abspath(path)))
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        for directory in sorted(dirs):
            _fsync(directory, os.O_RDONLY)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
