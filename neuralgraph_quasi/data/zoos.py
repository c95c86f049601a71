"""Zoos named by a dataset config: generate them, or open them as datasets.

A dataset config (``configs/dataset/*.yaml``) names the zoo's ``root``, how many
training runs to generate (``num_models``), a ``generator`` (a ``_target_``
function taking ``root``, ``num_models`` and its own options) and a ``loader``
(a ``_target_`` :class:`~neuralgraph_quasi.data.GraphZoo` class and its options).
The same config serves a published zoo: point ``root`` at its files and nothing is
generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf

from ..symmetry import RandomSymmetry
from ._zoo import GraphZoo, ZooNotFoundError

__all__ = ["make_zoo", "load_zoo"]


def _plain(cfg: Mapping | DictConfig | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _options(section: Mapping) -> tuple[str, dict[str, Any]]:
    section = dict(section)
    target = section.pop("_target_", None)
    if target is None:
        raise ValueError("a dataset config's generator and loader need a _target_")
    return target, section


def make_zoo(cfg: Mapping | DictConfig) -> Path:
    """Generate the zoo ``cfg`` describes under ``cfg.root`` (a no-op when it is complete)."""
    cfg = _plain(cfg)
    if not cfg.get("generator"):
        raise ValueError(f"dataset {cfg.get('name')!r} has no generator: put its published "
                         f"files under {cfg.get('root')}")
    target, options = _options(cfg["generator"])
    return Path(get_method(target)(root=str(cfg["root"]), num_models=int(cfg["num_models"]),
                                   **options))


def load_zoo(cfg: Mapping | DictConfig, split: str = "train", *, generate: bool = True,
             **overrides) -> GraphZoo:
    """The zoo ``cfg`` describes as a dataset split; generated first if absent.

    Args:
        cfg: a dataset config (``root``, ``loader``, ``generator``, ``num_models``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        generate: generate the zoo when its files are missing (else raise
            :class:`~neuralgraph_quasi.data.ZooNotFoundError`, which says how to get it).
        **overrides: loader options (e.g. ``transform=...``, ``min_accuracy=0.4``).

    The config's optional ``augment`` section (``kinds``, ``scale_range``) adds a
    :class:`~neuralgraph_quasi.symmetry.RandomSymmetry` transform to the train split.
    """
    cfg = _plain(cfg)
    target, options = _options(cfg["loader"])
    loader = get_class(target)
    options = {**options, **overrides}
    if split == "train" and cfg.get("augment") and "transform" not in overrides:
        options["transform"] = RandomSymmetry(**cfg["augment"])
    try:
        return loader(str(cfg["root"]), split=split, **options)
    except ZooNotFoundError:
        if not generate or not cfg.get("generator"):
            raise
    make_zoo(cfg)
    return loader(str(cfg["root"]), split=split, **options)
