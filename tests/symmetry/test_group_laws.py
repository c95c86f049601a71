"""Group laws of :class:`GroupElement` on real graphs and batches.

``act`` is a group action: the identity acts trivially (exactly), ``inverse`` undoes,
``compose`` is acting twice, composition is associative. Both ``x`` and ``edge_attr``
are compared, in float64.
"""

from __future__ import annotations

import pytest
import torch
from _sym_helpers import BY_NAME, assert_graphs_close, assert_graphs_equal, mixed_batch

from neuralgraph_quasi import symmetry, to_graph
from neuralgraph_quasi.symmetry import GroupElement

ATOL = 1e-12


def _single(name: str):
    def make(seed: int):
        return to_graph(BY_NAME[name].build(seed))

    return make


GRAPHS = {
    "mlp": _single("mlp-relu"),
    "cnn": _single("cnn-avgpool2d"),
    "transformer-classifier": _single("transformer-classifier"),
    "self-attention-bias": _single("self-attention-bias"),
    "encoder-layer-pre-norm": _single("encoder-layer-pre-relu"),
    "siren": _single("siren"),
    "mixed-batch": lambda seed: mixed_batch(seed)[0],
}

# every kind at once, and kinds in isolation (so a law cannot hold only by cancellation)
KIND_SETS = [None, ["permutation", "head_permutation"], ["scale", "sign"], ["gl"]]
KIND_IDS = ["all", "perms", "scale-sign", "gl"]

pytestmark = pytest.mark.parametrize("make", GRAPHS.values(), ids=GRAPHS.keys())


def _elements(graph, seed: int, count: int, kinds=None) -> list[GroupElement]:
    gen = torch.Generator().manual_seed(seed)
    return [symmetry.sample(graph, gen, kinds) for _ in range(count)]


def _assert_elements_close(a: GroupElement, b: GroupElement, atol: float = ATOL) -> None:
    assert torch.equal(a.perm, b.perm)
    assert torch.equal(a.heads, b.heads)
    torch.testing.assert_close(a.scale, b.scale, rtol=0, atol=atol)
    torch.testing.assert_close(a.M, b.M, rtol=0, atol=atol)
    torch.testing.assert_close(a.N, b.N, rtol=0, atol=atol)


def test_identity_acts_exactly_trivially(make):
    graph = make(0)
    e = symmetry.identity(graph)
    assert e.num_nodes == graph.num_nodes
    assert_graphs_equal(symmetry.act(e, graph), graph)
    # the identity's inverse is the identity, bit for bit
    inv = e.inverse()
    for field in ("perm", "scale", "heads", "M", "N"):
        assert torch.equal(getattr(inv, field), getattr(e, field)), field
    # and composing with it changes nothing
    for a in _elements(graph, 1, 2):
        for c in (a.compose(e), e.compose(a)):
            _assert_elements_close(c, a, atol=0)


@pytest.mark.parametrize("kinds", KIND_SETS, ids=KIND_IDS)
def test_inverse_undoes(make, kinds):
    graph = make(1)
    for e in _elements(graph, 2, 3, kinds):
        moved = symmetry.act(e, graph)
        back = symmetry.act(e.inverse(), moved)
        assert_graphs_close(back, graph, ATOL)
        # and the other way round: e undoes e⁻¹
        assert_graphs_close(symmetry.act(e, symmetry.act(e.inverse(), graph)), graph, ATOL)


@pytest.mark.parametrize("kinds", KIND_SETS, ids=KIND_IDS)
def test_compose_is_acting_twice(make, kinds):
    graph = make(2)
    elements = _elements(graph, 3, 6, kinds)
    gaps = []
    for a, b in zip(elements[::2], elements[1::2], strict=True):
        lhs = symmetry.act(a.compose(b), graph)
        rhs = symmetry.act(a, symmetry.act(b, graph))
        assert_graphs_close(lhs, rhs, ATOL)
        gaps.append(float((symmetry.act(b.compose(a), graph).edge_attr - lhs.edge_attr)
                          .abs().max()))
    if kinds is None:
        # the full group is not abelian: the order of composition matters, so the law
        # above does pin down which element acts first
        assert max(gaps) > 1e-3


def test_associativity(make):
    graph = make(3)
    gen_elements = _elements(graph, 4, 6)
    for a, b, c in zip(gen_elements[::3], gen_elements[1::3], gen_elements[2::3], strict=True):
        left, right = a.compose(b).compose(c), a.compose(b.compose(c))
        _assert_elements_close(left, right)
        assert_graphs_close(symmetry.act(left, graph), symmetry.act(right, graph), ATOL)
        assert_graphs_close(symmetry.act(left, graph),
                            symmetry.act(a, symmetry.act(b, symmetry.act(c, graph))), ATOL)


def test_element_times_inverse_is_identity(make):
    graph = make(4)
    ident = symmetry.identity(graph)
    for e in _elements(graph, 5, 3):
        for product in (e.compose(e.inverse()), e.inverse().compose(e)):
            _assert_elements_close(product, ident)
            assert_graphs_close(symmetry.act(product, graph), graph, ATOL)
        _assert_elements_close(e.inverse().inverse(), e)


def test_action_is_not_trivial(make):
    """The laws above would hold for an action that does nothing: rule that out."""
    graph = make(5)
    for e in _elements(graph, 6, 2):
        moved = symmetry.act(e, graph)
        assert float((moved.edge_attr - graph.edge_attr).abs().max()) > 1e-3
        assert torch.equal(moved.edge_index, graph.edge_index)
