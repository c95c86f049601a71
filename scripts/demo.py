"""Demo: convert zoo architectures to graphs and back, and apply their symmetries.

    python scripts/demo.py [--seed 0]

For each architecture (a CNN-zoo network, a SIREN INR, the Small Transformer
Zoo classifier, a PyTorch TransformerEncoderLayer) it prints the graph's size,
checks that ``to_model(to_graph(m))`` is bit-for-bit ``m``, samples an element
of the largest known symmetry group and checks, in float64, that the
transformed network computes the same function while its weights changed.
Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from neuralgraph_quasi import models, symmetry, to_graph, to_model


def architectures() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10))
    tel = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return {
        "CNN zoo (4,970 params)": (cnn, torch.randn(8, 1, 28, 28)),
        "SIREN 2-32-32-1": (models.siren(), torch.rand(64, 2) * 2 - 1),
        "Transformer zoo (AGNews)": (models.TransformerClassifier(), torch.randn(4, 12, 32)),
        "nn.TransformerEncoderLayer": (tel, torch.randn(4, 12, 32)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    header = f"{'architecture':28s} {'nodes':>6s} {'edges':>7s} {'exact':>6s} " \
             f"{'weights moved':>13s} {'function error':>14s}"
    print(header)
    print("-" * len(header))
    ok = True
    for name, (model, inputs) in architectures().items():
        model = model.double().eval()
        graph = to_graph(model)
        back = to_model(graph, model)
        exact = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      back.state_dict().values(), strict=True))
        element = symmetry.sample(graph, generator)
        moved = symmetry.act(element, graph)
        twin = to_model(moved, model)
        with torch.no_grad():
            a, b = model(inputs.double()), twin(inputs.double())
        error = float((a - b).norm() / a.norm())
        change = float((moved.edge_attr - graph.edge_attr).abs().max())
        ok &= exact and error < 1e-9 and change > 1e-3
        print(f"{name:28s} {graph.num_nodes:6d} {graph.num_edges:7d} {str(exact):>6s} "
              f"{change:13.3f} {error:14.2e}")
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
