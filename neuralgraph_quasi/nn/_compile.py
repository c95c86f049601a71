"""``torch.compile`` for the metanetworks: each message-passing layer as one full graph.

Why per layer and not the whole model: a forward of :class:`~neuralgraph_quasi.nn.QuasiGNN`
also finds a batch's structure (nodes of a type, tensors' segments, attention heads) with
``nonzero``, ``unique`` and sizes read from data, and memoises it on the batch keyed by the
identity and version counter of its tensors (:func:`~neuralgraph_quasi.symmetry._memo.
structural`). Neither can be traced into one graph: data-dependent shapes break it, and a
compiled graph cannot keep a Python-side cache (``torch.compile(model, fullgraph=True)``
stops at ``Tensor.is_inference()`` in the memo). The layers hold almost all of the step's
time (edge-sized element-wise ops and aggregations) and are pure tensor programs, so they
are compiled with ``fullgraph=True`` (any graph break is an error, not a silent slowdown)
and the rest stays eager.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compile_layers", "compiled_layers", "compile_supported"]


def compile_layers(model: nn.Module, **options) -> nn.Module:
    """Compile, in place, every message-passing layer of ``model``'s backbone (a
    :class:`~neuralgraph_quasi.nn.QuasiGNN` or a bare backbone) with
    ``torch.compile(fullgraph=True, **options)``, through :meth:`nn.Module.compile`: parameter
    names, ``state_dict`` and checkpoints are unchanged. Compilation happens at the first
    forward (and again for a new shape). Returns ``model``.

    Raises:
        ValueError: when ``model`` has no backbone with a ``layers`` list.
    """
    layers = _layers(model)
    if layers is None:
        raise ValueError(f"compile_layers: {type(model).__name__} has no backbone.layers (a "
                         "QuasiGNN or a backbone with a layers ModuleList is needed)")
    for layer in layers:
        layer.compile(fullgraph=True, **options)
    return model


def compiled_layers(model: nn.Module) -> int:
    """How many of ``model``'s backbone layers :func:`compile_layers` compiled."""
    layers = _layers(model) or []
    return sum(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)


def _layers(model: nn.Module) -> nn.ModuleList | None:
    backbone = getattr(model, "backbone", model)
    layers = getattr(backbone, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def compile_supported() -> bool:
    """Whether ``torch.compile`` can run here (its CPU backend needs a C++ compiler)."""
    import shutil

    return hasattr(torch, "compile") and any(shutil.which(c) for c in ("g++", "c++", "clang++"))
