"""Custom (traced) models for the torch.fx conversion tests (imported as a plain module).

None of these types is known to the converters: ``to_graph`` traces their forwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SineLayer(nn.Module):
    """SIREN's layer ``sin(w0 * (W x + b))``, written as users write it."""

    def __init__(self, fan_in: int, fan_out: int, w0: float = 30.0) -> None:
        super().__init__()
        self.w0 = w0
        self.linear = nn.Linear(fan_in, fan_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * self.linear(x))


class Siren(nn.Module):
    def __init__(self, widths=(2, 8, 8), out: int = 1, w0: float = 30.0) -> None:
        super().__init__()
        self.net = nn.Sequential(*[SineLayer(a, b, w0)
                                   for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.last = nn.Linear(widths[-1], out)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.net(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two convs with BatchNorm, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, k, 1, k // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """Stem conv + BN, basic blocks, global average pooling, linear head."""

    def __init__(self, blocks=((4, 1),), k: int = 3, stem: int = 4, classes: int = 3,
                 pool: str = "mean") -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, stem, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(stem)
        layers, width = [], stem
        for cout, stride in blocks:
            layers.append(BasicBlock(width, cout, k, stride))
            width = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "adaptive" else None
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(torch.relu(self.bn(self.stem(x))))
        x = torch.flatten(self.pool(x), 1) if self.pool is not None else x.mean((2, 3))
        return self.fc(x)


class FlattenCNN(nn.Module):
    """A conv feature map of 3x3 per channel flattened into a Linear (`view(B, -1)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(27, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        h = h.view(h.size(0), -1)
        return self.fc2(torch.tanh(self.fc1(h)))


class Attention(nn.Module):
    """Hand-written multi-head self-attention: SDPA or explicit softmax(QKᵀ/√d)V."""

    def __init__(self, dim: int, heads: int, explicit: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.heads, self.explicit = heads, explicit
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(x).reshape(b, -1, self.heads, d // self.heads).permute(0, 2, 1, 3)
        if self.explicit:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
            out = torch.matmul(F.softmax(scores, dim=-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).contiguous().view(b, t, d))


class TextClassifier(nn.Module):
    """Embedding + learned positions + encoder blocks + mean pooling + linear classifier.

    ``block``: ``"torch"`` (``nn.TransformerEncoderLayer``), ``"sdpa"`` or ``"explicit"``
    (hand-written attention, pre-norm residual blocks with a ReLU MLP).
    """

    def __init__(self, vocab: int = 11, dim: int = 8, heads: int = 2, depth: int = 2,
                 max_len: int = 6, classes: int = 3, block: str = "sdpa") -> None:
        super().__init__()
        self.block = block
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        if block == "torch":
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, 12, dropout=0.0, batch_first=True)
                for _ in range(depth))
        else:
            self.layers = nn.ModuleList(Attention(dim, heads, block == "explicit")
                                        for _ in range(depth))
            self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
            self.ff1 = nn.ModuleList(nn.Linear(dim, 12) for _ in range(depth))
            self.ff2 = nn.ModuleList(nn.Linear(12, dim) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[:, :tokens.size(1)]
        for i, layer in enumerate(self.layers):
            if self.block == "torch":
                x = layer(x)
            else:
                x = x + layer(self.norms[i](x))
                x = x + self.ff2[i](F.relu(self.ff1[i](x)))
        return self.head(x.mean(dim=1))


class Branches(nn.Module):
    """``torch.cat`` of two branches with different activations, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 5)
        self.c = nn.Linear(9, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1))


class FunctionalMLP(nn.Module):
    """Functional activations and a residual ``x + f(x)`` between hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.mid = nn.Linear(6, 6)
        self.hid = nn.Linear(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        h = F.relu(h + self.mid(h))
        return self.out(self.hid(h).tanh())
