"""Run logs: a CSV file rewritten atomically from the history, and TensorBoard events.

TensorBoard is optional: without the ``tensorboard`` package only the CSV is written.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..data._atomic import atomic_write_csv

__all__ = ["RunLogger"]

log = logging.getLogger(__name__)


class RunLogger:
    """Log rows (dicts of numbers) to ``<dir>/log.csv`` and ``<dir>/tensorboard/``.

    The CSV is rewritten from :attr:`history` on every row, so a resumed run (whose
    history comes back from its checkpoint) continues the same file.
    """

    def __init__(self, directory: str | Path, tensorboard: bool = True,
                 history: list[dict] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = list(history or [])
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed
                log.info("tensorboard is not installed: logging to log.csv only")
            else:
                self._writer = SummaryWriter(str(self.directory / "tensorboard"))

    def log(self, row: dict) -> None:
        self.history.append(dict(row))
        columns: list[str] = []
        for r in self.history:
            columns += [k for k in r if k not in columns]
        atomic_write_csv(self.directory / "log.csv", self.history, columns)
        if self._writer is not None:
            step = int(row.get("step", len(self.history)))
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, int | float) \
                        and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
