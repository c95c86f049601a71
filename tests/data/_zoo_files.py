"""Write tiny zoos in the published formats, for loader tests."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from neuralgraph_quasi import models

CONFIG_COLUMNS = ["optimizer", "lr", "w_init_std", "l2_regularize", "train_fraction", "dropout"]


def write_transformer_zoo(root: Path, name: str = "ag_news", runs: int = 6,
                          epochs=(1, 75), num_classes: int = 4, seed: int = 0,
                          stray_bias_runs: tuple[int, ...] = ()) -> list[dict]:
    """A Small Transformer Zoo in the published layout; returns the metadata rows."""
    torch.manual_seed(seed)
    accuracy = "test_accuracy" if name == "ag_news" else "test_top1_accuracy"
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    rows = []
    for run in range(runs):
        for epoch in epochs:
            embedding = models.PatchEmbedding() if name == "mnist" else None
            model = models.TransformerClassifier(num_classes=num_classes, embedding=embedding)
            state = model.state_dict()
            if run in stray_bias_runs:
                state["encoder.0.attention.queries.bias"] = torch.zeros(32)
            acc = round(0.25 + 0.1 * (run % 8) + 0.01 * epoch / 75, 4)  # in [0.25, 0.96]
            ckpt = f"{name}/run{run}_{epoch}_{int(acc * 10000)}.pt"
            torch.save(state, root / ckpt)
            rows.append({"optimizer": "adam", "lr": "0.001", "w_init_std": "0.1",
                         "l2_regularize": "1e-4", "train_fraction": "1.0", "dropout": "0.0",
                         "ckpt_epoch": str(epoch), "ckpt_file": ckpt, accuracy: str(acc)})
    with open(root / "metadata" / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows
