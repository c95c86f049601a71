"""Checks of symmetry for networks and metanetworks, usable by downstream code.

* :func:`assert_same_function`: two networks compute the same function.
* :func:`equivariance_error`: the largest relative error of a metanetwork under
  fresh random group elements (and, optionally, random re-indexing).
* :func:`assert_equivariant` / :func:`assert_invariant`: the same, with a
  dtype-aware tolerance.

Following e3nn's practice, run these in float64: the graph is cast to float64
here, and a module passed as ``fn`` is cast too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .symmetry import KINDS, act, reindex, sample
from .symmetry._index import edge_map

__all__ = ["assert_same_function", "equivariance_error", "assert_equivariant",
           "assert_invariant", "default_tolerance"]

#: Relative tolerance per dtype: float64 checks are strict, float32 ones are not.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
              torch.bfloat16: 1e-2}

Output = Callable[..., object]


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance used for values of ``dtype``."""
    return _TOLERANCE.get(dtype, 1e-4)


def _flatten(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if hasattr(out, "edge_attr") and hasattr(out, "x"):
        return [out.x, out.edge_attr]
    raise TypeError(f"cannot compare outputs of type {type(out).__name__}")


def _relative_error(a, b) -> float:
    a, b = _flatten(a), _flatten(b)
    num = sum(float((x - y).double().norm() ** 2) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(x.double().norm() ** 2) for x in a) ** 0.5
    return num / max(den, 1e-300)


def assert_same_function(model_a: nn.Module, model_b: nn.Module, inputs,
                         rtol: float | None = None) -> None:
    """Assert that two networks give the same outputs on ``inputs``.

    Args:
        model_a, model_b: the networks (run in eval mode, without gradients).
        inputs: a tensor, or a tuple of positional arguments.
        rtol: bound on ``‖a − b‖ / ‖a‖``; default by the output dtype
            (1e-9 for float64, 1e-4 for float32).
    """
    __tracebackhide__ = True
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        a, b = model_a.eval()(*args), model_b.eval()(*args)
    ref = _flatten(a)[0]
    rtol = default_tolerance(ref.dtype) if rtol is None else rtol
    err = _relative_error(a, b)
    if not err <= rtol:
        raise AssertionError(f"the two models compute different functions: relative error "
                             f"{err:.3e} > rtol {rtol:.1e}")


def _permute_output(element, graph, out):
    """Per-node and per-edge outputs move with the element's node map."""
    node_out, edge_out = out
    if torch.equal(element.perm, torch.arange(element.num_nodes, device=element.perm.device)):
        return node_out, edge_out
    return node_out[element.perm], edge_out[edge_map(graph, element.perm)]


_OUTPUTS: dict[str, Output] = {
    "invariant": lambda element, graph, out: out,
    "permutation": _permute_output,
    "graph": lambda element, graph, out: act(element, out),
}


def _as_float64(graph):
    graph = graph.clone()
    graph.x, graph.edge_attr = graph.x.double(), graph.edge_attr.double()
    return graph


def equivariance_error(fn: Callable, graph, kinds: Sequence[str] | None = None, *,
                       output: str | Output = "permutation", trials: int = 3,
                       generator: torch.Generator | None = None,
                       scale_range: tuple[float, float] = (1.0, 10.0)) -> float:
    """Largest relative error of ``fn`` under random symmetries, over ``trials`` draws.

    Each trial draws a fresh element ``g`` of the kinds asked for and compares
    ``fn(g·θ)`` with the expected transform of ``fn(θ)``.

    Args:
        fn: a metanetwork (module or function) taking a graph or batch.
        graph: a graph or batch (cast to float64 here; a module ``fn`` too).
        kinds: symmetry kinds (see :func:`~neuralgraph_quasi.symmetry.sample`),
            plus ``"reindex"`` for a random isomorphic re-indexing of nodes and
            edges. ``None``: every group kind, and re-indexing.
        output: how the output transforms: ``"invariant"`` (unchanged),
            ``"permutation"`` (``fn`` returns ``(node_features, edge_features)``
            that move with the nodes and edges), ``"graph"`` (``fn`` returns a
            graph, acted on like the input), or a callable
            ``(element, graph, out) -> expected``; with ``"reindex"`` such a callable must
            return ``(node_features, edge_features)``, which then move with the nodes and edges.
        trials: number of random draws.
        generator: CPU generator for reproducibility.
        scale_range: range of sampled positive scales.
    """
    kinds = list(KINDS) + ["reindex"] if kinds is None else list(kinds)
    group_kinds = [k for k in kinds if k != "reindex"]
    expect = _OUTPUTS[output] if isinstance(output, str) else output
    if isinstance(fn, nn.Module):
        fn = fn.double()
    graph = _as_float64(graph)
    worst = 0.0
    with torch.no_grad():
        base = fn(graph)
        for _ in range(trials):
            element = sample(graph, generator, group_kinds, scale_range)
            moved = act(element, graph)
            target = expect(element, graph, base)
            if "reindex" in kinds:
                moved, nodes, edges = reindex(moved, generator)
                target = _reindex_output(output, target, nodes, edges, moved)
            worst = max(worst, _relative_error(fn(moved), target))
    return worst


def _reindex_output(output, target, nodes: Tensor, edges: Tensor, moved):
    if output == "invariant":
        return target
    if output == "permutation" or (callable(output) and isinstance(target, tuple)
                                   and len(target) == 2):
        return target[0][nodes], target[1][edges]
    if output == "graph":
        return reindex_like(target, nodes, edges)
    raise ValueError("re-indexing needs output 'invariant', 'permutation', 'graph', or a "
                     "callable returning (node_features, edge_features)")


def reindex_like(graph, nodes: Tensor, edges: Tensor):
    """Apply a given node/edge order (as returned by ``reindex``) to another graph."""
    out = graph.clone()
    out.x, out.edge_attr = graph.x[nodes], graph.edge_attr[edges]
    return out


def assert_equivariant(fn: Callable, graph, kinds: Sequence[str] | None = None, *,
                       output: str | Output = "permutation", tol: float | None = None,
                       **kwargs) -> float:
    """Assert :func:`equivariance_error` ≤ ``tol`` (default: float64 tolerance); returns it."""
    __tracebackhide__ = True
    err = equivariance_error(fn, graph, kinds, output=output, **kwargs)
    tol = default_tolerance(torch.float64) if tol is None else tol
    if not err <= tol:
        raise AssertionError(f"not equivariant to {kinds or 'all kinds'}: relative error "
                             f"{err:.3e} > {tol:.1e}")
    return err


def assert_invariant(fn: Callable, graph, kinds: Sequence[str] | None = None, *,
                     tol: float | None = None, **kwargs) -> float:
    """Assert that ``fn``'s output does not change under the given symmetry kinds."""
    __tracebackhide__ = True
    return assert_equivariant(fn, graph, kinds, output="invariant", tol=tol, **kwargs)
