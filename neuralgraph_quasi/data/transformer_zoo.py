"""The Small Transformer Zoo (Tran et al. 2025): AGNews- and MNIST-Transformers.

Layout (published, and written by the generator):

    root/metadata/ag_news.csv        run config columns, ckpt_epoch, ckpt_file, test_accuracy
    root/ag_news/<run>_<epoch>_<int(acc*10000)>.pt     one state_dict per checkpoint
    root/metadata/mnist.csv          ... test_top1_accuracy
    root/mnist/<run>_<epoch>_<acc>.pt

A generated zoo also holds ``root/generator.json`` (and its embedding and corpus).
"""

from __future__ import annotations

import csv
import logging
import os.path as osp
import re
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import models
from .._errors import ConversionError
from ..graph import StateStacker
from ._zoo import GraphZoo, ZooFormatError, ZooPart

__all__ = ["SmallTransformerZoo"]

log = logging.getLogger(__name__)

_ACCURACY = {"ag_news": "test_accuracy", "mnist": "test_top1_accuracy"}
_GENERATOR = {"ag_news": "agnews_tf", "mnist": "mnist_tf"}
#: Keys known to appear in some published checkpoints although the architecture has no such
#: parameter (the attention is bias-free): dropped and counted.
_SPURIOUS = re.compile(r"encoder\.\d+\.attention\.queries\.bias")
_RUN_OF_FILE = re.compile(r"(.+)_\d+_\d+\.pt")  # <run>_<epoch>_<int(acc*10000)>.pt
PUBLISHED_EPOCH = 75


