"""Self-attention written the ways public model code writes it (imported as a plain module).

Each class is a small token model: a projection or embedding, pre-norm attention blocks
with a residual MLP, mean pooling over tokens and a linear head. Only the attention
differs: how q, k and v come out of the projections, how heads are split and merged, and
how the causal mask is applied. None of these types is known to the converters, so
``to_graph`` traces their forwards.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class FusedSplitSDPA(nn.Module):
    """One ``qkv`` Linear, ``split`` into q, k, v; heads from ``x.size()``; SDPA, causal."""

    def __init__(self, width: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.width, self.causal = heads, width, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.size()
        q, k, v = self.qkv(x).split(self.width, dim=2)
        per_head = width // self.heads
        q = q.view(batch, length, self.heads, per_head).transpose(1, 2)
        k = k.view(batch, length, self.heads, per_head).transpose(1, 2)
        v = v.view(batch, length, self.heads, per_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=self.causal)
        return self.out(y.transpose(1, 2).contiguous().view(batch, length, width))


class FusedSplitMaskedBuffer(nn.Module):
    """``split`` as above, explicit scores, a registered float lower-triangular buffer
    compared with 0 and applied by ``masked_fill``."""

    def __init__(self, width: int, heads: int, max_len: int = 8) -> None:
        super().__init__()
        self.heads, self.width = heads, width
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len))
                             .view(1, 1, max_len, max_len))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        q, k, v = self.qkv(x).split(self.width, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        scores = scores.masked_fill(self.tril[:, :, :t, :t] == 0, float("-inf"))
        weights = F.softmax(scores, dim=-1)
        y = weights @ v
        return self.out(y.transpose(1, 2).contiguous().view(b, t, c))


class FusedReshapeUnbind(nn.Module):
    """``qkv`` reshaped to ``(B, N, 3, h, C // h)``, permuted, ``unbind(0)``; the query
    scaled before ``q @ kᵀ``; ``attn.softmax``; heads merged with ``reshape``."""

    def __init__(self, width: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, width * 3, bias=bias)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class FusedIndexed(FusedReshapeUnbind):
    """The same, with ``qkv[0], qkv[1], qkv[2]`` and a causal registered boolean mask."""

    def __init__(self, width: int, heads: int, max_len: int = 8) -> None:
        super().__init__(width, heads, bias=True)
        self.register_buffer("allowed", torch.ones(max_len, max_len, dtype=torch.bool).tril())

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = attn.masked_fill(~self.allowed[:N, :N], float("-inf")).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Chunked(nn.Module):
    """``chunk(3, dim=-1)`` of a fused projection, heads by ``view(B, T, h, -1)``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(width, 3 * width, bias=False)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).permute(0, 2, 1, 3) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.permute(0, 2, 1, 3).flatten(2))


class Einops(nn.Module):
    """``einops.rearrange`` for the heads: either of a ``chunk`` or of the fused output."""

    def __init__(self, width: int, heads: int, fused_pattern: bool = False) -> None:
        super().__init__()
        self.heads, self.fused_pattern = heads, fused_pattern
        self.to_qkv = nn.Linear(width, 3 * width, bias=False)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_pattern:
            q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3,
                                h=self.heads)
        else:
            qkv = self.to_qkv(x).chunk(3, dim=-1)
            q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads), qkv)
        dots = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out = torch.matmul(dots.softmax(dim=-1), v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class EinopsAttribute(nn.Module):
    """``einops.rearrange`` called through the module, fused pattern, explicit scores."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = einops.rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3,
                                   h=self.heads)
        scores = einops.rearrange(k, "b h n d -> b h d n")
        weights = torch.softmax(q @ scores * q.size(-1) ** -0.5, dim=-1)
        return self.proj(einops.rearrange(weights @ v, "b h n d -> b n (h d)"))


class TokenModel(nn.Module):
    """Embedding (tokens) or a Linear (features) in, ``depth`` pre-norm blocks of ``attn``
    with a GELU MLP, mean over tokens, a linear head."""

    def __init__(self, attn, width: int = 8, heads: int = 2, depth: int = 2,
                 vocab: int | None = 11, features: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width) if vocab else nn.Linear(features, width)
        self.attn = nn.ModuleList(attn(width, heads) for _ in range(depth))
        self.norm1 = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.norm2 = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for attn, n1, n2, fc1, fc2 in zip(self.attn, self.norm1, self.norm2, self.fc1,
                                          self.fc2, strict=True):
            h = h + attn(n1(h))
            h = h + fc2(F.gelu(fc1(n2(h))))
        return self.head(h.mean(dim=1))
