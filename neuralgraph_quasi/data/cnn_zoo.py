"""The Small CNN Zoo (Unterthiner et al. 2020): small CNNs with their test accuracy.

Layout (published, and written by :mod:`neuralgraph_quasi.data.generate.cnn`)::

    root/weights.npy            [N, P] float32, one flattened network per row (P = 4,970)
    root/metrics.csv(.gz)       one row per weights row: config.* columns, modeldir, step,
                                test_accuracy, test_loss, train_accuracy, train_loss
    root/layout.csv             varname, start_idx, end_idx, shape: where each TensorFlow
                                variable lies in a row, e.g. ``sequential/conv2d/kernel:0``
                                at ``[16, 160)`` with shape ``(3, 3, 1, 16)``

A generated zoo also holds ``root/generator.json``.

The architecture is TensorFlow's ``Sequential``: 3 × ``Conv2D(16, 3×3, stride 2,
'valid')`` with the run's activation (ReLU or tanh), global average pooling and
``Dense(10)``. TensorFlow stores conv kernels HWIO and dense kernels ``(in, out)``;
here they become PyTorch's OIHW and ``(out, in)``. 'valid' padding with stride 2
keeps the top-left-aligned windows, ``ceil((H - 2) / 2) == floor((H - 3) / 2) + 1``
of them, which is PyTorch's ``padding=0``: the converted module computes the
same function (checked against a NumPy NHWC reference in the tests).
"""

from __future__ import annotations

import ast
import csv
import gzip
import logging
import math
import os.path as osp
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._zoo import GraphZoo, ZooFormatError, ZooPart

__all__ = ["SmallCNNZoo", "small_cnn", "CNNLayout", "LayoutEntry", "read_layout",
           "standard_layout", "tf_to_torch", "torch_to_tf", "METRICS_COLUMNS", "PUBLISHED_STEP"]

log = logging.getLogger(__name__)

#: The final training step of the published zoo (NFN and its successors use it).
PUBLISHED_STEP = 86
#: The columns of ``metrics.csv`` (published order); the loader needs only :data:`_REQUIRED`.
METRICS_COLUMNS = ("config.activation", "config.b_init", "config.dataset", "config.dropout",
                   "config.init_std", "config.l2reg", "config.learning_rate", "config.optimizer",
                   "config.train_fraction", "config.w_init", "modeldir", "step",
                   "test_accuracy", "test_loss", "train_accuracy", "train_loss")
_REQUIRED = ("config.activation", "step", "test_accuracy")
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
_METRICS_FILES = ("metrics.csv.gz", "metrics.csv")
#: ``<scope>/<conv2d|dense>[_<k>]/<kernel|bias>:<i>``
_VARNAME = re.compile(r"(?P<layer>(?:.*/)?(?P<kind>conv2d|dense)(?:_(?P<index>\d+))?)"
                      r"/(?P<param>kernel|bias):\d+")
#: Position of each parameterised layer in :func:`small_cnn`'s ``nn.Sequential``.
_MODULE_INDEX = (0, 2, 4, 8)
_NUM_CONV = 3


