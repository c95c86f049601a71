"""The hydra dataset configs compose, generate through load_zoo, and load what they made."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from neuralgraph_quasi.data import INRZoo, ZooNotFoundError, load_zoo, make_zoo
from neuralgraph_quasi.symmetry import RandomSymmetry

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _dataset_cfg(name: str, tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("make_zoo", overrides=[f"dataset={name}", f"paths.data_dir={tmp_path}",
                                             *overrides])
    return cfg.dataset


@pytest.mark.parametrize("name", ["agnews_tf", "mnist_tf", "cnn_zoo", "inr"])
def test_dataset_configs_compose_with_known_generator_keys(name, tmp_path):
    cfg = _dataset_cfg(name, tmp_path)
    assert cfg.root.startswith(str(tmp_path))
    assert cfg.loader._target_.startswith("neuralgraph_quasi.data.")
    assert cfg.num_models > 0


def test_load_zoo_generates_a_missing_zoo_once_then_reads_it(tmp_path):
    cfg = _dataset_cfg("inr", tmp_path, "dataset.num_models=12", "dataset.generator.steps=5",
                       "dataset.generator.image_size=8")
    with pytest.raises(ZooNotFoundError, match="make_zoo.py dataset=inr"):
        load_zoo(cfg, "all", generate=False)
    data = load_zoo(cfg, "all")
    assert isinstance(data, INRZoo) and len(data) == 12
    stamp = (Path(cfg.root) / "generator.json").stat().st_mtime_ns
    assert make_zoo(cfg) == Path(cfg.root)  # complete: nothing regenerated
    assert (Path(cfg.root) / "generator.json").stat().st_mtime_ns == stamp


def test_augment_section_adds_a_symmetry_transform_to_the_train_split_only(tmp_path):
    cfg = _dataset_cfg("inr", tmp_path, "dataset.num_models=12", "dataset.generator.steps=5",
                       "dataset.generator.image_size=8",
                       "dataset.augment={kinds:[permutation,sign]}")
    train, val = load_zoo(cfg, "train"), load_zoo(cfg, "val")
    assert isinstance(train.transform, RandomSymmetry) and val.transform is None
    assert train.transform.kinds == ("permutation", "sign")
    plain = load_zoo(cfg, "train", transform=None)
    assert not torch.equal(train[0].edge_attr, plain[0].edge_attr)
