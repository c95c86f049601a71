"""Group elements: what ``sample`` draws, and the documented conventions of ``D · Π · G``.

* GL factors are well conditioned (``cond ≤ GL_CONDITION``) and identity-padded;
* the stored ``M``, ``N`` act in PyTorch's ``[out, in]`` layout as ``W_Q → M W_Q``,
  ``W_K → M⁻ᵀ W_K``, ``W_V → Nᵀ W_V``, ``W_O[:, h] → W_O[:, h] N⁻ᵀ`` (checked on the
  converted-back module's own tensors);
* ``Π``: the new graph holds at node ``n`` the old value of node ``σ(n)``; ``D``: edge
  ``(i, j)`` times ``d_j / d_i``, bias of ``j`` times ``d_j``;
* sampled node maps only move units within their own layer and permutation class.
"""

from __future__ import annotations

import pytest
import torch
from _sym_helpers import BY_NAME, mixed_batch, randomize
from torch import nn

from neuralgraph_quasi import models, symmetry, to_graph, to_model
from neuralgraph_quasi.graph import EdgeType, NodeType
from neuralgraph_quasi.symmetry import GL_CONDITION

COND_SLACK = 1 + 1e-9


def _head_widths(graph, heads: torch.Tensor) -> torch.Tensor:
    """d_head of each head node, counted from its HEAD_MEMBER query coordinates."""
    src, dst = graph.edge_index
    member = (graph.edge_type == EdgeType.HEAD_MEMBER) & (graph.node_type[dst] == NodeType.QUERY)
    return torch.stack([(src[member] == h).sum() for h in heads])


GL_GRAPHS = {
    "transformer-classifier": lambda: to_graph(BY_NAME["transformer-classifier"].build(0)),
    "self-attention-bias": lambda: to_graph(BY_NAME["self-attention-bias"].build(0)),
    "mha-kdim-vdim": lambda: to_graph(BY_NAME["mha-kdim-vdim"].build(0)),
    "mixed-batch": lambda: mixed_batch(0)[0],
}


@pytest.mark.parametrize("make", GL_GRAPHS.values(), ids=GL_GRAPHS.keys())
def test_gl_factors_are_well_conditioned_and_identity_padded(make):
    graph = make()
    gen = torch.Generator().manual_seed(1)
    widest = 0.0
    for kinds in (None, ["gl"], ["gl"]):
        e = symmetry.sample(graph, gen, kinds)
        assert e.heads.numel() > 0
        widths = _head_widths(graph, e.heads)
        D = e.M.size(-1)
        assert D == int(widths.max())
        for k, w in enumerate(widths.tolist()):
            for F in (e.M[k], e.N[k]):
                assert F.dtype == torch.float64
                cond = float(torch.linalg.cond(F[:w, :w]))
                assert cond <= GL_CONDITION * COND_SLACK
                widest = max(widest, cond)
                pad = torch.eye(D, dtype=torch.float64)
                pad[:w, :w] = F[:w, :w]
                assert torch.equal(F, pad)  # identity outside the head's own block
    # really GL, not only orthogonal: condition numbers spread towards the bound
    assert widest > 1.5


@pytest.mark.parametrize("kappa", [1.0, 1.5, 10.0])
def test_gl_condition_argument_bounds_the_factors(kappa: float):
    graph = GL_GRAPHS["transformer-classifier"]()
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        e = symmetry.sample(graph, gen, ["gl"], gl_condition=kappa)
        for F in (e.M, e.N):
            svals = torch.linalg.svdvals(F)
            assert float((svals.max(-1).values / svals.min(-1).values).max()) <= kappa * COND_SLACK
            assert float(svals.max()) <= kappa ** 0.5 * COND_SLACK
            assert float(svals.min()) >= kappa ** -0.5 / COND_SLACK
        if kappa == 1.0:  # orthogonal factors
            eye = torch.eye(e.M.size(-1), dtype=torch.float64).expand_as(e.M)
            torch.testing.assert_close(e.M @ e.M.mT, eye, rtol=0, atol=1e-12)


