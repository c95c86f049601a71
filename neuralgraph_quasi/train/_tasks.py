"""What a run learns: the loss on a batch, how outputs become predictions, the metrics.

A task turns the model's raw output ``[B, out_dim]`` (or an edited batch) into a loss and
into per-graph predictions; :meth:`Task.metrics` scores a whole split. Every task has a
``score`` metric (higher is better) on which the best checkpoint is chosen.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ._metrics import accuracy, kendall_tau, mse, r2_score

__all__ = ["Task", "PredictAccuracy", "Classify", "TASKS"]


class Task:
    """Base class: loss, predictions and metrics of one kind of target."""

    #: ``task`` argument given to models that take one (QuasiGNN: ``"predict"`` or ``"edit"``).
    model_task = "predict"
    #: metric names, the first being the model-selection score (higher is better).
    score_name = "score"

    def __init__(self, out_dim: int = 1) -> None:
        self.out_dim = out_dim

    def loss(self, out, batch) -> Tensor:
        raise NotImplementedError

    def predict(self, out, batch) -> Tensor:
        """Per-graph predictions (CPU-ready, detached by the caller)."""
        raise NotImplementedError

    def target(self, batch) -> Tensor:
        return batch.y.view(-1)

    def metrics(self, pred: Tensor, target: Tensor) -> dict[str, float]:
        raise NotImplementedError

    def score(self, metrics: dict[str, float]) -> float:
        """The model-selection score of a split's metrics (higher is better)."""
        return metrics[self.score_name]


class PredictAccuracy(Task):
    """Regress a network's accuracy in [0, 1] from its weights.

    The model's raw output is a logit; the prediction is its sigmoid. ``loss="bce"``
    (binary cross-entropy with the accuracy as a soft label, as Transformer-NFN) or
    ``"mse"`` (squared error of the sigmoid). Selection on Kendall τ.
    """

    score_name = "kendall_tau"

    def __init__(self, loss: str = "bce") -> None:
        super().__init__(out_dim=1)
        if loss not in ("bce", "mse"):
            raise ValueError(f"loss must be 'bce' or 'mse' for accuracy prediction, got {loss!r}")
        self.loss_name = loss

    def loss(self, out, batch) -> Tensor:
        logit, y = out.view(-1).float(), self.target(batch).float()
        if self.loss_name == "bce":
            return F.binary_cross_entropy_with_logits(logit, y)
        return F.mse_loss(torch.sigmoid(logit), y)

    def predict(self, out, batch) -> Tensor:
        return torch.sigmoid(out.view(-1).float())

    def metrics(self, pred: Tensor, target: Tensor) -> dict[str, float]:
        return {"kendall_tau": kendall_tau(pred, target), "r2": r2_score(pred, target),
                "mse": mse(pred, target)}


class Classify(Task):
    """Classify networks (e.g. INRs by the digit they draw): cross-entropy, accuracy."""

    score_name = "accuracy"

    def loss(self, out, batch) -> Tensor:
        return F.cross_entropy(out.float(), self.target(batch).long())

    def predict(self, out, batch) -> Tensor:
        return out.float()

    def target(self, batch) -> Tensor:
        return batch.y.view(-1).long()

    def metrics(self, pred: Tensor, target: Tensor) -> dict[str, float]:
        return {"accuracy": accuracy(pred, target),
                "loss": float(F.cross_entropy(pred, target.long())) if target.numel() else 0.0}


TASKS = {"predict": PredictAccuracy, "classify": Classify}