def small_cnn(activation: str = "relu", in_channels: int = 1,
              channels: Sequence[int] = (16, 16, 16), num_classes: int = 10) -> nn.Sequential:
    """The zoo's architecture: 3 × (3×3 stride-2 conv, activation), mean pool, linear.

    Input ``[B, in_channels, H, W]`` (``[B, 1, 28, 28]`` for the zoo's greyscale
    images), output logits ``[B, num_classes]``. Parameter keys: ``{0,2,4}.weight``
    ``[c_out, c_in, 3, 3]``, ``{0,2,4}.bias``, ``8.weight [num_classes, c3]``, ``8.bias``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for c_in, c_out in _conv_channels(in_channels, channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2), _ACTIVATIONS[activation]()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels[-1], num_classes))


def _conv_channels(in_channels: int, channels: Sequence[int]) -> list[tuple[int, int]]:
    """``(c_in, c_out)`` of each conv layer."""
    return list(zip((in_channels, *channels[:-1]), channels, strict=True))


# -- layout.csv -------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutEntry:
    """One TensorFlow variable: ``row[start:end]`` reshaped to ``shape`` (TF layout).

    ``key`` is the matching :func:`small_cnn` state_dict key; ``kind`` is
    ``"conv"`` or ``"dense"``, ``param`` ``"kernel"`` or ``"bias"``.
    """

    varname: str
    start: int
    end: int
    shape: tuple[int, ...]
    key: str
    kind: str
    param: str


@dataclass(frozen=True)
class CNNLayout:
    """Where every parameter lies in a ``weights.npy`` row of ``size`` values.

    ``arch`` holds :func:`small_cnn`'s ``in_channels``, ``channels`` and ``num_classes``.
    """

    entries: tuple[LayoutEntry, ...]
    arch: dict[str, Any]
    size: int

    def rows(self) -> list[dict[str, Any]]:
        """The ``layout.csv`` rows, in ``start`` order."""
        return [{"varname": e.varname, "start_idx": e.start, "end_idx": e.end,
                 "shape": str(e.shape)} for e in sorted(self.entries, key=lambda e: e.start)]


def standard_layout(in_channels: int = 1, channels: Sequence[int] = (16, 16, 16),
                    num_classes: int = 10, bias_first: bool = True) -> CNNLayout:
    """The layout TensorFlow writes for :func:`small_cnn` (bias before kernel by default)."""
    shapes = {f"conv2d{'_' + str(i) if i else ''}": (3, 3, c_in, c_out)
              for i, (c_in, c_out) in enumerate(_conv_channels(in_channels, channels))}
    shapes["dense"] = (channels[-1], num_classes)
    rows, start = [], 0
    for layer, kernel in shapes.items():
        params = (("bias", (kernel[-1],)), ("kernel", kernel))
        for param, shape in params if bias_first else params[::-1]:
            size = math.prod(shape)
            rows.append({"varname": f"sequential/{layer}/{param}:0", "start_idx": start,
                         "end_idx": start + size, "shape": str(shape)})
            start += size
    return _layout_from_rows(rows, "layout.csv")


def read_layout(path: str) -> CNNLayout:
    """Parse and check ``layout.csv``; any mismatch with the architecture raises
    :class:`ZooFormatError` naming the file and the varname."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ZooFormatError(f"{path}: cannot read: {exc}") from exc
    for column in ("varname", "start_idx", "end_idx", "shape"):
        if not rows or column not in rows[0]:
            raise ZooFormatError(f"{path}: missing column {column!r}")
    return _layout_from_rows(rows, path)


def _layout_from_rows(rows: list[dict[str, Any]], path: str) -> CNNLayout:
    layers: dict[str, dict[str, dict]] = {}
    for row in rows:
        entry = _parse_row(row, path)
        params = layers.setdefault(entry["layer"], {"kind": entry["kind"],
                                                    "index": entry["index"]})
        if entry["param"] in params:
            raise ZooFormatError(f"{path}: duplicate variable {row['varname']!r}")
        params[entry["param"]] = entry
    convs = sorted((p for p in layers.values() if p["kind"] == "conv"), key=lambda p: p["index"])
    dense = [p for p in layers.values() if p["kind"] == "dense"]
    if len(convs) != _NUM_CONV or len(dense) != 1:
        names = ", ".join(sorted(layers))
        raise ZooFormatError(f"{path}: expected {_NUM_CONV} conv2d layers and 1 dense layer, "
                             f"found {names or 'none'}")
    entries, arch = _check_chain([*convs, dense[0]], path)
    _check_intervals(entries, path)
    return CNNLayout(tuple(entries), arch, max(e.end for e in entries))