# -- the GL convention in PyTorch layout, on the module's own tensors -----------------------
def _projection_tensors(m: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(m, models.SelfAttention):
        lins = {"q": m.queries, "k": m.keys, "v": m.values, "o": m.out_projection}
        return {k: (lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
                for k, lin in lins.items()}
    d = m.embed_dim
    w, b = m.in_proj_weight.detach(), m.in_proj_bias.detach()
    out = {k: (w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) for i, k in enumerate("qkv")}
    out["o"] = (m.out_proj.weight.detach(), m.out_proj.bias.detach())
    return out


def _attention(kind: str, heads: int):
    torch.manual_seed(3)
    if kind == "self-attention":
        m = models.SelfAttention(8, heads, bias=True)
    else:
        m = nn.MultiheadAttention(8, heads, bias=True, batch_first=True)
    return randomize(m.double(), 3).eval()


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("kind", ["self-attention", "mha-packed"])
def test_stored_gl_factors_act_in_pytorch_layout_as_documented(kind: str, heads: int):
    m = _attention(kind, heads)
    graph = to_graph(m)
    old = _projection_tensors(m)
    dh = 8 // heads
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        e = symmetry.sample(graph, gen, ["gl"])
        new = _projection_tensors(to_model(symmetry.act(e, graph), m))
        head_index = graph.node_head[e.heads]
        assert torch.equal(head_index.sort().values, torch.arange(heads))
        for row, h in enumerate(head_index.tolist()):
            rows = slice(h * dh, (h + 1) * dh)
            M, N = e.M[row, :dh, :dh], e.N[row, :dh, :dh]
            expected = {"q": M, "k": torch.linalg.inv(M).mT, "v": N.mT}
            for part, A in expected.items():
                w, b = old[part]
                torch.testing.assert_close(new[part][0][rows], A @ w[rows], rtol=0, atol=1e-13)
                torch.testing.assert_close(new[part][1][rows], A @ b[rows], rtol=0, atol=1e-13)
            torch.testing.assert_close(new["o"][0][:, rows],
                                       old["o"][0][:, rows] @ torch.linalg.inv(N).mT,
                                       rtol=0, atol=1e-13)
        assert torch.equal(new["o"][1], old["o"][1])  # b_O unchanged


@pytest.mark.parametrize("kind", ["self-attention", "mha-packed"])
def test_head_permutation_moves_whole_heads_consistently(kind: str):
    m = _attention(kind, 4)
    graph = to_graph(m)
    old = _projection_tensors(m)
    gen = torch.Generator().manual_seed(5)
    moved_any = False
    for _ in range(3):
        e = symmetry.sample(graph, gen, ["head_permutation"])
        new = _projection_tensors(to_model(symmetry.act(e, graph), m))
        # new head h holds old head π(h), where the head node of h maps to that of π(h)
        pi = {int(graph.node_head[n]): int(graph.node_head[e.perm[n]]) for n in e.heads}
        assert sorted(pi.values()) == list(range(4))
        moved_any |= any(h != p for h, p in pi.items())
        for h, p in pi.items():
            r, s = slice(2 * h, 2 * h + 2), slice(2 * p, 2 * p + 2)
            for part in "qkv":
                assert torch.equal(new[part][0][r], old[part][0][s])
                assert torch.equal(new[part][1][r], old[part][1][s])
            assert torch.equal(new["o"][0][:, r], old["o"][0][:, s])
    assert moved_any


def test_permutation_and_scale_conventions_on_an_mlp():
    torch.manual_seed(6)
    m = randomize(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                                nn.Linear(5, 2)).double(), 6)
    graph = to_graph(m)
    # node ids of each layer's units, in unit order
    layers = [(graph.node_layer == layer).nonzero().view(-1) for layer in range(4)]
    for ids in layers:
        assert torch.equal(graph.node_unit[ids], torch.arange(ids.numel()))
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        e = symmetry.sample(graph, gen, ["permutation", "scale"])
        new = to_model(symmetry.act(e, graph), m)
        for k, lin in enumerate((0, 2, 4)):
            src, dst = layers[k], layers[k + 1]
            sig_src = graph.node_unit[e.perm[src]]  # σ as unit indices
            sig_dst = graph.node_unit[e.perm[dst]]
            d_src, d_dst = e.scale[src], e.scale[dst]
            w_old, b_old = m[lin].weight.detach(), m[lin].bias.detach()
            w_exp = w_old[sig_dst][:, sig_src] * d_dst[:, None] / d_src[None, :]
            torch.testing.assert_close(new[lin].weight.detach(), w_exp, rtol=1e-15, atol=0)
            torch.testing.assert_close(new[lin].bias.detach(), b_old[sig_dst] * d_dst,
                                       rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", ["transformer-classifier", "encoder-layer-pre-relu",
                                  "cnn-avgpool2d", "mixed-batch"])
def test_sampled_node_maps_stay_within_layer_and_class(name: str):
    graph = mixed_batch(1)[0] if name == "mixed-batch" else to_graph(BY_NAME[name].build(1))
    gid = getattr(graph, "batch", None)
    gid = torch.zeros(graph.num_nodes, dtype=torch.long) if gid is None else gid
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        e = symmetry.sample(graph, gen)
        p = e.perm
        assert torch.equal(p.sort().values, torch.arange(graph.num_nodes))  # a bijection
        for attr in ("node_type", "node_layer", "node_perm", "node_op", "node_pos"):
            assert torch.equal(graph[attr][p], graph[attr]), attr
        assert torch.equal(gid[p], gid)
        fixed = torch.isin(graph.node_type, torch.tensor([int(NodeType.INPUT),
                                                           int(NodeType.OUTPUT)]))
        assert torch.equal(p[fixed], fixed.nonzero().view(-1))
        # edges map to edges of the same type: the permuted graph has the same structure
        src, dst = graph.edge_index
        keys = set(zip(graph.edge_type.tolist(), src.tolist(), dst.tolist(), strict=True))
        mapped = set(zip(graph.edge_type.tolist(), p[src].tolist(), p[dst].tolist(), strict=True))
        assert keys == mapped


def test_sample_is_reproducible_and_returns_float64_factors():
    graph = GL_GRAPHS["transformer-classifier"]()
    a = symmetry.sample(graph, torch.Generator().manual_seed(9))
    b = symmetry.sample(graph, torch.Generator().manual_seed(9))
    for field in ("perm", "scale", "heads", "M", "N"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.perm.dtype == torch.long and a.scale.dtype == torch.float64
    assert a.M.dtype == a.N.dtype == torch.float64
    c = symmetry.sample(graph, torch.Generator().manual_seed(10))
    assert not torch.equal(a.M, c.M)


def test_invalid_arguments_raise():
    graph = GL_GRAPHS["transformer-classifier"]()
    other = to_graph(BY_NAME["mlp-relu"].build(0))
    with pytest.raises(ValueError, match="unknown symmetry kinds"):
        symmetry.sample(graph, kinds=["rotation"])
    for bad in ((0.0, 1.0), (2.0, 1.0), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="scale_range"):
            symmetry.sample(graph, scale_range=bad)
    e, f = symmetry.sample(graph), symmetry.sample(other)
    with pytest.raises(ValueError):
        symmetry.act(e, other)
    with pytest.raises(ValueError, match="different graphs"):
        e.compose(f)
