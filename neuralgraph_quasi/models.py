"""The architectures of the model zoos, as plain ``nn.Module`` s.

These modules convert to graphs natively (no tracing). Their attribute names
match the published checkpoints, so a state_dict from the Small Transformer
Zoo (Tran et al. 2025) loads with ``load_state_dict``:
``encoder.{i}.attention.{queries,keys,values,out_projection}.weight``,
``encoder.{i}.fc1.*``, ``encoder.{i}.fc2.*``, ``classifier.fc{1,2}.*``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

__all__ = ["Sine", "MeanPool", "SelfAttention", "TransformerBlock", "TransformerClassifier",
           "PatchEmbedding", "siren"]


class Sine(nn.Module):
    r"""SIREN activation :math:`\sin(\omega_0 x)` (Sitzmann et al. 2020)."""

    def __init__(self, w0: float = 30.0) -> None:
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


class MeanPool(nn.Module):
    """Mean over the token axis ``dim`` (``[B, T, d] -> [B, d]`` by default)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dim)


class SelfAttention(nn.Module):
    r"""Multi-head self-attention with separate projections, as in the Small Transformer Zoo.

    Heads are contiguous row blocks of ``queries``/``keys``/``values`` (head
    ``h`` owns rows ``h*d_head:(h+1)*d_head``); scores are scaled by
    :math:`1/\sqrt{d_{head}}`; no mask.

    Args:
        dim: model width ``d``.
        heads: number of heads; must divide ``dim``.
        bias: whether the four projections have biases (the zoo's have none).

    Shapes:
        input ``[B, T, d]``, output ``[B, T, d]``.
    """

    def __init__(self, dim: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} does not divide dim={dim}")
        self.heads = heads
        self.queries = nn.Linear(dim, dim, bias=bias)
        self.keys = nn.Linear(dim, dim, bias=bias)
        self.values = nn.Linear(dim, dim, bias=bias)
        self.out_projection = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.queries(x)), split(self.keys(x)), split(self.values(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
        out = scores.softmax(-1) @ v
        return self.out_projection(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """The zoo's encoder block: ``fc2(relu(fc1(ln2(attention(ln1(x))))))``.

    No residual connections and LayerNorms without affine parameters, exactly
    as in the Small Transformer Zoo (this is what makes permutations of the
    block's output units a symmetry there).
    """

    def __init__(self, dim: int = 32, heads: int = 2, hidden: int = 64,
                 attention_bias: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attention = SelfAttention(dim, heads, bias=attention_bias)
        self.ln2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def chain(self) -> list[tuple[str, nn.Module]]:
        """Submodules in the order the forward applies them."""
        return [("ln1", self.ln1), ("attention", self.attention), ("ln2", self.ln2),
                ("fc1", self.fc1), ("act", self.act), ("fc2", self.fc2)]

    def forward(self, x: Tensor) -> Tensor:
        for _, module in self.chain():
            x = module(x)
        return x


class PatchEmbedding(nn.Module):
    """The MNIST-Transformers embedding: non-overlapping conv patches plus a positional table.

    ``conv1`` (``patch × patch``, stride ``patch``) turns a 28×28 image into 7×7 = 49
    tokens of width ``dim``; ``pos_embedding`` ``[num_patches, dim]`` is added to
    them. The published checkpoints hold both (keys ``embedding.conv1.*`` and
    ``embedding.pos_embedding``); the table is fixed, so it is a buffer here.

    Shapes:
        input ``[B, C, H, W]``, output ``[B, (H/patch)·(W/patch), dim]``.
    """

    def __init__(self, in_channels: int = 1, dim: int = 32, patch: int = 4,
                 num_patches: int = 49) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.register_buffer("pos_embedding", torch.zeros(num_patches, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1(x).flatten(2).transpose(1, 2) + self.pos_embedding


class TransformerClassifier(nn.Module):
    """The Small Transformer Zoo classifier, from embedded tokens to logits.

    ``embedding`` (optional) maps raw inputs to ``[B, T, dim]``; the AGNews
    zoo's embedding is frozen, shared and absent from its checkpoints, so
    its models start from embedded tokens (``embedding=None``).

    Shapes:
        input ``[B, T, dim]`` (or the embedding's input), output ``[B, num_classes]``.
    """

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, hidden: int = 64,
                 num_classes: int = 4, embedding: nn.Module | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.encoder = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.pool = MeanPool(dim=1)
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, dim), act=nn.ReLU(), fc2=nn.Linear(dim, num_classes)))

    def chain(self) -> list[tuple[str, nn.Module]]:
        """Submodules in the order the forward applies them."""
        head = [("embedding", self.embedding)] if self.embedding is not None else []
        blocks = [(f"encoder.{i}", block) for i, block in enumerate(self.encoder)]
        return head + blocks + [("norm", self.norm), ("pool", self.pool),
                                ("classifier", self.classifier)]

    def forward(self, x: Tensor) -> Tensor:
        for _, module in self.chain():
            x = module(x)
        return x


def siren(in_features: int = 2, hidden: int = 32, depth: int = 2, out_features: int = 1,
          w0: float = 30.0) -> nn.Sequential:
    """A SIREN INR: ``depth`` sine layers of width ``hidden`` and a linear output.

    The INR zoos' architecture is ``siren(2, 32, 2, 1)`` (2->32->32->1).
    """
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), Sine(w0)]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
