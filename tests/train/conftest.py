"""Compose the real ``configs/train.yaml``, shrunk by ``debug=tiny``, into tmp paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """One data directory for the session: each tiny zoo is generated once."""
    return tmp_path_factory.mktemp("zoos")


@pytest.fixture
def train_cfg(zoo_dir, tmp_path):
    """``train_cfg(*overrides)``: the composed config, ``debug=tiny``, outputs in tmp_path."""

    def make(*overrides: str, config: str = "train", debug: str | None = "tiny"):
        preset = f"debug={debug}" if debug else "~debug"
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config, overrides=[preset, f"paths.data_dir={zoo_dir}",
                                              f"paths.output_dir={tmp_path}/outputs",
                                              f"output_dir={tmp_path}/run", *overrides])

    return make
