"""Hand-counted structure of small graphs, attention symmetry, permutation classes."""

from __future__ import annotations

import pytest
import torch
from _helpers import build
from torch import nn

from neuralgraph_quasi import models, to_graph
from neuralgraph_quasi.graph import Act, EdgeType, NodeOp, NodeType, Role, Slot

ATTN_WEIGHT = (EdgeType.ATTN_Q, EdgeType.ATTN_K, EdgeType.ATTN_V, EdgeType.ATTN_O)


def counts(values: torch.Tensor, enum) -> dict:
    """``{member: count}`` for every member of ``enum`` that occurs at least once."""
    values, freq = torch.unique(values, return_counts=True)
    return {enum(int(v)): int(c) for v, c in zip(values, freq, strict=True)}


def of_type(graph, etype: EdgeType) -> torch.Tensor:
    return (graph.edge_type == etype).nonzero().flatten()


# -- hand counts -----------------------------------------------------------------------------
def test_mlp_counts_and_values():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), seed=0)
    g = to_graph(model)
    # nodes: 3 inputs + 4 hidden + 2 outputs = 9; edges: 4*3 + 2*4 = 20, one weight each
    assert g.num_nodes == 9 and g.x.shape == (9, 4)
    assert g.edge_index.shape == (2, 20)
    assert g.edge_attr.shape == (20, 1)
    assert counts(g.node_type, NodeType) == {NodeType.INPUT: 3, NodeType.HIDDEN: 4,
                                             NodeType.OUTPUT: 2}
    assert counts(g.edge_type, EdgeType) == {EdgeType.LINEAR: 20}
    assert torch.equal(g.edge_kshape, torch.ones(20, 2, dtype=torch.long))
    assert g.node_layer.tolist() == [0] * 3 + [1] * 4 + [2] * 2

    # edge i -> o of layer l holds W_l[o, i]; node slot BIAS holds b_l[o]
    w1, b1, w2, b2 = model[0].weight, model[0].bias, model[2].weight, model[2].bias
    src, dst = g.edge_index
    for e in range(20):
        s, d = int(src[e]), int(dst[e])
        expected = w1[d - 3, s] if d < 7 else w2[d - 7, s - 3]
        assert g.edge_attr[e, 0] == expected
    assert torch.equal(g.x[3:7, Slot.BIAS], b1.detach())
    assert torch.equal(g.x[7:, Slot.BIAS], b2.detach())
    assert torch.equal(g.x[:3], torch.zeros(3, 4))  # inputs hold no value
    assert not g.x[:, Slot.GAIN:].any()


def test_conv_counts_and_kernels():
    model = build(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, (3, 5))),
                  seed=0)
    g = to_graph(model)
    # nodes: 1 input channel + 2 + 3 = 6; edges: 2*1 + 3*2 = 8;
    # width: the largest kernel, 3*5 = 15 (3x3 kernels padded with zeros)
    assert g.num_nodes == 6
    assert g.edge_index.shape == (2, 8)
    assert g.edge_attr.shape == (8, 15)
    assert counts(g.node_type, NodeType) == {NodeType.INPUT: 1, NodeType.HIDDEN: 2,
                                             NodeType.OUTPUT: 3}
    assert counts(g.edge_type, EdgeType) == {EdgeType.CONV: 8}
    assert counts(g.node_op, NodeOp) == {NodeOp.INPUT: 1, NodeOp.CONV: 5}
    assert g.edge_kshape.tolist() == [[3, 3]] * 2 + [[3, 5]] * 6

    src, dst = g.edge_index
    for e in range(8):
        s, d = int(src[e]), int(dst[e])
        if d < 3:
            kernel, length = model[0].weight[d - 1, s], 9
        else:
            kernel, length = model[2].weight[d - 3, s - 1], 15
        assert torch.equal(g.edge_attr[e, :length], kernel.detach().flatten())
        assert not g.edge_attr[e, length:].any()


