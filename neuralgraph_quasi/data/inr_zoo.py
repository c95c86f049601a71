"""SIREN INR zoos (NFN, Zhou et al. 2023): one small SIREN per image, labelled by class.

Each member is the state_dict of a SIREN that maps a pixel coordinate ``(x0, x1)`` in
``[-1, 1]^2`` to the image's values: ``2 -> 32 -> 32 -> 1`` (``-> 3`` for colour) with
``sin(w0 * .)`` after each hidden linear layer (``w0 = 30``) and a linear output, i.e.
:func:`neuralgraph_quasi.models.siren`. Layouts read (both may hold ``.pth`` or ``.pt``)::

    root/<label>/<name><idx>.pth              a folder per class: ``3/``, ``7/``, ...
    root/randinit_smaller_<label>s/net<idx>.pth     NFN's naming (``..._<label>s``)
    root/labels.csv                           per file: columns ``file,label`` (file
                                              relative to root; more columns go to meta)

State_dict keys may be those of :func:`~neuralgraph_quasi.models.siren`
(``0.weight, 0.bias, 2.weight, ..., 4.bias``) or NFN's ``Siren``
(``net.0.linear.weight, ..., net.1.linear.bias, net.2.weight, net.2.bias``). Width,
depth and output channels are read from each file; members of different shapes go to
separate parts. A generated zoo (:mod:`neuralgraph_quasi.data.generate.inr`) writes the
NFN folder layout plus ``labels.csv`` and ``generator.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import os.path as osp
import re
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import models
from .._errors import ConversionError
from ..graph import StateStacker
from ._zoo import GraphZoo, ZooFormatError, ZooPart

__all__ = ["INRZoo", "coordinate_grid", "render", "siren_keys", "canonical_state", "infer_arch",
           "NFN_SPLIT_POINTS", "LABELS_FILE", "CHECKPOINT_SUFFIXES"]

log = logging.getLogger(__name__)

#: NFN's split by image index: train ``idx < 45,000``, val ``< 50,000``, test the rest
#: (FashionMNIST INRs: ``(55_000, 60_000)``).
NFN_SPLIT_POINTS = (45_000, 50_000)
#: The per-file label table at the zoo's root.
LABELS_FILE = "labels.csv"
CHECKPOINT_SUFFIXES = (".pth", ".pt")

_LABEL_DIR = re.compile(r"(?:.*_)?(\d+)s?")  # "3", "randinit_smaller_3s", "..._aug0_3s"
_NET_INDEX = re.compile(r"net(\d+)")
_DIGITS = re.compile(r"\d+")
_LAYER_NUMBER = {"nfn": re.compile(r"net\.(\d+)\."), "siren": re.compile(r"(\d+)\.")}
_NOT_ZOO_DIRS = {"processed", "manifest"}


# ----------------------------------------------------------------------------- rendering

def coordinate_grid(size: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """The INR's input grid: ``[size*size, 2]`` coordinates in ``[-1, 1]``.

    Row-major (NFN's ``get_mgrid``, ``indexing="ij"``): entry ``r*size + c`` is
    ``(lin[r], lin[c])`` with ``lin = linspace(-1, 1, size)``.
    """
    lin = torch.linspace(-1, 1, size, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(lin, lin, indexing="ij"), dim=-1).reshape(-1, 2)


def render(inr: nn.Module, size: int) -> Tensor:
    """The image an INR represents: ``[C, size, size]`` (values in the INR's own range;
    the generated digits zoo uses ``[-1, 1]``), in the INR's dtype and device."""
    param = next(inr.parameters())
    coords = coordinate_grid(size, param.dtype, param.device)
    out = inr(coords)  # [size*size, C]
    return out.reshape(size, size, -1).permute(2, 0, 1)


# ----------------------------------------------------------------------------- key layouts

def siren_keys(layers: int, naming: str = "siren") -> dict[str, str]:
    """File key -> :func:`~neuralgraph_quasi.models.siren` key, for ``layers`` linear layers.

    ``naming``: ``"siren"`` (``{2i}.weight``) or ``"nfn"`` (``net.{i}.linear.weight`` for
    the sine layers, ``net.{last}.weight`` for the linear output).
    """
    keys = {}
    for i in range(layers):
        for kind in ("weight", "bias"):
            if naming == "nfn":
                name = f"net.{i}.linear.{kind}" if i < layers - 1 else f"net.{i}.{kind}"
            else:
                name = f"{2 * i}.{kind}"
            keys[name] = f"{2 * i}.{kind}"
    return keys


def _naming(state: dict) -> str:
    return "nfn" if any(k.startswith("net.") for k in state) else "siren"


def _layer_count(state: dict, naming: str) -> int:
    """Linear layers named by the keys (at least 1, so that an empty state reports
    ``0.weight`` missing)."""
    numbers = [int(m[1]) for k in state if (m := _LAYER_NUMBER[naming].match(k))]
    if not numbers:
        return 1
    return max(numbers) + 1 if naming == "nfn" else max(numbers) // 2 + 1


def canonical_state(state: dict, path: str) -> tuple[dict[str, Tensor], int]:
    """Check ``state``'s keys against a SIREN's and rename them to ``models.siren``'s.

    Returns:
        the renamed state and the number of linear layers.

    Raises:
        ZooFormatError: naming ``path`` and the first missing or unknown key (as the
            file spells it), or a value that is not a tensor.
    """
    naming = _naming(state)
    layers = _layer_count(state, naming)
    expected = siren_keys(layers, naming)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ZooFormatError(f"{path}: missing key {missing[0]!r} (a {layers}-layer SIREN)")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ZooFormatError(f"{path}: unknown key {unknown[0]!r} (a SIREN has only "
                             f"{', '.join(expected)})")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ZooFormatError(f"{path}: key {key!r} is a {type(value).__name__}, "
                                 "not a tensor")
    return {canon: state[key] for key, canon in expected.items()}, layers


def infer_arch(state: dict[str, Tensor], layers: int, path: str, w0: float) -> dict[str, Any]:
    """The :func:`~neuralgraph_quasi.models.siren` keyword arguments of a canonical state.

    ``in_features`` and ``hidden`` come from ``0.weight``, ``out_features`` from the last
    weight, ``depth = layers - 1``; every shape is then checked.

    Raises:
        ZooFormatError: naming ``path``, the key and both shapes on a mismatch.
    """
    first, last = state["0.weight"], state[f"{2 * (layers - 1)}.weight"]
    for key, weight in (("0.weight", first), (f"{2 * (layers - 1)}.weight", last)):
        if weight.dim() != 2:
            raise ZooFormatError(f"{path}: key {key!r} has shape {list(weight.shape)}, "
                                 "expected a matrix [out, in]")
    hidden = int(first.shape[0]) if layers > 1 else 0
    arch = {"in_features": int(first.shape[1]), "hidden": hidden, "depth": layers - 1,
            "out_features": int(last.shape[0]), "w0": float(w0)}
    for i in range(layers):
        rows = arch["out_features"] if i == layers - 1 else hidden
        cols = arch["in_features"] if i == 0 else hidden
        for key, shape in ((f"{2 * i}.weight", [rows, cols]), (f"{2 * i}.bias", [rows])):
            if list(state[key].shape) != shape:
                raise ZooFormatError(f"{path}: key {key!r} (canonical name) has shape "
                                     f"{list(state[key].shape)}, expected {shape} for a "
                                     f"SIREN {_describe(arch)}")
    return arch


def _describe(arch: dict[str, Any]) -> str:
    widths = [arch["in_features"]] + [arch["hidden"]] * arch["depth"] + [arch["out_features"]]
    return "->".join(str(w) for w in widths)


def _file_index(name: str) -> int | None:
    """The image index in a file name: ``net<idx>``, else its last run of digits."""
    stem = osp.splitext(osp.basename(name))[0]
    match = _NET_INDEX.search(stem)
    if match:
        return int(match[1])
    digits = _DIGITS.findall(stem)
    return int(digits[-1]) if digits else None


# ----------------------------------------------------------------------------- the dataset

class INRZoo(GraphZoo):
    """A zoo of SIREN INRs as graphs, with the integer class label in ``graph.y``.

    Args:
        root: the zoo directory (see the module docstring for the layouts).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        split_mode: ``"random"`` (seeded ``splits``, default 0.7/0.15/0.15, seed 3, each
            member placed by its image index alone) or
            ``"nfn"``: by the image index parsed from ``net<idx>``: train
            ``idx < nfn_split_points[0]``, val ``< nfn_split_points[1]``, test the rest.
        nfn_split_points: NFN's thresholds (``(45_000, 50_000)``; FashionMNIST
            ``(55_000, 60_000)``).
        labels: ``"auto"`` (``labels.csv`` when present, else folders), ``"file"`` or
            ``"folder"``.
        prefix: folder layout only: read just the folders named ``<prefix>_<label>s``
            (e.g. ``"randinit_smaller"`` to leave NFN's ``..._aug<k>_<label>s`` copies out).
            ``None``: every folder whose name ends in a label.
        w0: the sine frequency of the zoo's SIRENs (not stored in the files).
        classes: labels must lie in ``[0, classes)``; ``None``: any label ``>= 0``.
            A member whose label breaks this (or is not an integer) is skipped and counted
            in ``skipped["bad labels"]`` (``on_corrupt="raise"``: raises).
        **kwargs: see :class:`~neuralgraph_quasi.data.GraphZoo` (``min_accuracy`` does
            not apply: targets are class labels).

    ``meta(i)`` gives ``file`` (relative to root), ``label`` and ``idx`` (the image
    index, ``None`` when the name has none), plus any extra ``labels.csv`` columns.
    """

    zoo_name = "inr_zoo"

    def __init__(self, root: str, split: str = "train", *, split_mode: str = "random",
                 nfn_split_points: tuple[int, int] = NFN_SPLIT_POINTS, labels: str = "auto",
                 prefix: str | None = None, w0: float = 30.0, classes: int | None = None,
                 **kwargs) -> None:
        if split_mode not in ("random", "nfn"):
            raise ValueError(f"split_mode must be 'random' or 'nfn', got {split_mode!r}")
        if labels not in ("auto", "file", "folder"):
            raise ValueError(f"labels must be 'auto', 'file' or 'folder', got {labels!r}")
        if kwargs.get("min_accuracy") is not None:
            raise ValueError("INRZoo targets are class labels: min_accuracy does not apply")
        lo, hi = nfn_split_points
        if not 0 <= lo <= hi:
            raise ValueError(f"nfn_split_points must satisfy 0 <= val <= test, got "
                             f"{nfn_split_points}")
        self.root = osp.expanduser(str(root))
        self.split_mode, self.nfn_split_points = split_mode, (int(lo), int(hi))
        self.prefix, self.w0 = prefix, float(w0)
        self.classes = None if classes is None else int(classes)
        self.labels = labels if labels != "auto" else (
            "file" if osp.exists(self.labels_path) else "folder")
        super().__init__(root, split, **kwargs)

    # -- locating the files ---------------------------------------------------------
    @property
    def labels_path(self) -> str:
        return osp.join(self.root, LABELS_FILE)

    def source_exists(self) -> bool:
        if self.labels == "file":
            return osp.exists(self.labels_path)
        return any(True for _ in self._folder_files())

    def missing_message(self) -> str:
        return (f"no INR zoo at {self.root}: expected one SIREN state_dict per image "
                f"(.pth/.pt) in a folder per class (`<label>/net<idx>.pth`, or NFN's "
                f"`randinit_smaller_<label>s/net<idx>.pth`), or files listed in "
                f"{self.labels_path} (columns file,label). Generate one from scikit-learn's "
                f"digits with `python scripts/make_zoo.py dataset=inr dataset.root={self.root}`, "
                f"or extract the NFN SIREN zoo (e.g. its MNIST or CIFAR-10 INR archive) there.")

    def _label_of_folder(self, name: str) -> int | None:
        if self.prefix is not None:
            match = re.fullmatch(re.escape(self.prefix) + r"_(\d+)s", name)
        else:
            match = _LABEL_DIR.fullmatch(name)
        return int(match[1]) if match else None

    def _folder_files(self):
        """``(folder name, file name)`` of every checkpoint one level below root."""
        if not osp.isdir(self.root):
            return
        for folder in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not folder.is_dir() or folder.name.startswith(".") or \
                    folder.name in _NOT_ZOO_DIRS:
                continue
            for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
                if entry.is_file() and entry.name.endswith(CHECKPOINT_SUFFIXES):
                    yield folder.name, entry.name

    def _entries_from_folders(self) -> list[dict[str, Any]]:
        entries = []
        for folder, name in self._folder_files():
            label = self._label_of_folder(folder)
            if label is None:
                if self.prefix is not None:
                    continue  # another prefix (e.g. NFN's augmented copies)
                raise ZooFormatError(
                    f"{osp.join(self.root, folder)}: cannot read a class label from the folder "
                    f"name {folder!r} (expected `<label>` or `<prefix>_<label>s`); move its "
                    f"files or list them in {LABELS_FILE}")
            rel = f"{folder}/{name}"
            if self.parse_class_label(label, osp.join(self.root, rel),
                                      self.classes) is None:
                continue
            entries.append({"file": rel, "label": label, "idx": _file_index(name)})
        entries.sort(key=lambda e: (e["idx"] is None, e["idx"] or 0, e["file"]))
        return entries

    def _entries_from_table(self) -> list[dict[str, Any]]:
        path = self.labels_path
        rows = []
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                columns = reader.fieldnames or []
                for column in ("file", "label"):
                    if column not in columns:
                        raise ZooFormatError(f"{path}: missing column {column!r} "
                                             f"(has {reader.fieldnames})")
                for row in reader:
                    extra = row.pop(None, None) or []
                    missing = sum(value is None for value in row.values())
                    if extra or missing:
                        raise ZooFormatError(f"{path}: line {reader.line_num}: "
                                             f"{len(columns) - missing + len(extra)} field(s), "
                                             f"the header has {len(columns)}")
                    rows.append((reader.line_num, row))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ZooFormatError(f"{path}: cannot read: {exc}") from exc
        entries = []
        for line, row in rows:
            label = self.parse_class_label(row["label"], f"{path}: line {line} ({row['file']})",
                                           self.classes)
            if label is not None:
                entries.append({**row, "label": label, "idx": _file_index(row["file"])})
        return entries

    # -- GraphZoo interface -----------------------------------------------------------
    def processing_settings(self) -> dict[str, Any]:
        return {**super().processing_settings(), "labels": self.labels, "prefix": self.prefix,
                "w0": self.w0, "classes": self.classes}

    def source_files(self) -> tuple[list[str], list[str]]:
        if self.labels == "folder":
            return [], [osp.join(self.root, folder, name)
                        for folder, name in self._folder_files()]
        try:  # the files the table lists (a garbled table raises when the cache is rebuilt)
            with open(self.labels_path, newline="", encoding="utf-8") as handle:
                listed = [row.get("file") for row in csv.DictReader(handle)]
        except (OSError, UnicodeDecodeError, csv.Error):
            listed = []
        return [self.labels_path], [osp.join(self.root, f) for f in listed
                                    if isinstance(f, str)]

    def build_model(self, arch: dict[str, Any]) -> nn.Module:
        return models.siren(**arch)

    def read(self) -> list[ZooPart]:
        entries = (self._entries_from_table() if self.labels == "file"
                   else self._entries_from_folders())
        parts: dict[str, ZooPart] = {}
        stackers: dict[str, StateStacker] = {}
        for entry in tqdm(entries, desc="reading INR checkpoints", unit="INR",
                          disable=not self.log):
            path = osp.join(self.root, entry["file"])
            state = self.read_checkpoint(path)
            if state is None:
                continue
            state, layers = canonical_state(state, path)
            arch = infer_arch(state, layers, path, self.w0)
            key = json.dumps(arch, sort_keys=True)
            if key not in parts:
                parts[key] = ZooPart(arch, None, [], [])
                stackers[key] = StateStacker.for_model(self.build_model(arch), len(entries))
            try:
                stackers[key].add(state, where=f"{path}: ")
            except ConversionError as exc:  # not expected after infer_arch's checks
                raise ZooFormatError(str(exc)) from None
            parts[key].targets.append(entry["label"])
            parts[key].meta.append(entry)
        for key, part in parts.items():
            part.targets = torch.tensor(part.targets, dtype=torch.long)
            part.values = stackers[key].result()
        if len(parts) > 1:
            log.info("INR zoo %s: %d architectures: %s", self.root, len(parts),
                     ", ".join(_describe(p.arch) for p in parts.values()))
        return list(parts.values())

    # -- splits -------------------------------------------------------------------------
    def image_indices(self) -> Tensor:
        """``[n]`` image index of every cached member (``-1`` where the name has none)."""
        idx = [-1 if m.get("idx") is None else int(m["idx"])
               for part in self._parts for m in part["meta"]]
        return torch.tensor(idx, dtype=torch.long)

    def member_identity(self, meta: dict[str, Any]) -> int | str:
        """The image index (NFN's augmented copies of an image share it, so they share a
        split), else the file."""
        return int(meta["idx"]) if meta.get("idx") is not None else str(meta["file"])

    def split_indices(self, targets: Tensor) -> dict[str, Tensor]:
        """The base class's per-member split (by image index), or NFN's split by image
        index thresholds."""
        if self.split_mode == "random":
            return super().split_indices(targets)
        idx = self.image_indices()
        self._check_nfn_indices(idx)
        lo, hi = self.nfn_split_points
        return {"train": (idx < lo).nonzero().view(-1),
                "val": ((idx >= lo) & (idx < hi)).nonzero().view(-1),
                "test": (idx >= hi).nonzero().view(-1)}

    def _check_nfn_indices(self, idx: Tensor) -> None:
        files = [m["file"] for part in self._parts for m in part["meta"]]
        if bool((idx < 0).any()):
            bad = files[int((idx < 0).nonzero()[0])]
            raise ZooFormatError(f"{osp.join(self.root, bad)}: split_mode='nfn' needs an image "
                                 "index in every file name (net<idx>.pth)")
        values, counts = torch.unique(idx, return_counts=True)
        if bool((counts > 1).any()):
            dup = int(values[counts > 1][0])
            twins = [f for f, i in zip(files, idx.tolist(), strict=True) if i == dup]
            raise ZooFormatError(f"{self.root}: image index {dup} appears in {twins[:3]}: with "
                                 "split_mode='nfn' each image must appear once (NFN's augmented "
                                 "copies: pass prefix='randinit_smaller')")