def _parse_row(row: dict[str, Any], path: str) -> dict[str, Any]:
    varname = str(row["varname"])
    match = _VARNAME.fullmatch(varname)
    if match is None:
        raise ZooFormatError(f"{path}: unknown variable {varname!r} (expected "
                             "'<scope>/conv2d[_k]/kernel:0', '.../bias:0' or 'dense')")
    try:
        start, end = int(row["start_idx"]), int(row["end_idx"])
        shape = tuple(int(s) for s in ast.literal_eval(str(row["shape"])))
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ZooFormatError(f"{path}: variable {varname!r}: bad start_idx/end_idx/shape "
                             f"({exc})") from exc
    if end - start != math.prod(shape) or start < 0:
        raise ZooFormatError(f"{path}: variable {varname!r}: [{start}, {end}) does not hold "
                             f"shape {shape}")
    return {"layer": match["layer"], "kind": "conv" if match["kind"] == "conv2d" else "dense",
            "index": int(match["index"] or 0), "param": match["param"], "varname": varname,
            "start": start, "end": end, "shape": shape}


def _check_chain(layers: list[dict], path: str) -> tuple[list[LayoutEntry], dict[str, Any]]:
    """Each layer has a kernel and a bias of matching shapes, chained by channel counts."""
    entries, channels, width = [], [], None
    for module, layer in zip(_MODULE_INDEX, layers, strict=True):
        for param in ("kernel", "bias"):
            if param not in layer:
                other = layer["bias" if param == "kernel" else "kernel"]["varname"]
                raise ZooFormatError(f"{path}: variable {other!r} has no matching {param}")
        kernel, bias = layer["kernel"], layer["bias"]
        conv = layer["kind"] == "conv"
        if conv and (len(kernel["shape"]) != 4 or kernel["shape"][:2] != (3, 3)):
            raise ZooFormatError(f"{path}: variable {kernel['varname']!r}: shape "
                                 f"{kernel['shape']} is not a 3×3 HWIO conv kernel")
        if not conv and len(kernel["shape"]) != 2:
            raise ZooFormatError(f"{path}: variable {kernel['varname']!r}: shape "
                                 f"{kernel['shape']} is not an (in, out) dense kernel")
        c_in, c_out = kernel["shape"][-2:]
        if width is not None and c_in != width:
            raise ZooFormatError(f"{path}: variable {kernel['varname']!r}: {c_in} input "
                                 f"channels after a layer of {width}")
        if bias["shape"] != (c_out,):
            raise ZooFormatError(f"{path}: variable {bias['varname']!r}: shape {bias['shape']}"
                                 f", expected ({c_out},)")
        width = c_out
        channels.append(c_out)
        for param, key in (("kernel", "weight"), ("bias", "bias")):
            e = layer[param]
            entries.append(LayoutEntry(e["varname"], e["start"], e["end"], e["shape"],
                                       f"{module}.{key}", layer["kind"], param))
    arch = {"in_channels": layers[0]["kernel"]["shape"][2], "channels": channels[:-1],
            "num_classes": channels[-1]}
    return entries, arch


def _check_intervals(entries: list[LayoutEntry], path: str) -> None:
    ordered = sorted(entries, key=lambda e: e.start)
    for before, after in pairwise(ordered):
        if after.start < before.end:
            raise ZooFormatError(f"{path}: variable {after.varname!r} overlaps "
                                 f"{before.varname!r}")


# -- TensorFlow <-> PyTorch ----------------------------------------------------------------
def tf_to_torch(rows: np.ndarray | Tensor, layout: CNNLayout) -> dict[str, Tensor]:
    """Stacked :func:`small_cnn` state ``{key: [N, ...]}`` from weights rows ``[N, P]``.

    Conv kernels HWIO -> OIHW (``permute(3, 2, 0, 1)`` per network), dense kernels
    ``(in, out)`` -> ``(out, in)``, biases as they are. Values are copied exactly.
    """
    rows = torch.as_tensor(np.asarray(rows)) if not isinstance(rows, Tensor) else rows
    n = rows.size(0)
    state = {}
    for e in layout.entries:
        block = rows[:, e.start:e.end].reshape(n, *e.shape)
        if e.param == "kernel":
            block = block.permute(0, 4, 3, 1, 2) if e.kind == "conv" else block.transpose(1, 2)
        state[e.key] = block.contiguous()
    return state


