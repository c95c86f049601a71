"""Up-front checks of a training config: a degenerate setting stops the run before any work,
with one line naming the key (``trainer.batch_size=0: must be an integer >= 1``)."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ._tasks import TASKS

__all__ = ["ConfigError", "validate_config"]

_TASKS = (*TASKS, "edit")
_LOSSES = ("bce", "mse")
_SCHEDULERS = ("cosine", "constant")


class ConfigError(ValueError):
    """A training setting that cannot work; the message names the key and the rule."""


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def _show(key: str, value: Any) -> str:
    return f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"


def _integer(cfg, key: str, minimum: int = 1, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not ok:
        rule = f"an integer >= {minimum}"
        raise ConfigError(f"{_show(key, value)}: must be {'null or ' if optional else ''}{rule}")


def _number(cfg, key: str, low: float, high: float, *, high_open: bool = False,
            low_open: bool = False, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value) and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        if math.isinf(high):
            interval = f"{'(' if low_open else '['}{low:g}, inf)"
        raise ConfigError(f"{_show(key, value)}: must be {'null or ' if optional else ''}"
                          f"in {interval}")


def _choice(cfg, key: str, choices: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{_show(key, value)}: must be one of {', '.join(choices)}")


def validate_config(cfg: DictConfig) -> None:
    """Check the settings every run uses (after hydra composition, before any work).

    Raises:
        ConfigError: one line naming the first bad key, its value and the rule.
    """
    _choice(cfg, "task", _TASKS)
    if cfg.get("task") == "predict":
        _choice(cfg, "loss", _LOSSES)
    for key in ("trainer.batch_size", "trainer.epochs"):
        _integer(cfg, key)
    for key in ("trainer.eval_batch_size", "trainer.baseline_epochs", "trainer.max_steps",
                "trainer.log_every"):
        _integer(cfg, key, optional=True)
    _number(cfg, "trainer.warmup_fraction", 0, 1, high_open=True)
    _number(cfg, "trainer.grad_clip", 0, math.inf, low_open=True, optional=True)
    if _get(cfg, "trainer.scheduler") is not None:
        _choice(cfg, "trainer.scheduler", _SCHEDULERS)
    _number(cfg, "optim.lr", 0, math.inf, low_open=True, optional=True)
    for key in ("width", "depth"):
        _integer(cfg, key, optional=True)
    _number(cfg, "min_accuracy", 0, 1, optional=True)
    _integer(cfg, "seed", minimum=0, optional=True)