def test_flatten_without_pooling_puts_a_block_of_weights_on_each_edge():
    model = build(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(18, 3)), seed=0)
    g = to_graph(model)
    lin = of_type(g, EdgeType.LINEAR)
    assert lin.numel() == 3 * 2  # one edge per (output, channel), not per feature
    assert g.edge_kshape[lin].tolist() == [[1, 9]] * 6
    w = model[3].weight.detach()
    for e in lin.tolist():
        c = int(g.edge_index[0, e]) - 1  # channel 0 and 1 are nodes 1 and 2
        o = int(g.edge_index[1, e]) - 3
        assert torch.equal(g.edge_attr[e, :9], w[o, 9 * c: 9 * (c + 1)])


@pytest.mark.parametrize(("pool", "in_features", "kshape"), [
    (nn.AdaptiveAvgPool2d(1), 4, [1, 1]),
    (nn.AdaptiveAvgPool2d((2, 3)), 24, [2, 3]),
], ids=["pool-1x1", "pool-2x3"])
def test_pooled_flatten_kernel_shape(pool, in_features, kshape):
    g = to_graph(nn.Sequential(nn.Conv2d(1, 4, 3), pool, nn.Flatten(), nn.Linear(in_features, 2)))
    lin = of_type(g, EdgeType.LINEAR)
    assert lin.numel() == 4 * 2
    assert g.edge_kshape[lin].tolist() == [kshape] * 8


def test_pooled_flatten_1d_kernel_shape():
    g = to_graph(nn.Sequential(nn.Conv1d(2, 4, 3), nn.AdaptiveAvgPool1d(2), nn.Flatten(),
                               nn.Linear(8, 3)))
    lin = of_type(g, EdgeType.LINEAR)
    assert g.edge_kshape[lin].tolist() == [[1, 2]] * 12
    assert g.edge_kshape[of_type(g, EdgeType.CONV)].tolist() == [[1, 3]] * 8


