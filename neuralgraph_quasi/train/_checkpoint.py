"""Training checkpoints: written atomically, read back with a clear error when damaged.

A checkpoint holds everything to continue a run exactly where it stopped: the model,
optimizer and scheduler states, the RNG states (Python, NumPy, torch CPU and CUDA),
the step, the epoch and the batch reached within it, the best score so far, the
history of logged rows, and the run's config.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data._atomic import atomic_torch_save

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state"]

#: Keys every training checkpoint has.
REQUIRED = ("model", "optimizer", "scheduler", "rng", "step", "epoch", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or lacks what resuming needs (the message names it)."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a reader never sees a partial file)."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: naming ``path``, when it is missing, truncated, not a torch
            file, or lacks a key that resuming needs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # Our own files: they hold RNG states (NumPy arrays, tuples), not only tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError,
            ValueError, io.UnsupportedOperation, AttributeError, ImportError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or truncated "
                              f"({type(exc).__name__}: {exc}). Delete it to start over, or "
                              f"resume from another run directory.") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a "
                              f"training checkpoint")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a training checkpoint "
                              f"of neuralgraph_quasi.train")
    return state
