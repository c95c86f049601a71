"""Metrics of the three tasks: ranking (Kendall τ), regression (R², MSE), classification."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import kendalltau
from torch import Tensor

__all__ = ["kendall_tau", "r2_score", "mse", "accuracy"]


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def kendall_tau(pred: Tensor | np.ndarray, true: Tensor | np.ndarray) -> float:
    """Kendall's τ-b (``scipy.stats.kendalltau``) between predictions and targets.

    Constant predictions (or targets) rank nothing: τ is reported as 0, not NaN.
    """
    p, t = _np(pred), _np(true)
    if p.size < 2:
        return 0.0
    tau = kendalltau(p, t).statistic
    return 0.0 if tau is None or math.isnan(tau) else float(tau)


def r2_score(pred: Tensor | np.ndarray, true: Tensor | np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (0 when the targets are constant)."""
    p, t = _np(pred), _np(true)
    ss_tot = float(((t - t.mean()) ** 2).sum()) if t.size else 0.0
    if ss_tot == 0.0:
        return 0.0
    return 1.0 - float(((t - p) ** 2).sum()) / ss_tot


def mse(pred: Tensor | np.ndarray, true: Tensor | np.ndarray) -> float:
    """Mean squared error."""
    p, t = _np(pred), _np(true)
    return float(((p - t) ** 2).mean()) if p.size else 0.0


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``logits [N, C]`` against integer ``labels [N]``."""
    if labels.numel() == 0:
        return 0.0
    return float((logits.argmax(-1).cpu() == labels.view(-1).cpu()).float().mean())