def test_self_attention_counts():
    model = build(lambda: models.SelfAttention(4, 2), seed=0)
    g = to_graph(model)
    # nodes: 4 inputs + 2 heads + 3*4 Q/K/V coordinates + 4 outputs = 22
    assert g.num_nodes == 22
    assert counts(g.node_type, NodeType) == {
        NodeType.INPUT: 4, NodeType.HEAD: 2, NodeType.QUERY: 4, NodeType.KEY: 4,
        NodeType.VALUE: 4, NodeType.OUTPUT: 4}
    # edges: Q, K, V 3*(4*4) + O 4*4 + HEAD_MEMBER 3*4 + QK_PAIR 4 = 80
    assert g.num_edges == 80
    assert counts(g.edge_type, EdgeType) == {
        EdgeType.ATTN_Q: 16, EdgeType.ATTN_K: 16, EdgeType.ATTN_V: 16, EdgeType.ATTN_O: 16,
        EdgeType.HEAD_MEMBER: 12, EdgeType.QK_PAIR: 4}
    assert g.edge_attr.shape == (80, 1)

    # roles: one per weight kind, NONE on structural edges
    role_of = {EdgeType.ATTN_Q: Role.Q, EdgeType.ATTN_K: Role.K, EdgeType.ATTN_V: Role.V,
               EdgeType.ATTN_O: Role.O, EdgeType.HEAD_MEMBER: Role.NONE,
               EdgeType.QK_PAIR: Role.NONE}
    for etype, role in role_of.items():
        assert (g.edge_role[of_type(g, etype)] == role).all(), etype

    # a Q/K/V edge into row r of its projection has head r // d_head and position r % d_head;
    # an O edge carries the head and position of the value row it reads
    d_head = 2
    src, dst = g.edge_index
    weights = {EdgeType.ATTN_Q: model.queries.weight, EdgeType.ATTN_K: model.keys.weight,
               EdgeType.ATTN_V: model.values.weight}
    for etype, w in weights.items():
        idx = of_type(g, etype)
        rows = g.node_unit[dst[idx]]
        assert sorted(rows.tolist()) == sorted(list(range(4)) * 4)
        assert torch.equal(g.edge_head[idx], rows // d_head)
        assert torch.equal(g.edge_pos[idx], rows % d_head)
        assert torch.equal(g.node_head[dst[idx]], rows // d_head)
        assert torch.equal(g.node_pos[dst[idx]], rows % d_head)
        cols = g.node_unit[src[idx]]
        assert (g.node_type[src[idx]] == NodeType.INPUT).all()
        assert torch.equal(g.edge_attr[idx, 0], w.detach()[rows, cols])
    o = of_type(g, EdgeType.ATTN_O)
    v_rows = g.node_unit[src[o]]
    assert (g.node_type[src[o]] == NodeType.VALUE).all()
    assert torch.equal(g.edge_head[o], v_rows // d_head)
    assert torch.equal(g.edge_pos[o], v_rows % d_head)
    assert torch.equal(g.edge_attr[o, 0],
                       model.out_projection.weight.detach()[g.node_unit[dst[o]], v_rows])


def test_self_attention_bias_slots():
    model = build(lambda: models.SelfAttention(4, 2, bias=True), seed=0)
    g = to_graph(model)
    for ntype, lin in ((NodeType.QUERY, model.queries), (NodeType.KEY, model.keys),
                       (NodeType.VALUE, model.values), (NodeType.OUTPUT, model.out_projection)):
        nodes = (g.node_type == ntype).nonzero().flatten()
        assert torch.equal(g.x[nodes, Slot.BIAS], lin.bias.detach()[g.node_unit[nodes]]), ntype


def test_transformer_classifier_default_edge_count():
    g = to_graph(models.TransformerClassifier())  # dim 32, 2 blocks, 2 heads, hidden 64, 4 cls
    # per block: ln1 32 NORM + attention (4 * 32*32 weights + 3*32 HEAD_MEMBER + 32 QK_PAIR)
    #            + ln2 32 NORM + fc1 32*64 + fc2 64*32                          = 8384
    # 2 blocks 16768 + final norm 32 + classifier 32*32 + 32*4                  = 17952
    assert g.num_edges == 17_952
    assert counts(g.edge_type, EdgeType) == {
        EdgeType.NORM: 5 * 32, EdgeType.ATTN_Q: 2048, EdgeType.ATTN_K: 2048,
        EdgeType.ATTN_V: 2048, EdgeType.ATTN_O: 2048, EdgeType.HEAD_MEMBER: 2 * 96,
        EdgeType.QK_PAIR: 2 * 32, EdgeType.LINEAR: 2 * (2048 + 2048) + 1024 + 128}
    assert int((g.node_type == NodeType.HEAD).sum()) == 4
    assert int((g.node_type == NodeType.OUTPUT).sum()) == 4
    assert int((g.node_type == NodeType.INPUT).sum()) == 32


def test_encoder_layer_residual_edges():
    g = to_graph(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    res = of_type(g, EdgeType.RESIDUAL)
    assert res.numel() == 2 * 8  # one edge per unit for each of the two skip connections
    assert torch.equal(g.edge_attr[res, 0], torch.ones(16))
    assert (g.edge_param[res] == -1).all()
    src, dst = g.edge_index[:, res]
    assert torch.equal(g.node_unit[src], g.node_unit[dst])
    assert int((g.edge_type == EdgeType.NORM).sum()) == 2 * 8


# -- attention symmetry ----------------------------------------------------------------------
def test_swapping_query_and_key_weights_changes_the_graph():
    model = build(lambda: models.SelfAttention(4, 2), seed=0)
    swapped = build(lambda: models.SelfAttention(4, 2), seed=0)
    with torch.no_grad():
        swapped.queries.weight.copy_(model.keys.weight)
        swapped.keys.weight.copy_(model.queries.weight)
    g, h = to_graph(model), to_graph(swapped)
    assert torch.equal(g.edge_index, h.edge_index)
    q, k = of_type(g, EdgeType.ATTN_Q), of_type(g, EdgeType.ATTN_K)
    assert not torch.equal(g.edge_attr[q], h.edge_attr[q])
    assert torch.equal(g.edge_attr[q], h.edge_attr[k])
    assert torch.equal(g.edge_attr[k], h.edge_attr[q])
    assert not torch.equal(g.edge_attr, h.edge_attr)


def test_head_count_changes_the_graph():
    g4 = to_graph(nn.MultiheadAttention(8, 4))
    g1 = to_graph(nn.MultiheadAttention(8, 1))
    assert g4.num_nodes != g1.num_nodes
    assert g4.num_nodes - g1.num_nodes == 3
    assert int((g4.node_type == NodeType.HEAD).sum()) == 4
    assert int((g1.node_type == NodeType.HEAD).sum()) == 1
    assert set(g4.node_head[g4.node_type == NodeType.QUERY].tolist()) == {0, 1, 2, 3}
    assert set(g1.node_head[g1.node_type == NodeType.QUERY].tolist()) == {0}


ATTENTION_MODELS = [
    ("self-attention", lambda: models.SelfAttention(8, 2)),
    ("self-attention-4-heads", lambda: models.SelfAttention(8, 4, bias=True)),
    ("mha", lambda: nn.MultiheadAttention(8, 4)),
    ("mha-kdim-vdim", lambda: nn.MultiheadAttention(8, 2, kdim=5, vdim=3)),
    ("encoder-layer", lambda: nn.TransformerEncoderLayer(8, 2, 16)),
    ("classifier", lambda: models.TransformerClassifier(8, 2, 2, 16, 3)),
]


@pytest.mark.parametrize("factory", [f for _, f in ATTENTION_MODELS],
                         ids=[i for i, _ in ATTENTION_MODELS])
def test_head_member_edges(factory):
    g = to_graph(factory())
    src, dst = g.edge_index
    hm = of_type(g, EdgeType.HEAD_MEMBER)
    coords = torch.isin(g.node_type, torch.tensor([NodeType.QUERY, NodeType.KEY,
                                                   NodeType.VALUE]))
    # every Q/K/V node has exactly one incoming HEAD_MEMBER edge, and nothing else gets one
    incoming = torch.bincount(dst[hm], minlength=g.num_nodes)
    assert torch.equal(incoming[coords], torch.ones(int(coords.sum()), dtype=torch.long))
    assert not incoming[~coords].any()
    # from a head node with the same head id
    assert (g.node_type[src[hm]] == NodeType.HEAD).all()
    assert torch.equal(g.node_head[src[hm]], g.node_head[dst[hm]])
    assert torch.equal(g.edge_head[hm], g.node_head[dst[hm]])
    # every head owns d_head coordinates of each of Q, K, V
    per_head = torch.bincount(src[hm], minlength=g.num_nodes)[g.node_type == NodeType.HEAD]
    assert per_head.unique().numel() == 1


@pytest.mark.parametrize("factory", [f for _, f in ATTENTION_MODELS],
                         ids=[i for i, _ in ATTENTION_MODELS])
def test_qk_pair_edges(factory):
    g = to_graph(factory())
    src, dst = g.edge_index
    qk = of_type(g, EdgeType.QK_PAIR)
    assert (g.node_type[src[qk]] == NodeType.QUERY).all()
    assert (g.node_type[dst[qk]] == NodeType.KEY).all()
    assert torch.equal(g.node_head[src[qk]], g.node_head[dst[qk]])
    assert torch.equal(g.node_pos[src[qk]], g.node_pos[dst[qk]])
    assert (g.node_pos[src[qk]] >= 0).all()
    # a perfect matching: each query and each key coordinate appears exactly once
    n_q = int((g.node_type == NodeType.QUERY).sum())
    assert qk.numel() == n_q
    assert src[qk].unique().numel() == n_q and dst[qk].unique().numel() == n_q


# -- permutation classes -----------------------------------------------------------------------
PERM_MODELS = [
    ("mlp", lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))),
    ("cnn", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(2, 3))),
    *ATTENTION_MODELS,
    ("embedding", lambda: nn.Sequential(nn.Embedding(10, 4), models.SelfAttention(4, 2))),
]


@pytest.mark.parametrize("factory", [f for _, f in PERM_MODELS], ids=[i for i, _ in PERM_MODELS])
def test_inputs_and_outputs_are_fixed(factory):
    g = to_graph(factory())
    ends = (g.node_type == NodeType.INPUT) | (g.node_type == NodeType.OUTPUT)
    assert ends.any()
    assert (g.node_perm[ends] == -1).all()
    # classes are numbered 0..C-1 without gaps
    classes = g.node_perm[g.node_perm >= 0].unique()
    assert torch.equal(classes, torch.arange(classes.numel()))


def test_mlp_each_hidden_layer_is_its_own_class():
    g = to_graph(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.Tanh(),
                               nn.Linear(5, 6), models.Sine(), nn.Linear(6, 2)))
    hidden = [g.node_perm[g.node_layer == layer] for layer in (1, 2, 3)]
    for nodes, width in zip(hidden, (4, 5, 6), strict=True):
        assert nodes.numel() == width
        assert nodes.unique().numel() == 1 and int(nodes[0]) >= 0
    assert len({int(nodes[0]) for nodes in hidden}) == 3
    assert (g.node_perm[g.node_layer == 4] == -1).all()
    # activations go on the units they are applied to
    acts = [g.node_act[g.node_layer == layer] for layer in range(5)]
    assert (acts[0] == Act.IDENTITY).all()
    assert (acts[1] == Act.RELU).all()
    assert (acts[2] == Act.TANH).all()
    assert (acts[3] == Act.SINE).all()
    assert (acts[4] == Act.IDENTITY).all()


