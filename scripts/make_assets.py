"""Regenerate the pictures in assets/ (shown in README.md).

    python scripts/make_assets.py [--out assets]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from neuralgraph_quasi import draw, models, to_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pictures = {
        "mlp": (nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                              nn.Linear(5, 2)), "MLP 3-6-5-2: an edge per weight"),
        "cnn": (nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)),
                "CNN: a node per channel, an edge per 3x3 kernel"),
        "transformer_block": (models.TransformerBlock(dim=8, heads=2, hidden=12),
                              "Transformer block (d=8, 2 heads): Q/K/V/O by role, heads as nodes"),
    }
    for name, (model, title) in pictures.items():
        fig = draw(to_graph(model), title=title)
        fig.savefig(args.out / f"{name}.png", dpi=70)
        print(f"wrote {args.out / name}.png")


if __name__ == "__main__":
    main()
