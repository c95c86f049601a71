"""Helpers shared by the graph-conversion tests (imported as a plain module)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every floating-point parameter and buffer with seeded random values.

    Default initialisations (ones/zeros of a LayerNorm, for instance) would make
    two freshly built modules agree; random values make every entry distinct.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if torch.is_floating_point(t):
                value = 0.5 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
                if name.endswith("running_var"):  # variances must stay positive
                    value = value.abs() + 0.1
                t.copy_(value)
    return model


def build(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A module from ``factory`` with random values drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return randomize(factory(), seed).eval()


def assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    """Same keys in the same order, same dtypes, bit-for-bit equal values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


def assert_outputs_equal(out_a, out_b) -> None:
    """Outputs (a tensor or a tuple of tensors / None) are bit-for-bit equal."""
    if isinstance(out_a, tuple):
        assert isinstance(out_b, tuple) and len(out_a) == len(out_b)
        for x, y in zip(out_a, out_b, strict=True):
            assert_outputs_equal(x, y)
    elif out_a is None:
        assert out_b is None
    else:
        assert out_a.dtype == out_b.dtype
        assert torch.equal(out_a, out_b)