class SmallTransformerZoo(GraphZoo):
    """AGNews- or MNIST-Transformers as graphs, with their test accuracy in ``graph.y``.

    Args:
        root: the zoo directory (published files or a generated zoo).
        name: ``"ag_news"`` or ``"mnist"``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (0.7/0.15/0.15, seed 3, each
            run placed by its run id: :meth:`member_identity`).
        epoch: the checkpoint epoch to use. Default: 75 for the published zoo; for a
            generated zoo (``generator.json`` present), its last checkpoint epoch.
        min_accuracy: keep members with accuracy ≥ this before splitting (the papers
            use 0.2/0.4/0.6/0.8).
        **kwargs: see :class:`~neuralgraph_quasi.data.GraphZoo`.

    AGNews members take already-embedded tokens ``[B, T, 32]``: the frozen shared
    embedding is not part of a member (the published checkpoints have no
    ``embedding.*`` keys). MNIST members include their patch embedding. The class
    count is read from ``classifier.fc2.weight``.
    """

    zoo_name = "small_transformer_zoo"

    def __init__(self, root: str, name: str = "ag_news", split: str = "train", *,
                 epoch: int | str | None = None, **kwargs) -> None:
        if name not in _ACCURACY:
            raise ValueError(f"name must be one of {sorted(_ACCURACY)}, got {name!r}")
        self.name = name
        self.root = osp.expanduser(str(root))
        self.epoch = str(epoch) if epoch is not None else self._default_epoch()
        super().__init__(root, split, **kwargs)

    # -- locating the files ---------------------------------------------------------
    @property
    def metadata_path(self) -> str:
        return osp.join(self.root, "metadata", f"{self.name}.csv")

    @property
    def generated(self) -> bool:
        return osp.exists(osp.join(self.root, "generator.json"))

    def source_exists(self) -> bool:
        return osp.exists(self.metadata_path)

    def missing_message(self) -> str:
        return (f"no Small Transformer Zoo ({self.name}) at {self.root}: expected "
                f"{self.metadata_path} and checkpoints under {osp.join(self.root, self.name)}/. "
                f"Generate one with `python scripts/make_zoo.py dataset={_GENERATOR[self.name]} "
                f"dataset.root={self.root}`, or put the published Small Transformer Zoo files "
                f"(metadata/{self.name}.csv and {self.name}/*.pt) there.")

    def _rows(self) -> list[tuple[int, dict[str, str]]]:
        """``(line, row)`` of every metadata row; a row with missing or surplus fields, or
        a file that is not UTF-8 CSV, raises :class:`ZooFormatError` naming file and line."""
        path = self.metadata_path
        needed = ("ckpt_epoch", "ckpt_file", _ACCURACY[self.name])
        rows = []
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                columns = reader.fieldnames or []
                for column in needed:
                    if column not in columns:
                        raise ZooFormatError(f"{path}: missing column {column!r}")
                for row in reader:
                    extra = row.pop(None, None) or []
                    missing = sum(value is None for value in row.values())
                    if extra or missing:
                        fields = len(columns) - missing + len(extra)
                        raise ZooFormatError(f"{path}: line {reader.line_num}: {fields} "
                                             f"field(s), the header has {len(columns)}")
                    rows.append((reader.line_num, row))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ZooFormatError(f"{path}: cannot read: {exc}") from exc
        return rows

    def _default_epoch(self) -> str:
        if not self.generated or not self.source_exists():
            return str(PUBLISHED_EPOCH)
        epochs = {row["ckpt_epoch"] for _, row in self._rows()}
        numeric = [int(e) for e in epochs if e.isdigit()]
        if not numeric:
            raise ZooFormatError(f"{self.metadata_path}: no numeric ckpt_epoch")
        return str(max(numeric))

    # -- GraphZoo interface -----------------------------------------------------------
    def processing_settings(self) -> dict[str, Any]:
        return {**super().processing_settings(), "name": self.name, "epoch": self.epoch}

    def source_files(self) -> tuple[list[str], list[str]]:
        files = [osp.join(self.root, row["ckpt_file"]) for _, row in self._rows()
                 if row["ckpt_epoch"] == self.epoch]
        return [self.metadata_path], files

    def build_model(self, arch: dict[str, Any]) -> nn.Module:
        embedding = models.PatchEmbedding() if arch["name"] == "mnist" else None
        return models.TransformerClassifier(num_classes=arch["num_classes"],
                                            embedding=embedding)

    def read(self) -> list[ZooPart]:
        rows = [(line, r) for line, r in self._rows() if r["ckpt_epoch"] == self.epoch]
        if not rows:
            raise ZooFormatError(f"{self.metadata_path}: no checkpoint of epoch {self.epoch} "
                                 f"(pass epoch=... to choose another)")
        # One pass, one checkpoint in memory at a time: each is written into its
        # architecture's preallocated value matrix (a zoo has one class count, rarely more).
        parts: dict[int, ZooPart] = {}
        stackers: dict[int, StateStacker] = {}
        spurious = 0
        for line, row in tqdm(rows, desc=f"reading {self.name} checkpoints", unit="ckpt",
                              disable=not self.log):
            accuracy = self.parse_accuracy(row[_ACCURACY[self.name]],
                                           f"{self.metadata_path}: line {line} "
                                           f"({row['ckpt_file']})")
            if accuracy is None:
                continue
            path = osp.join(self.root, row["ckpt_file"])
            state = self.read_checkpoint(path)
            if state is None:
                continue
            stray = [k for k in state if _SPURIOUS.fullmatch(k)]
            spurious += len(stray)
            for k in stray:
                del state[k]
            num_classes = self._num_classes(state, path)
            if num_classes not in parts:
                arch = {"name": self.name, "num_classes": num_classes}
                parts[num_classes] = ZooPart(arch, None, [], [])
                stackers[num_classes] = StateStacker.for_model(self.build_model(arch), len(rows))
            try:
                stackers[num_classes].add(state, where=f"{path}: ")
            except ConversionError as exc:  # a missing/unknown key or a wrong shape
                raise ZooFormatError(str(exc)) from None
            parts[num_classes].targets.append(accuracy)
            parts[num_classes].meta.append(row)
        if spurious:
            self.skipped["spurious queries.bias keys dropped"] = spurious
            log.info("%s: dropped %d spurious queries.bias keys", self.name, spurious)
        for num_classes, part in parts.items():
            part.targets = torch.tensor(part.targets)
            part.values = stackers[num_classes].result()
        return list(parts.values())

    def member_identity(self, meta: dict[str, Any]) -> int | str:
        """The run: the metadata's ``run`` column (generated zoos), else the ``<run>`` part
        of ``<run>_<epoch>_<acc>.pt`` (published zoo), else the checkpoint file."""
        if meta.get("run") not in (None, ""):
            return str(meta["run"])
        name = osp.basename(str(meta.get("ckpt_file", "")))
        match = _RUN_OF_FILE.fullmatch(name)
        return match[1] if match else str(meta.get("ckpt_file", ""))

    @staticmethod
    def _num_classes(state: dict, path: str) -> int:
        weight = state.get("classifier.fc2.weight")
        if weight is None:
            raise ZooFormatError(f"{path}: missing key 'classifier.fc2.weight'")
        return int(weight.shape[0])


