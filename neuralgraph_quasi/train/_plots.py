"""Figures of a run (matplotlib, Agg backend): predictions, learning curves, learned α."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["plot_predictions", "plot_learning_curves", "plot_alpha"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_predictions(pred: torch.Tensor, true: torch.Tensor, path: str | Path,
                     title: str = "", baseline: torch.Tensor | None = None) -> Path:
    """Predicted against true accuracy on the test set (the diagonal is a perfect model)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    t = true.numpy()
    if baseline is not None:
        ax.scatter(t, baseline.numpy(), s=8, alpha=0.5, color="tab:gray", label="STATNN")
    ax.scatter(t, pred.numpy(), s=8, alpha=0.7, color="tab:blue", label="model")
    lo, hi = float(min(t.min(), pred.min())), float(max(t.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    ax.set_xlabel("true accuracy")
    ax.set_ylabel("predicted accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_learning_curves(histories: dict[str, list[dict]], path: str | Path,
                         score: str) -> Path:
    """Training loss and validation score per epoch, one line per trained model."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, history in histories.items():
        epochs = [r["epoch"] for r in history]
        left.plot(epochs, [r["train_loss"] for r in history], label=name)
        right.plot(epochs, [r.get(f"val_{score}", np.nan) for r in history], label=name)
    left.set_xlabel("epoch")
    left.set_ylabel("train loss")
    left.set_yscale("log")
    right.set_xlabel("epoch")
    right.set_ylabel(f"val {score}")
    right.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_alpha(alpha: dict[str, torch.Tensor], path: str | Path) -> Path | None:
    """Histograms of the learned α on test graphs: each entry a 1-D tensor of values
    (e.g. ``scales``; ``gl_deviation``: ‖α - I‖ per GL factor)."""
    alpha = {k: v.detach().float().cpu().reshape(-1) for k, v in alpha.items() if v.numel()}
    if not alpha:
        return None
    fig, axes = plt.subplots(1, len(alpha), figsize=(4 * len(alpha), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], alpha.items(), strict=True):
        ax.hist(values.numpy(), bins=50, color="tab:purple")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("count")
    return _save(fig, Path(path))
