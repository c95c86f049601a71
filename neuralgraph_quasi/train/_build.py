"""Models from hydra configs, with the shapes that come from the data injected in code."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

__all__ = ["runtime_shapes", "build_model", "num_trainable"]


def runtime_shapes(graph, out_dim: int, task: str) -> dict[str, Any]:
    """What a model config never hand-types: read from a graph of the dataset.

    ``num_tensors`` (parameter tensors per network, STATNN), ``num_params`` (flat
    parameter count, flat MLP; also passed as ``num_values``), ``kernel_width``
    (``edge_attr`` columns), ``out_dim`` and ``task`` (``"predict"``/``"edit"``).
    """
    params = graph.params
    flat = sum(math.prod(p["shape"]) for p in params)
    return {"num_tensors": len(params), "num_params": flat, "num_values": flat,
            "kernel_width": int(graph.edge_attr.size(1)), "out_dim": out_dim, "task": task}


def build_model(model_cfg: DictConfig | dict, runtime: dict[str, Any]) -> nn.Module:
    """``instantiate(model_cfg, **runtime)``, passing only the runtime keys the target
    accepts and the config leaves unset (``null`` or absent).

    A config with ``match_params`` (overrides of itself describing a reference model, e.g.
    ``{quasi: true}``) and ``hidden_dim: null`` gets the smallest ``hidden_dim`` at which it
    has at least as many trainable parameters as that reference: the parameter-matched
    large GNN.
    """
    cfg = model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(model_cfg)
    cfg = cfg.copy()
    with open_dict(cfg):  # hydra's configs are in struct mode, which forbids pop
        match = cfg.pop("match_params", None)
    if match is not None:
        reference = num_trainable(_instantiate(OmegaConf.merge(cfg, match), runtime))
        width = int(match.get("hidden_dim") or 1)
        cfg.hidden_dim = width
        while num_trainable(_instantiate(cfg, runtime)) < reference:
            width += 1
            cfg.hidden_dim = width
    return _instantiate(cfg, runtime)


def _instantiate(cfg: DictConfig, runtime: dict[str, Any]) -> nn.Module:
    target = get_class(cfg._target_)
    accepted = inspect.signature(target).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    extra = {k: v for k, v in runtime.items()
             if (k in accepted or (takes_kwargs and k in ("out_dim",)))
             and cfg.get(k) is None}
    return instantiate(cfg, **extra)


def num_trainable(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.get_default_dtype()
