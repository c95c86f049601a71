"""neuralgraph_quasi: graph metanetworks on neural-network weights, with quasi-equivariance.

The conversion API (:func:`to_graph`, :func:`to_model`, :func:`collate` ...) is imported
eagerly; the subpackages ``graph``, ``symmetry``, ``nn``, ``data``, ``train``, ``testing``
and ``models`` are reachable as attributes (``nq.symmetry.sample``) and are imported on
first use, so ``import neuralgraph_quasi`` stays as fast as the conversion API allows.
"""

from __future__ import annotations

import importlib

from ._errors import ConversionError
from .graph import NeuralGraph, collate, draw, to_graph, to_graphs, to_model, to_networkx

__version__ = "0.1.0"

#: Subpackages imported on first attribute access (PEP 562).
_LAZY = ("graph", "symmetry", "nn", "data", "train", "testing", "models")

# the lazy subpackages are left out: ``from neuralgraph_quasi import *`` would import them all
__all__ = ["NeuralGraph", "ConversionError", "to_graph", "to_graphs", "to_model", "collate",
           "to_networkx", "draw"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
