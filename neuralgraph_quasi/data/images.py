"""A real image set that ships with a package: scikit-learn's 8×8 handwritten digits.

1,797 greyscale digits (0-9) from UCI, bundled with scikit-learn, so zoo generators
work on a fresh machine with no download. Upsampled (bilinear) when a generator wants
MNIST-sized inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits", "DIGITS_SPLIT_SEED"]

#: Seed of the fixed train/test split of the digits.
DIGITS_SPLIT_SEED = 0


def load_digits(size: int = 8, split: str = "all", test_fraction: float = 0.25
                ) -> tuple[Tensor, Tensor]:
    """The digits as ``images [N, 1, size, size]`` in ``[0, 1]`` and ``labels [N]``.

    Args:
        size: side length; 8 is the original resolution, larger sides are bilinear
            upsamplings (e.g. 28 for MNIST-shaped inputs).
        split: ``"train"``, ``"test"`` or ``"all"``; the split is fixed
            (seed :data:`DIGITS_SPLIT_SEED`, ``test_fraction`` of the images in test).
        test_fraction: share of the test split.
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if split == "all":
        return images, labels
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = int(round(test_fraction * len(labels)))
    chosen = {"test": order[:n_test], "train": order[n_test:]}.get(split)
    if chosen is None:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return images[chosen], labels[chosen]