@pytest.mark.parametrize(("act", "code"), [
    (nn.ReLU(), Act.RELU), (nn.LeakyReLU(), Act.LEAKY_RELU), (nn.Tanh(), Act.TANH),
    (nn.Sigmoid(), Act.SIGMOID), (nn.GELU(), Act.GELU), (nn.SiLU(), Act.SILU),
    (models.Sine(), Act.SINE), (nn.Identity(), Act.IDENTITY),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v.name)
def test_node_act_codes(act, code):
    g = to_graph(nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)))
    assert g.node_act.tolist() == [0] * 3 + [int(code)] * 4 + [0] * 2


@pytest.mark.parametrize("factory", [
    lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)),
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
], ids=["linear-bn1d", "conv-bn2d"])
def test_batchnorm_shares_class_with_its_layer_and_carries_the_activation(factory):
    model = build(factory, seed=0)
    g = to_graph(model)
    bn = g.node_op == NodeOp.BATCH_NORM
    layer = (g.node_type == NodeType.HIDDEN) & ~bn
    assert int(bn.sum()) == 4 and int(layer.sum()) == 4
    assert g.node_perm[layer].unique().numel() == 1 and int(g.node_perm[layer][0]) >= 0
    assert torch.equal(g.node_perm[bn], g.node_perm[layer])
    # the ReLU acts on the normalised units, not on the pre-norm ones
    assert (g.node_act[bn] == Act.RELU).all()
    assert (g.node_act[layer] == Act.IDENTITY).all()
    norm = model[1]
    units = g.node_unit[bn]
    for slot, value in ((Slot.BIAS, norm.bias), (Slot.GAIN, norm.weight),
                        (Slot.RUNNING_MEAN, norm.running_mean),
                        (Slot.RUNNING_VAR, norm.running_var)):
        assert torch.equal(g.x[bn, slot], value.detach()[units]), slot
    assert int((g.edge_type == EdgeType.NORM).sum()) == 4


