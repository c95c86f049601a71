"""Run directories: one per run, and a resume only of the same run.

Two runs started in the same second get the same timestamped ``output_dir``; each run
therefore claims its directory by holding an exclusive lock on ``<dir>/run.lock`` for its
lifetime (released by the OS if the process dies). A directory whose lock is held, or that
already holds a run's outputs (``last.ckpt``, ``metrics.json``), is not reused: the run
goes to ``<dir>_2``, ``<dir>_3``, ... and says so in the log.

A resumed run must be the run it continues: :func:`check_resume_identity` compares the
keys of :data:`IDENTITY` with those recorded in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ._checkpoint import CheckpointError

__all__ = ["RUN_LOCK", "IDENTITY", "RunDir", "claim_run_dir", "run_identity",
           "check_resume_identity"]

log = logging.getLogger(__name__)

RUN_LOCK = "run.lock"
#: Outputs that mark a directory as a run's (a new run never writes over them).
_OUTPUTS = ("last.ckpt", "metrics.json")
#: Config keys that make a run what it is: resuming with another value is refused.
IDENTITY = ("dataset.name", "dataset.root", "dataset.num_models", "dataset.generator",
            "dataset.loader", "min_accuracy", "model._target_", "width", "depth", "task",
            "loss")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, outputs still checked
    fcntl = None


class RunDir:
    """A claimed run directory; :meth:`release` (or the process's end) frees it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _try_lock(path: Path) -> int | None:
    """An fd holding ``path/run.lock`` exclusively, or ``None`` when another process holds
    it (or the directory already holds a run's outputs)."""
    path.mkdir(parents=True, exist_ok=True)
    if any((path / name).exists() for name in _OUTPUTS):
        return None
    fd = os.open(path / RUN_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    if fcntl is None:  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if any((path / name).exists() for name in _OUTPUTS):  # finished while we locked
        os.close(fd)
        return None
    return fd


def claim_run_dir(path: str | Path, attempts: int = 1000) -> RunDir:
    """``path``, or the first free ``<path>_<n>`` (n = 2, 3, ...), locked for this run."""
    path = Path(path)
    for n in range(1, attempts + 1):
        candidate = path if n == 1 else path.with_name(f"{path.name}_{n}")
        fd = _try_lock(candidate)
        if fd is not None:
            if n > 1:
                log.warning("run directory %s is in use or holds another run's outputs: "
                            "writing to %s", path, candidate)
            return RunDir(candidate, fd)
    raise RuntimeError(f"no free run directory {path}_<n> for n < {attempts}")


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_identity(config: dict) -> dict[str, Any]:
    """The values of :data:`IDENTITY` in a resolved config (``None`` where absent)."""
    return {key: _get(config, key) for key in IDENTITY}


def check_resume_identity(saved: dict, current: dict, checkpoint: str | Path) -> None:
    """Refuse to resume the run ``checkpoint`` records with a config of another identity.

    Raises:
        CheckpointError: one line naming the checkpoint and the keys that differ.
    """
    before, now = run_identity(saved), run_identity(current)
    differ = [key for key in IDENTITY if json.dumps(before[key], sort_keys=True, default=str)
              != json.dumps(now[key], sort_keys=True, default=str)]
    if differ:
        shown = "; ".join(f"{key}: run {_short(before[key])}, now {_short(now[key])}"
                          for key in differ)
        raise CheckpointError(f"cannot resume {checkpoint}: the config differs from the "
                              f"run's: {', '.join(differ)} ({shown}). Resume with the run's "
                              "settings, or start a new run without trainer.resume")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


#: The directory this process's current run holds (at most one: a new run releases it).
_held: RunDir | None = None


def claim_output_dir(path: str | Path, dist) -> Path:
    """The directory a new run writes to: claimed by the main process (see
    :func:`claim_run_dir`) and shared with the other ranks of a distributed run."""
    global _held
    release_output_dir()
    chosen = Path(path)
    if dist.main:
        _held = claim_run_dir(chosen)
        chosen = _held.path
    if dist.enabled:
        import torch.distributed as torch_dist

        box = [str(chosen)]
        torch_dist.broadcast_object_list(box, src=0)
        chosen = Path(box[0])
    return chosen


def release_output_dir() -> None:
    """Free the directory this process's last run claimed (a finished run's outputs keep
    it from being reused anyway)."""
    global _held
    if _held is not None:
        _held.release()
        _held = None
