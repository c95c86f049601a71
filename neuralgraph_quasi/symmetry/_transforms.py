"""PyG transforms that apply symmetries, for augmentation."""

from __future__ import annotations

import torch
from torch_geometric.transforms import BaseTransform

from ._act import act
from ._sample import sample

__all__ = ["RandomSymmetry"]


class RandomSymmetry(BaseTransform):
    """Apply a freshly sampled group element on every call (data augmentation).

    Args:
        kinds: symmetry kinds to sample (see :func:`sample`); ``None`` takes all.
        scale_range: range of the positive scales (log-uniform).
        generator: optional CPU generator, for reproducible augmentation.

    Example:
        >>> dataset.transform = RandomSymmetry(kinds=["permutation", "scale"],
        ...                                    scale_range=(1.0, 1e2))
    """

    def __init__(self, kinds=None, scale_range: tuple[float, float] = (1.0, 10.0),
                 generator: torch.Generator | None = None) -> None:
        self.kinds = None if kinds is None else tuple(kinds)
        self.scale_range = tuple(scale_range)
        self.generator = generator

    def forward(self, data):
        return act(sample(data, self.generator, self.kinds, self.scale_range), data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kinds={self.kinds}, scale_range={self.scale_range})"