def torch_to_tf(state: dict[str, Tensor], layout: CNNLayout) -> np.ndarray:
    """The inverse of :func:`tf_to_torch`: weights rows ``[N, P]`` (float32) in ``layout``."""
    n = next(iter(state.values())).size(0)
    rows = np.zeros((n, layout.size), dtype=np.float32)
    for e in layout.entries:
        block = state[e.key].detach().cpu()
        if e.param == "kernel":
            block = block.permute(0, 3, 4, 2, 1) if e.kind == "conv" else block.transpose(1, 2)
        rows[:, e.start:e.end] = block.reshape(n, -1).numpy()
    return rows


# -- the dataset ---------------------------------------------------------------------------
class SmallCNNZoo(GraphZoo):
    """Small CNN Zoo members as graphs, with their ``test_accuracy`` in ``graph.y``.

    Args:
        root: the zoo directory (published files or a generated zoo).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        activation: keep runs of this ``config.activation`` (``"relu"``, the subset
            Monomial-NFN and the QE paper use, or ``"tanh"``); ``None`` keeps both
            (two architectures, so two parts: pass the graph to :meth:`make_model`).
        step: keep rows of this training ``step``; ``None`` keeps every step. Default
            ``"final"``: 86 for the published zoo; for a generated zoo
            (``generator.json`` present), the last step in its metrics file.
        row_order: the protocol's fixed row order, as file row indices (a sequence,
            or the path of a headerless one-column CSV such as NFN's
            ``predict_gen_data_splits/cifar10_split.csv``); default: file order.
        splits: train/val/test fractions of the NFN protocol (default ``(0.4, 0.1, 0.5)``).
        split_seed: seed of the train/val shuffle (default 0, as NFN).
        min_accuracy: keep members with accuracy ≥ this (before splitting).
        **kwargs: see :class:`~neuralgraph_quasi.data.GraphZoo`.

    Split (NFN's protocol, :meth:`split_indices`): after filtering (activation, step,
    non-finite weights, ``min_accuracy``) the members are put in the fixed row order;
    the last ``splits[2]`` (50%) are the test set; the first part is shuffled with
    ``random.Random(split_seed)`` and cut ``splits[0] : splits[1]`` (80/20) into
    train/val, each cut point truncated with ``int`` as NFN does.

    Members take images ``[B, C, H, W]`` (NCHW; greyscale ``C = 1``). A row whose
    step, accuracy or activation cannot be read is skipped and counted in
    ``self.skipped`` (``on_corrupt="skip"``) or raises; an unreadable ``weights.npy``
    always raises.
    """

    zoo_name = "small_cnn_zoo"

    def __init__(self, root: str, split: str = "train", *, activation: str | None = "relu",
                 step: int | str | None = "final",
                 row_order: str | Sequence[int] | None = None,
                 splits: tuple[float, float, float] = (0.4, 0.1, 0.5), split_seed: int = 0,
                 **kwargs) -> None:
        if activation is not None and activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or None, "
                             f"got {activation!r}")
        self.root = osp.expanduser(str(root))
        self.activation = activation
        self.row_order = row_order
        self.step = self._default_step() if step == "final" else step
        if self.step is not None:
            self.step = int(self.step)
        super().__init__(root, split, splits=splits, split_seed=split_seed, **kwargs)

    # -- locating the files -------------------------------------------------------------
    @property
    def weights_path(self) -> str:
        return osp.join(self.root, "weights.npy")

    @property
    def layout_path(self) -> str:
        return osp.join(self.root, "layout.csv")

    @property
    def metrics_path(self) -> str:
        """``metrics.csv.gz`` if present, else ``metrics.csv``."""
        paths = [osp.join(self.root, name) for name in _METRICS_FILES]
        return next((p for p in paths if osp.exists(p)), paths[-1])

    @property
    def generated(self) -> bool:
        return osp.exists(osp.join(self.root, "generator.json"))

    def source_exists(self) -> bool:
        return all(osp.exists(p) for p in (self.weights_path, self.layout_path,
                                           self.metrics_path))

    def missing_message(self) -> str:
        absent = [osp.basename(p) for p in (self.weights_path, self.metrics_path,
                                            self.layout_path) if not osp.exists(p)]
        return (f"no Small CNN Zoo at {self.root} (missing {', '.join(absent)}). Generate one "
                f"with `python scripts/make_zoo.py dataset=cnn_zoo dataset.root={self.root}`, "
                "or put the published Small CNN Zoo files there: weights.npy, "
                "metrics.csv.gz (or metrics.csv) and layout.csv.")

    def _default_step(self) -> int:
        if not self.generated or not self.source_exists():
            return PUBLISHED_STEP
        steps = {_parse_step(row, self.metrics_path, i) for i, row in
                 enumerate(_read_metrics(self.metrics_path))}
        steps.discard(None)
        if not steps:
            raise ZooFormatError(f"{self.metrics_path}: no readable 'step' value")
        return max(steps)

    # -- GraphZoo interface -----------------------------------------------------------
    def processing_settings(self) -> dict[str, Any]:
        return {**super().processing_settings(), "activation": self.activation,
                "step": self.step}

    def source_files(self) -> tuple[list[str], list[str]]:
        return [self.metrics_path, self.layout_path], [self.weights_path]

    def build_model(self, arch: dict[str, Any]) -> nn.Module:
        return small_cnn(arch["activation"], arch["in_channels"], arch["channels"],
                         arch["num_classes"])

    def read(self) -> list[ZooPart]:
        layout = read_layout(self.layout_path)
        rows = _read_metrics(self.metrics_path)
        selected = self._select(rows)
        weights = self._read_weights(layout, len(rows))
        parts = []
        for activation in sorted({a for _, a, _ in selected}):
            chosen = [(i, acc) for i, a, acc in selected if a == activation]
            file_rows = [i for i, _ in chosen]
            block = np.asarray(weights[file_rows], dtype=np.float32)
            meta = [{**_clean(rows[i]), "row": i} for i in file_rows]
            parts.append(ZooPart({"activation": activation, **layout.arch},
                                 tf_to_torch(block, layout),
                                 torch.tensor([acc for _, acc in chosen]), meta))
        if not parts:
            raise ZooFormatError(f"{self.metrics_path}: no row with step={self.step} and "
                                 f"config.activation={self.activation} (pass step=/activation=)")
        return parts

    def _select(self, rows: list[dict[str, str]]) -> list[tuple[int, str, float]]:
        """``(file row, activation, test_accuracy)`` of the rows the filters keep."""
        selected = []
        for i, row in enumerate(tqdm(rows, desc="reading metrics", unit="row",
                                     disable=not self.log, mininterval=1.0)):
            try:
                step = _parse_step(row, self.metrics_path, i, strict=True)
                activation = row["config.activation"].strip().lower()
                if activation not in _ACTIVATIONS:
                    raise ZooFormatError(f"{self.metrics_path}: row {i}: unknown "
                                         f"config.activation {activation!r}")
                accuracy = _parse_float(row, "test_accuracy", self.metrics_path, i)
            except ZooFormatError as exc:
                if self.on_corrupt == "raise":
                    raise
                self.skipped["unreadable metrics rows"] = (
                    self.skipped.get("unreadable metrics rows", 0) + 1)
                log.warning("skipping %s", exc)
                continue
            if self.step is not None and step != self.step:
                continue
            if self.activation is None or activation == self.activation:
                accuracy = self.parse_accuracy(row["test_accuracy"], f"{self.metrics_path}: "
                                               f"row {i} (line {i + 2}) test_accuracy")
                if accuracy is not None:
                    selected.append((i, activation, accuracy))
        return selected

    def _read_weights(self, layout: CNNLayout, num_rows: int) -> np.ndarray:
        """``weights.npy`` memory-mapped ``[N, P]`` after checking it against the other files."""
        path = self.weights_path
        try:
            weights = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # truncated, not .npy, pickled object array, ...
            raise ZooFormatError(f"{path}: cannot read weights: {exc}") from exc
        if weights.ndim != 2 or not np.issubdtype(weights.dtype, np.floating):
            raise ZooFormatError(f"{path}: expected a 2-D float array, got {weights.dtype} "
                                 f"{weights.shape}")
        if weights.shape[0] != num_rows:
            raise ZooFormatError(f"{path}: {weights.shape[0]} rows but {self.metrics_path} "
                                 f"has {num_rows}")
        if weights.shape[1] != layout.size:
            raise ZooFormatError(f"{path}: {weights.shape[1]} values per row but "
                                 f"{self.layout_path} describes {layout.size}")
        return weights

    def split_indices(self, targets: Tensor) -> dict[str, Tensor]:
        """NFN's split: fixed row order, last ``splits[2]`` test, the rest shuffled
        (``random.Random(split_seed)``) and cut ``splits[0] : splits[1]`` into train/val."""
        order = self._protocol_order()
        if order.numel() != targets.numel():  # pragma: no cover - guards the base class
            raise RuntimeError("split_indices: members and targets disagree")
        n = order.numel()
        trainval_share = self.splits[0] + self.splits[1]
        cut = int(round(trainval_share, 12) * n)
        trainval = order[:cut].tolist()
        random.Random(self.split_seed).shuffle(trainval)
        n_train = int(round(self.splits[0] / trainval_share, 12) * len(trainval)) \
            if trainval_share else 0
        return {"train": torch.tensor(trainval[:n_train], dtype=torch.long),
                "val": torch.tensor(trainval[n_train:], dtype=torch.long), "test": order[cut:]}

    def _protocol_order(self) -> Tensor:
        """Positions of the (``min_accuracy``-filtered) members, in the fixed row order."""
        file_rows = torch.tensor([m["row"] for p in self._parts for m in p["meta"]],
                                 dtype=torch.long)
        rank = file_rows if self.row_order is None else self._rank_of(file_rows)
        if self.min_accuracy is not None:  # as the base class filters before splitting
            rank = rank[self.all_targets() >= self.min_accuracy]
        return torch.argsort(rank, stable=True)

    def _rank_of(self, file_rows: Tensor) -> Tensor:
        """Position of each file row in ``row_order``."""
        order = self.row_order
        if isinstance(order, str):
            order = np.loadtxt(order, dtype=np.int64, delimiter=",", ndmin=1)
        order = torch.as_tensor(np.asarray(order, dtype=np.int64))
        size = max(int(t.max()) + 1 if t.numel() else 0 for t in (order, file_rows))
        rank = torch.full((size,), -1, dtype=torch.long)
        rank[order] = torch.arange(order.numel())
        rank = rank[file_rows]
        if bool((rank < 0).any()):
            raise ValueError("row_order does not list every file row of the zoo's members")
        return rank


# -- metrics.csv ---------------------------------------------------------------------------
def _read_metrics(path: str) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` or ``metrics.csv.gz``, checked for the needed columns."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise ZooFormatError(f"{path}: cannot read: {exc}") from exc
    for column in _REQUIRED:
        if column not in columns:
            raise ZooFormatError(f"{path}: missing column {column!r}")
    return rows


def _parse_float(row: dict[str, str], column: str, path: str, i: int) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError) as exc:
        raise ZooFormatError(f"{path}: row {i}: bad {column} {row[column]!r}") from exc


def _parse_step(row: dict[str, str], path: str, i: int, strict: bool = False) -> int | None:
    try:
        value = _parse_float(row, "step", path, i)
        if not value.is_integer():
            raise ZooFormatError(f"{path}: row {i}: step {row['step']!r} is not an integer")
        return int(value)
    except ZooFormatError:
        if strict:
            raise
        return None


def _clean(row: dict[str, str]) -> dict[str, str]:
    """A metrics row without pandas' unnamed index column or surplus fields."""
    return {k: v for k, v in row.items() if k}
