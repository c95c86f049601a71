"""What a run reports beside its own metrics: the learned α over a whole split, tree
baselines on STATNN's features, and a paired bootstrap of the gain over STATNN."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn._statnn import StatNN
from ..nn._stats import squash
from ..symmetry import scalable_nodes
from ._batches import ZooLoader
from ._metrics import kendall_tau

__all__ = ["alpha_report", "alpha_summary", "tree_baselines", "paired_bootstrap",
           "statistics_features", "TREE_GRIDS"]

log = logging.getLogger(__name__)


@torch.no_grad()
def alpha_report(model: nn.Module, dataset, device, batch_size: int = 128) -> dict[str, Any]:
    """α over every graph of ``dataset`` (a model with an ``alpha`` map and ``last_alpha``,
    as :class:`~neuralgraph_quasi.nn.QuasiGNN`), or ``{}`` without one.

    Returns:
        ``eps``: ``{"scale", "qk", "vo"}`` → ε; ``scales``: the scales of every scalable
        unit; ``M_dev``/``N_dev``: ``‖M − I‖_F`` and ``‖N − I‖_F`` of every head.
    """
    alpha_map = getattr(model, "alpha", None)
    if alpha_map is None or not hasattr(model, "last_alpha"):
        return {}
    was_training = model.training
    model.eval()
    scales, m_dev, n_dev = [], [], []
    for batch in ZooLoader(dataset, batch_size, device=device):
        model(batch)
        alpha = model.last_alpha
        if alpha is None:
            continue
        scales.append(alpha.scale[scalable_nodes(batch)].float().cpu())
        if alpha.M.numel():
            eye = torch.eye(alpha.M.size(-1), dtype=alpha.M.dtype, device=alpha.M.device)
            m_dev.append((alpha.M - eye).flatten(1).norm(dim=1).float().cpu())
            n_dev.append((alpha.N - eye).flatten(1).norm(dim=1).float().cpu())
    model.train(was_training)
    eps = alpha_map.eps.detach().double().cpu().tolist()

    def cat(parts):
        return torch.cat(parts) if parts else torch.zeros(0)

    return {"eps": dict(zip(alpha_map.KINDS, eps, strict=True)), "scales": cat(scales),
            "M_dev": cat(m_dev), "N_dev": cat(n_dev)}


def alpha_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The ``metrics.json`` entries of an :func:`alpha_report`: ``alpha_eps``,
    ``alpha_scale_spread`` (standard deviation of the scales over the scalable units) and
    ``alpha_gl_spread`` (mean over heads of ``‖M − I‖_F`` and of ``‖N − I‖_F``)."""
    if not report:
        return {}
    scales = report["scales"]
    return {
        "alpha_eps": report["eps"],
        "alpha_scale_spread": float(scales.double().std()) if scales.numel() > 1 else 0.0,
        "alpha_gl_spread": {"M": float(report["M_dev"].double().mean())
                            if report["M_dev"].numel() else 0.0,
                            "N": float(report["N_dev"].double().mean())
                            if report["N_dev"].numel() else 0.0},
    }


def statistics_features(dataset, device, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(X [N, 7·tensors], y [N])``: STATNN's per-tensor statistics of every graph of
    ``dataset`` (signed-log squashed), and its targets."""
    num_tensors = len(dataset[0].params)
    stat = StatNN(num_tensors)
    xs, ys = [], []
    for batch in ZooLoader(dataset, batch_size, device=device):
        xs.append(squash(stat.features(batch)).double().cpu())
        ys.append(batch.y.reshape(-1).double().cpu())
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


#: The grids searched on the validation split (each model's best on val τ is tested).
TREE_GRIDS = {
    "hist_gradient_boosting": [{"learning_rate": lr, "max_leaf_nodes": leaves,
                                "max_iter": 300, "l2_regularization": 1.0}
                               for lr in (0.03, 0.1) for leaves in (7, 31)],
    "random_forest": [{"n_estimators": 300, "max_features": mf, "min_samples_leaf": leaf}
                      for mf in (0.3, 1.0) for leaf in (1, 5)],
}


def tree_baselines(train, val, test, device, seed: int = 0) -> dict[str, Any]:
    """Gradient-boosted trees and a random forest (scikit-learn) on STATNN's features, each
    tuned on the validation split over :data:`TREE_GRIDS`.

    Returns:
        ``{"hist_gradient_boosting": {...}, "random_forest": {...}}`` each with
        ``val_kendall_tau``, ``test_kendall_tau``, ``params`` and ``test_pred``; and
        ``best``: the name of the one with the higher validation τ.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor

    makers = {"hist_gradient_boosting": lambda p: HistGradientBoostingRegressor(
                  random_state=seed, **p),
              "random_forest": lambda p: RandomForestRegressor(random_state=seed, n_jobs=-1,
                                                               **p)}
    (xtr, ytr), (xva, yva), (xte, yte) = (statistics_features(s, device)
                                          for s in (train, val, test))
    out: dict[str, Any] = {}
    for name, grid in TREE_GRIDS.items():
        best = None
        for params in grid:
            model = makers[name](params).fit(xtr, ytr)
            tau = kendall_tau(model.predict(xva), yva)
            if best is None or tau > best[0]:
                best = (tau, params, model)
        tau, params, model = best
        pred = model.predict(xte)
        out[name] = {"val_kendall_tau": tau, "test_kendall_tau": kendall_tau(pred, yte),
                     "params": params, "test_pred": pred}
    out["best"] = max(TREE_GRIDS, key=lambda n: out[n]["val_kendall_tau"])
    return out


def paired_bootstrap(pred_a, pred_b, true, num_samples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Paired bootstrap of ``τ(a) − τ(b)`` over the same resampled test members.

    Returns:
        ``{"estimate", "low", "high", "std"}``: the difference on the full set, the
        ``level`` percentile interval and the bootstrap standard deviation.
    """
    a, b, t = (np.asarray(torch.as_tensor(v).double().reshape(-1)) for v in
               (pred_a, pred_b, true))
    if not a.size == b.size == t.size:
        raise ValueError(f"paired_bootstrap needs predictions of one test set, got sizes "
                         f"{a.size}, {b.size} and {t.size} targets")
    rng = np.random.default_rng(seed)
    diffs = np.empty(num_samples)
    for i in range(num_samples):
        idx = rng.integers(0, t.size, t.size)
        diffs[i] = kendall_tau(a[idx], t[idx]) - kendall_tau(b[idx], t[idx])
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"estimate": kendall_tau(a, t) - kendall_tau(b, t), "low": float(low),
            "high": float(high), "std": float(diffs.std())}
