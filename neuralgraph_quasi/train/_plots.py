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


def plot_alpha(end: dict, path: str | Path, init: dict | None = None) -> Path:
    """Distributions of α over a whole split (:func:`~neuralgraph_quasi.train._report.
    alpha_report`), at initialisation (grey) and after training (purple): the scales of
    the scalable units, and ``‖M − I‖_F``, ``‖N − I‖_F`` per head; ε in the titles."""
    panels = [(key, label) for key, label in
              (("scales", "scale s_j (scalable units)"), ("M_dev", "||M - I||_F per head"),
               ("N_dev", "||N - I||_F per head")) if end.get(key) is not None
              and end[key].numel()]
    if not panels:  # e.g. SIRENs: sine units take no positive scale, and no attention
        fig, ax = plt.subplots(figsize=(5, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "alpha has nothing to act on in these networks:\n"
                "no positively scalable units, no attention heads", ha="center", va="center")
        return _save(fig, Path(path))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    kinds = {"scales": "scale", "M_dev": "qk", "N_dev": "vo"}
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        values = end[key].detach().double().cpu().numpy()
        parts = [values]
        if init and init.get(key) is not None and init[key].numel():
            parts.append(init[key].detach().double().cpu().numpy())
        lo, hi = min(p.min() for p in parts), max(p.max() for p in parts)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
        if len(parts) > 1:
            ax.hist(parts[1], bins=bins, color="tab:gray", alpha=0.6,
                    label=f"init (eps {init['eps'][kinds[key]]:.3g})")
        ax.hist(values, bins=bins, color="tab:purple", alpha=0.7,
                label=f"trained (eps {end['eps'][kinds[key]]:.3g})")
        ax.set_title(f"{label}: std {values.std():.3g}", fontsize=9)
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    return _save(fig, Path(path))
