"""One converter per layer family: module -> blocks of nodes and edges.

A converter has the signature ``(builder, module, path, stream) -> stream``:
it reads the incoming :class:`~._builder.Stream` (``None`` before the first
layer), adds nodes and edges whose values are addresses into the module's
parameters, and returns the stream its output lives on. Index arithmetic is
vectorised per layer; nothing loops over weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor, nn

from .. import models
from .._errors import ConversionError
from ._builder import FIXED, Builder, Stream
from ._schema import Act, EdgeType, NodeOp, NodeType, Role, Slot

__all__ = ["convert", "SUPPORTED"]

Converter = Callable[[Builder, nn.Module, str, "Stream | None"], "Stream | None"]

_ACTIVATIONS: dict[type, Act] = {
    nn.ReLU: Act.RELU,
    nn.LeakyReLU: Act.LEAKY_RELU,
    nn.Tanh: Act.TANH,
    nn.Sigmoid: Act.SIGMOID,
    nn.GELU: Act.GELU,
    nn.SiLU: Act.SILU,
    models.Sine: Act.SINE,
    nn.Identity: Act.IDENTITY,
}
_NO_OPS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def _where(path: str) -> str:
    return repr(path) if path else "<root>"


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _inputs(b: Builder, width: int, kind: str, tokens: bool = False) -> Stream:
    ids = b.nodes(width, NodeType.INPUT, NodeOp.INPUT, FIXED)
    return Stream(ids, kind, FIXED, tokens=tokens)


def _grid(rows: int, cols: int) -> tuple[Tensor, Tensor]:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return r.reshape(-1), c.reshape(-1)


def _check_width(s: Stream, width: int, path: str, what: str) -> None:
    if s.width != width:
        raise ConversionError(
            f"module {_where(path)}: expects {width} {what}, but the previous layer gives {s.width}"
        )


def _bias(b: Builder, module: nn.Module, path: str, nodes: Tensor) -> None:
    if getattr(module, "bias", None) is not None:
        pid = b.param(_child(path, "bias"), module.bias)
        b.slot(nodes, Slot.BIAS, pid, torch.arange(nodes.numel()))


# -- weighted layers ---------------------------------------------------------
def _linear(b: Builder, m: nn.Linear, path: str, s: Stream | None) -> Stream:
    out_f, in_f = m.weight.shape
    if s is None:
        s = _inputs(b, in_f, "vector")
    if s.kind.startswith("conv"):
        raise ConversionError(
            f"module {_where(path)}: Linear after a {s.kind} feature map needs a Flatten first")
    if s.kind == "flat":
        if in_f % s.width:
            raise ConversionError(
                f"module {_where(path)}: in_features={in_f} is not a multiple of the "
                f"{s.width} channels flattened into it")
        k = in_f // s.width
        if s.spatial is not None and prod(s.spatial) != k:
            raise ConversionError(
                f"module {_where(path)}: in_features={in_f} does not match {s.width} channels "
                f"of spatial shape {tuple(s.spatial)}")
        spatial = s.spatial if s.spatial is not None else (k,)
        kshape = (1, k) if len(spatial) == 1 else (spatial[0], prod(spatial[1:]))
    else:
        _check_width(s, in_f, path, "input features")
        k, kshape = 1, (1, 1)
    pid = b.param(_child(path, "weight"), m.weight)
    b.layer += 1
    perm = b.new_class()
    dst = b.nodes(out_f, NodeType.HIDDEN, NodeOp.LINEAR, perm)
    o, i = _grid(out_f, s.width)
    b.edges(s.nodes[i], dst[o], EdgeType.LINEAR, pid=pid, offset=o * in_f + i * k, kshape=kshape)
    _bias(b, m, path, dst)
    return Stream(dst, "vector", perm, tokens=s.tokens)


def _conv(b: Builder, m: nn.Conv1d | nn.Conv2d, path: str, s: Stream | None) -> Stream:
    kind = "conv1d" if isinstance(m, nn.Conv1d) else "conv2d"
    if m.groups != 1:
        raise ConversionError(f"module {_where(path)}: grouped convolution (groups={m.groups}) "
                              "is not supported")
    out_c, in_c = m.weight.shape[:2]
    if s is None:
        s = _inputs(b, in_c, kind)
    if s.kind != kind:
        raise ConversionError(f"module {_where(path)}: {type(m).__name__} cannot follow a "
                              f"{s.kind} output")
    _check_width(s, in_c, path, "input channels")
    ks = tuple(m.kernel_size)
    kshape = (1, ks[0]) if len(ks) == 1 else (ks[0], ks[1])
    klen = prod(ks)
    pid = b.param(_child(path, "weight"), m.weight)
    b.layer += 1
    perm = b.new_class()
    dst = b.nodes(out_c, NodeType.HIDDEN, NodeOp.CONV, perm)
    o, i = _grid(out_c, in_c)
    b.edges(s.nodes[i], dst[o], EdgeType.CONV, pid=pid, offset=(o * in_c + i) * klen,
            kshape=kshape)
    _bias(b, m, path, dst)
    return Stream(dst, kind, perm)


def _embedding(b: Builder, m: nn.Embedding, path: str, s: Stream | None) -> Stream:
    if s is not None:
        raise ConversionError(f"module {_where(path)}: an Embedding must be the first layer")
    if m.max_norm is not None:
        raise ConversionError(f"module {_where(path)}: Embedding with max_norm rewrites its "
                              "weights in forward and is not supported")
    num, dim = m.weight.shape
    s = _inputs(b, num, "vector")
    pid = b.param(_child(path, "weight"), m.weight)
    b.layer += 1
    perm = b.new_class()
    dst = b.nodes(dim, NodeType.HIDDEN, NodeOp.EMBEDDING, perm)
    v, o = _grid(num, dim)
    b.edges(s.nodes[v], dst[o], EdgeType.EMBEDDING, pid=pid, offset=v * dim + o)
    return Stream(dst, "vector", perm, tokens=True)


def _patch_embedding(b: Builder, m: models.PatchEmbedding, path: str,
                     s: Stream | None) -> Stream:
    """Conv patches become tokens; the positional table is an embedding of the token's
    position, added to each feature: edges from one input node per position."""
    if s is not None:
        raise ConversionError(f"module {_where(path)}: a PatchEmbedding must be the first layer")
    out = _conv(b, m.conv1, _child(path, "conv1"), None)
    num, dim = m.pos_embedding.shape
    _check_width(out, dim, path, "positional features")
    positions = b.nodes(num, NodeType.INPUT, NodeOp.INPUT, FIXED)
    pid = b.param(_child(path, "pos_embedding"), m.pos_embedding,
                  "parameter" if isinstance(m.pos_embedding, nn.Parameter) else "buffer")
    t, f = _grid(num, dim)
    b.edges(positions[t], out.nodes[f], EdgeType.EMBEDDING, pid=pid, offset=t * dim + f)
    return out.evolve(kind="vector", tokens=True)


def _layer_norm(b: Builder, m: nn.LayerNorm, path: str, s: Stream | None) -> Stream:
    if len(m.normalized_shape) != 1:
        raise ConversionError(f"module {_where(path)}: LayerNorm over several axes "
                              f"{tuple(m.normalized_shape)} is not supported")
    (dim,) = m.normalized_shape
    if s is None:
        s = _inputs(b, dim, "vector")
    if s.kind != "vector":
        raise ConversionError(f"module {_where(path)}: LayerNorm after a {s.kind} output "
                              "is not supported")
    _check_width(s, dim, path, "features")
    b.layer += 1
    dst = b.nodes(dim, NodeType.HIDDEN, NodeOp.LAYER_NORM, s.perm)
    b.edges(s.nodes, dst, EdgeType.NORM)
    if m.weight is not None:
        b.slot(dst, Slot.GAIN, b.param(_child(path, "weight"), m.weight), torch.arange(dim))
    _bias(b, m, path, dst)
    return Stream(dst, "vector", s.perm, tokens=s.tokens)


def _batch_norm(b: Builder, m: nn.modules.batchnorm._BatchNorm, path: str,
                s: Stream | None) -> Stream:
    kinds = ("vector", "conv1d") if isinstance(m, nn.BatchNorm1d) else ("conv2d",)
    if s is None:
        s = _inputs(b, m.num_features, kinds[-1])
    if s.kind not in kinds or s.tokens:
        raise ConversionError(f"module {_where(path)}: {type(m).__name__} cannot follow a "
                              f"{s.kind} output")
    _check_width(s, m.num_features, path, "channels")
    b.layer += 1
    dst = b.nodes(s.width, NodeType.HIDDEN, NodeOp.BATCH_NORM, s.perm)
    b.edges(s.nodes, dst, EdgeType.NORM)
    units = torch.arange(s.width)
    if m.weight is not None:
        b.slot(dst, Slot.GAIN, b.param(_child(path, "weight"), m.weight), units)
    _bias(b, m, path, dst)
    for slot, name in ((Slot.RUNNING_MEAN, "running_mean"), (Slot.RUNNING_VAR, "running_var")):
        if getattr(m, name) is not None:
            b.slot(dst, slot, b.param(_child(path, name), getattr(m, name), "buffer"), units)
    if m.num_batches_tracked is not None:
        b.int_buffer(_child(path, "num_batches_tracked"), m.num_batches_tracked)
    return s.evolve(nodes=dst, has_act=False)


# -- attention ---------------------------------------------------------------
@dataclass(frozen=True)
class _Proj:
    """Where one projection lives: ``W[r, j]`` at flat ``base + r * stride + j`` of ``pid``."""

    pid: int
    base: int
    stride: int
    bias_pid: int | None = None
    bias_base: int = 0


def _attention(b: Builder, path: str, sources: tuple[Stream, Stream, Stream], heads: int,
               projs: tuple[_Proj, _Proj, _Proj], out: _Proj, out_features: int,
               inner: int) -> Stream:
    """Q/K/V coordinate nodes grouped by head nodes, and the output projection."""
    if inner % heads:
        raise ConversionError(f"module {_where(path)}: {heads} heads do not divide width {inner}")
    d_head = inner // heads
    r = torch.arange(inner)
    head, pos = r // d_head, r % d_head
    b.layer += 1
    head_nodes = b.nodes(heads, NodeType.HEAD, NodeOp.ATTENTION, -1, head=torch.arange(heads))
    coords = []
    for role, ntype, etype, src, proj in zip(
        (Role.Q, Role.K, Role.V), (NodeType.QUERY, NodeType.KEY, NodeType.VALUE),
        (EdgeType.ATTN_Q, EdgeType.ATTN_K, EdgeType.ATTN_V), sources, projs, strict=True,
    ):
        ids = b.nodes(inner, ntype, NodeOp.ATTENTION, -1, head=head, pos=pos)
        rr, jj = _grid(inner, src.width)
        b.edges(src.nodes[jj], ids[rr], etype, pid=proj.pid,
                offset=proj.base + rr * proj.stride + jj, role=role, head=head[rr], pos=pos[rr])
        if proj.bias_pid is not None:
            b.slot(ids, Slot.BIAS, proj.bias_pid, proj.bias_base + r)
        b.edges(head_nodes[head], ids, EdgeType.HEAD_MEMBER, head=head, pos=pos)
        coords.append(ids)
    b.edges(coords[0], coords[1], EdgeType.QK_PAIR, head=head, pos=pos)
    b.layer += 1
    perm = b.new_class()
    dst = b.nodes(out_features, NodeType.HIDDEN, NodeOp.ATTENTION_OUT, perm)
    oo, rr = _grid(out_features, inner)
    b.edges(coords[2][rr], dst[oo], EdgeType.ATTN_O, pid=out.pid, offset=out.base + oo * inner + rr,
            role=Role.O, head=head[rr], pos=pos[rr])
    if out.bias_pid is not None:
        b.slot(dst, Slot.BIAS, out.bias_pid, out.bias_base + torch.arange(out_features))
    return Stream(dst, "vector", perm, tokens=True)


def _self_attention(b: Builder, m: models.SelfAttention, path: str, s: Stream | None) -> Stream:
    dim = m.queries.in_features
    s = s if s is not None else _inputs(b, dim, "vector", tokens=True)
    _check_width(s, dim, path, "features")
    projs = []
    for name in ("queries", "keys", "values"):
        lin = getattr(m, name)
        pid = b.param(_child(path, f"{name}.weight"), lin.weight)
        bias = None if lin.bias is None else b.param(_child(path, f"{name}.bias"), lin.bias)
        projs.append(_Proj(pid, 0, dim, bias))
    o = m.out_projection
    out = _Proj(b.param(_child(path, "out_projection.weight"), o.weight), 0, o.in_features,
                None if o.bias is None else b.param(_child(path, "out_projection.bias"), o.bias))
    return _attention(b, path, (s, s, s), m.heads, tuple(projs), out, o.out_features,
                      m.queries.out_features)


def _mha_projections(b: Builder, m: nn.MultiheadAttention, path: str) -> tuple[_Proj, ...]:
    d = m.embed_dim
    bias = None if m.in_proj_bias is None else b.param(_child(path, "in_proj_bias"), m.in_proj_bias)
    if m._qkv_same_embed_dim:
        pid = b.param(_child(path, "in_proj_weight"), m.in_proj_weight)
        return tuple(_Proj(pid, i * d * d, d, bias, i * d) for i in range(3))
    widths = (d, m.kdim, m.vdim)
    return tuple(
        _Proj(b.param(_child(path, f"{n}_proj_weight"), getattr(m, f"{n}_proj_weight")), 0, w,
              bias, i * d)
        for i, (n, w) in enumerate(zip("qkv", widths, strict=True))
    )


def _mha_on(b: Builder, m: nn.MultiheadAttention, path: str,
            sources: tuple[Stream, Stream, Stream]) -> Stream:
    if m.bias_k is not None or m.add_zero_attn:
        flag = "add_bias_kv" if m.bias_k is not None else "add_zero_attn"
        raise ConversionError(f"module {_where(path)}: MultiheadAttention with {flag}=True "
                              "is not supported (extra key/value tokens have no place in the "
                              "graph)")
    widths = (m.embed_dim, m.kdim, m.vdim)
    for src, width, what in zip(sources, widths, ("query", "key", "value"), strict=True):
        _check_width(src, width, path, f"{what} features")
    o = m.out_proj
    out = _Proj(b.param(_child(path, "out_proj.weight"), o.weight), 0, o.in_features,
                None if o.bias is None else b.param(_child(path, "out_proj.bias"), o.bias))
    return _attention(b, path, sources, m.num_heads, _mha_projections(b, m, path), out,
                      o.out_features, m.embed_dim)


def _mha(b: Builder, m: nn.MultiheadAttention, path: str, s: Stream | None) -> Stream:
    if s is not None:
        raise ConversionError(f"module {_where(path)}: a MultiheadAttention takes (query, key, "
                              "value) and cannot follow another layer in a chain")
    sources = tuple(_inputs(b, w, "vector", tokens=True) for w in (m.embed_dim, m.kdim, m.vdim))
    return _mha_on(b, m, path, sources)


def _residual(b: Builder, skip: Stream, out: Stream, path: str) -> Stream:
    """``out + skip``: typed residual edges unit i -> unit i; their units permute together."""
    if out.has_act or skip.width != out.width:
        raise ConversionError(f"module {_where(path)}: unsupported residual connection")
    b.edges(skip.nodes, out.nodes, EdgeType.RESIDUAL, const=1.0)
    b.couple(skip.perm, out.perm)
    return out


def _encoder_layer(b: Builder, m: nn.TransformerEncoderLayer, path: str,
                   s: Stream | None) -> Stream:
    acts = {1: Act.RELU, 2: Act.GELU}
    if m.activation_relu_or_gelu not in acts:
        raise ConversionError(f"module {_where(path)}: TransformerEncoderLayer activation "
                              f"{m.activation!r} is not supported (ReLU or GELU)")
    act = acts[m.activation_relu_or_gelu]
    s = s if s is not None else _inputs(b, m.self_attn.embed_dim, "vector", tokens=True)

    def attend(x: Stream) -> Stream:
        return _mha_on(b, m.self_attn, _child(path, "self_attn"), (x, x, x))

    def feed_forward(x: Stream) -> Stream:
        h = b.activate(_linear(b, m.linear1, _child(path, "linear1"), x), act, path)
        return _linear(b, m.linear2, _child(path, "linear2"), h)

    def norm(name: str, x: Stream) -> Stream:
        return _layer_norm(b, getattr(m, name), _child(path, name), x)

    if m.norm_first:
        s = _residual(b, s, attend(norm("norm1", s)), path)
        return _residual(b, s, feed_forward(norm("norm2", s)), path)
    s = norm("norm1", _residual(b, s, attend(s), path))
    return norm("norm2", _residual(b, s, feed_forward(s), path))


# -- parameter-free modules ----------------------------------------------------
def _activation(b: Builder, m: nn.Module, path: str, s: Stream | None) -> Stream | None:
    act = _ACTIVATIONS[type(m)]
    if act == Act.IDENTITY:
        return s
    if s is None:
        raise ConversionError(f"module {_where(path)}: an activation before the first layer "
                              "with weights is not supported")
    return b.activate(s, act, path)


def _no_op(b: Builder, m: nn.Module, path: str, s: Stream | None) -> Stream | None:
    return s


def _adaptive_pool(b: Builder, m: nn.Module, path: str, s: Stream | None) -> Stream:
    kind = "conv1d" if isinstance(m, nn.AdaptiveAvgPool1d) else "conv2d"
    if s is None or s.kind != kind:
        raise ConversionError(f"module {_where(path)}: {type(m).__name__} must follow a "
                              f"{kind} layer")
    size = m.output_size
    size = (size,) * (1 if kind == "conv1d" else 2) if isinstance(size, int) else tuple(size)
    if any(v is None for v in size):
        raise ConversionError(f"module {_where(path)}: output_size {size} with None is not "
                              "supported")
    return s.evolve(spatial=size)


def _flatten(b: Builder, m: nn.Flatten, path: str, s: Stream | None) -> Stream | None:
    if m.start_dim != 1 or m.end_dim != -1:
        raise ConversionError(f"module {_where(path)}: only Flatten(start_dim=1, end_dim=-1) "
                              "is supported")
    if s is None or (s.kind == "vector" and not s.tokens):
        return s
    if s.kind == "vector":
        raise ConversionError(f"module {_where(path)}: Flatten of a token sequence is not "
                              "supported (pool over tokens first)")
    return s.evolve(kind="flat")


def _mean_pool(b: Builder, m: models.MeanPool, path: str, s: Stream | None) -> Stream:
    if s is None or not s.tokens:
        raise ConversionError(f"module {_where(path)}: MeanPool needs a token sequence")
    return s.evolve(tokens=False)


# -- containers ----------------------------------------------------------------
def _chain(b: Builder, children: list[tuple[str, nn.Module]], path: str,
           s: Stream | None) -> Stream | None:
    for name, child in children:
        s = convert(b, child, _child(path, name), s)
    return s


def _sequential(b: Builder, m: nn.Sequential, path: str, s: Stream | None) -> Stream | None:
    # _modules, not named_children(): a module reused at two positions runs at both
    return _chain(b, list(m._modules.items()), path, s)


def _chained(b: Builder, m: nn.Module, path: str, s: Stream | None) -> Stream | None:
    return _chain(b, m.chain(), path, s)


def _encoder(b: Builder, m: nn.TransformerEncoder, path: str, s: Stream | None) -> Stream | None:
    children = [(f"layers.{i}", layer) for i, layer in enumerate(m.layers)]
    if m.norm is not None:
        children.append(("norm", m.norm))
    return _chain(b, children, path, s)


_CONVERTERS: dict[type, Converter] = {
    nn.Sequential: _sequential,
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.MultiheadAttention: _mha,
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder,
    nn.Flatten: _flatten,
    nn.AdaptiveAvgPool1d: _adaptive_pool,
    nn.AdaptiveAvgPool2d: _adaptive_pool,
    models.SelfAttention: _self_attention,
    models.TransformerBlock: _chained,
    models.TransformerClassifier: _chained,
    models.MeanPool: _mean_pool,
    models.PatchEmbedding: _patch_embedding,
    **{t: _activation for t in _ACTIVATIONS},
    **{t: _no_op for t in _NO_OPS},
}

#: Names of the module types :func:`~neuralgraph_quasi.to_graph` converts.
SUPPORTED = tuple(sorted(t.__name__ for t in _CONVERTERS))


def convert(b: Builder, module: nn.Module, path: str, s: Stream | None) -> Stream | None:
    """Dispatch on the exact module type (a subclass may change ``forward``)."""
    fn = _CONVERTERS.get(type(module))
    if next(module.parameters(recurse=False), None) is not None:
        first = b.owners.setdefault(id(module), path)
        if first != path:
            raise ConversionError(f"module {_where(path)} is the same object as {_where(first)}: "
                                  "shared (tied) weights are not supported")
    if fn is None:
        raise ConversionError(
            f"unsupported module {_where(path)} of type {type(module).__qualname__}; "
            f"supported: {', '.join(SUPPORTED)}")
    return fn(b, module, path, s)