def _layers_with_op(g, op: NodeOp) -> list[int]:
    return sorted(set(g.node_layer[g.node_op == op].tolist()))


def test_transformer_block_attention_output_shares_class_with_layer_norm():
    g = to_graph(models.TransformerBlock(8, 2, 16))
    attn_out = g.node_op == NodeOp.ATTENTION_OUT
    (out_layer,) = _layers_with_op(g, NodeOp.ATTENTION_OUT)
    ln2 = (g.node_op == NodeOp.LAYER_NORM) & (g.node_layer == out_layer + 1)
    assert int(attn_out.sum()) == 8 and int(ln2.sum()) == 8
    cls = g.node_perm[attn_out]
    assert cls.unique().numel() == 1 and int(cls[0]) >= 0
    assert torch.equal(g.node_perm[ln2], cls)
    # unit i after the norm pairs with unit i before it
    src, dst = g.edge_index[:, g.edge_type == EdgeType.NORM]
    assert torch.equal(g.node_unit[src], g.node_unit[dst])
    # fc1's hidden units: a class of their own, with the ReLU on them
    fc1 = (g.node_op == NodeOp.LINEAR) & (g.node_type == NodeType.HIDDEN)
    assert int(fc1.sum()) == 16
    assert g.node_perm[fc1].unique().numel() == 1
    assert int(g.node_perm[fc1][0]) not in (-1, int(cls[0]))
    assert (g.node_act[fc1] == Act.RELU).all()
    assert int((g.node_act != Act.IDENTITY).sum()) == 16
    # Q/K/V/head nodes are not in any node permutation class
    attn = g.node_op == NodeOp.ATTENTION
    assert (g.node_perm[attn] == -1).all()


