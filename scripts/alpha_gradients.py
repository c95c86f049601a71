"""Can training move α? Gradients reaching α's γ and ε against the backbone's, at
initialisation, on members of a zoo.

    python scripts/alpha_gradients.py [--dataset agnews_tf] [--graphs 8] [--seed 0]

Builds the main job's model (``configs/model/quasi_gnn.yaml`` at the default width and
depth) and, for comparison, the first design (α on hidden states after the middle layer,
``ε = 0.01``); takes ``--graphs`` members of the zoo's training split (generated first if
absent), one BCE step, and prints the per-parameter RMS gradient of each group, the ratios
γ/backbone and ε/backbone, and the spread of ``sin γ`` and of the scales across units.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from neuralgraph_quasi import collate
from neuralgraph_quasi.data import load_zoo
from neuralgraph_quasi.nn import QuasiGNN
from neuralgraph_quasi.symmetry import scalable_nodes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DESIGNS = {"default (alpha on the input)": {},
           "first design (alpha on states, eps 0.01)": {"alpha_on": "states",
                                                         "eps_init": 0.01}}


def measure(batch, seed: int, width: int, depth: int, kernel_width: int, eps: float,
            **kwargs) -> dict[str, float]:
    torch.manual_seed(seed)
    net = QuasiGNN(width, depth, kernel_width=kernel_width, **{"eps_init": eps, **kwargs})
    net.train()
    loss = F.binary_cross_entropy_with_logits(net(batch).view(-1), batch.y.view(-1).float())
    loss.backward()
    rms = net.gradient_rms()
    scale = net.last_alpha.scale.detach()[scalable_nodes(batch)]
    eps_scale = float(net.alpha.eps.detach()[0])
    return {**rms, "gamma/backbone": rms["gamma"] / rms["backbone"],
            "eps/backbone": rms["eps"] / rms["backbone"],
            "std sin(gamma)": float((scale - 1).std() / eps_scale),
            "std scale": float(scale.std())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="agnews_tf")
    parser.add_argument("--graphs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=[f"dataset={args.dataset}"],
                      return_hydra_config=True)
    cfg.paths.data_dir = str(Path.cwd() / "data")
    data = load_zoo(cfg.dataset, "train")
    batch = collate([data[i] for i in range(args.graphs)])
    kernel_width = int(batch.edge_attr.size(1))
    rows = {name: measure(batch, args.seed, int(cfg.width), int(cfg.depth), kernel_width,
                          **{"eps": float(cfg.model.eps_init), **design})
            for name, design in DESIGNS.items()}
    keys = list(next(iter(rows.values())))
    print(f"{args.graphs} graphs of {args.dataset}, seed {args.seed}, width {cfg.width}, "
          f"depth {cfg.depth}: per-parameter RMS gradients at initialisation")
    print("| design | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