def test_transformer_classifier_classes_chain_through_blocks():
    g = to_graph(models.TransformerClassifier(8, 2, 2, 16, 3))
    out_layers = _layers_with_op(g, NodeOp.ATTENTION_OUT)
    ln_layers = _layers_with_op(g, NodeOp.LAYER_NORM)
    assert len(out_layers) == 2 and len(ln_layers) == 5
    classes = []
    for layer in out_layers:
        out = g.node_perm[(g.node_op == NodeOp.ATTENTION_OUT) & (g.node_layer == layer)]
        ln = g.node_perm[(g.node_op == NodeOp.LAYER_NORM) & (g.node_layer == layer + 1)]
        assert out.unique().numel() == 1 and int(out[0]) >= 0
        assert torch.equal(out, ln)
        classes.append(int(out[0]))
    assert classes[0] != classes[1]
    # the first block's ln1 sees the fixed inputs; block 0's fc2 output shares its class with
    # block 1's ln1 (no residual, no affine LayerNorm), and block 1's fc2 with the final norm
    first_ln = g.node_perm[(g.node_op == NodeOp.LAYER_NORM) & (g.node_layer == ln_layers[0])]
    assert (first_ln == -1).all()
    linear_layers = _layers_with_op(g, NodeOp.LINEAR)
    assert len(linear_layers) == 6  # fc1, fc2 per block; classifier fc1, fc2
    for fc2_layer, ln_layer in ((linear_layers[1], ln_layers[2]),
                                (linear_layers[3], ln_layers[4])):
        fc2 = g.node_perm[(g.node_op == NodeOp.LINEAR) & (g.node_layer == fc2_layer)]
        ln = g.node_perm[(g.node_op == NodeOp.LAYER_NORM) & (g.node_layer == ln_layer)]
        assert fc2_layer + 1 == ln_layer
        assert fc2.unique().numel() == 1 and int(fc2[0]) >= 0
        assert torch.equal(fc2, ln)
    assert (g.node_perm[g.node_type == NodeType.OUTPUT] == -1).all()
    free = g.node_perm[g.node_perm >= 0].unique()
    # per block: attention out, fc1, fc2; classifier fc1
    assert free.numel() == 2 * 3 + 1


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize(("activation", "code"), [("relu", Act.RELU), ("gelu", Act.GELU)])
def test_encoder_layer_residual_stream_is_fixed(norm_first, activation, code):
    g = to_graph(nn.TransformerEncoderLayer(8, 2, 16, activation=activation,
                                            norm_first=norm_first, batch_first=True))
    linear = g.node_op == NodeOp.LINEAR
    first, second = _layers_with_op(g, NodeOp.LINEAR)
    hidden = linear & (g.node_layer == first)
    assert int(hidden.sum()) == 16
    # the feed-forward hidden units form one free class ...
    assert g.node_perm[hidden].unique().numel() == 1 and int(g.node_perm[hidden][0]) >= 0
    assert (g.node_act[hidden] == code).all()
    # ... everything else (residual stream, attention coordinates) is fixed
    assert (g.node_perm[~hidden] == -1).all()
    assert (g.node_act[~hidden] == Act.IDENTITY).all()
    assert int(((g.node_layer == second) & linear).sum()) == 8
