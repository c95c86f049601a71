"""Base class of the model-zoo datasets: graphs sharing their topology, cached once.

A zoo holds thousands of networks of one (or a few) architectures. PyG's
``InMemoryDataset`` would store each graph's structure (edge index, types,
addresses: a dozen integer tensors per edge) once per member; for the AGNews
transformer zoo that is ~16,000 × 18,000 edges × 12 integers. Here every
architecture's structure is stored once (a :class:`~neuralgraph_quasi.graph._builder.Template`
rebuilt from its module), and each member keeps only its flat parameter vector.
``dataset[i]`` gathers that vector into a :class:`~neuralgraph_quasi.NeuralGraph`
that shares the structure tensors (treat them as read-only).

Random splits are per member (:func:`split_position`): a member's split is a function of
its own identity (:meth:`GraphZoo.member_identity`: a run id, an image index) and the
seed, so adding, losing or skipping other members never moves it.

Processing (reading checkpoints, bulk conversion) runs once per combination of
the settings that affect it (:meth:`GraphZoo.processing_settings`, the
``pre_transform`` and ``pre_filter``); each combination gets its own processed
directory, so changing any of them re-processes. Selection that is cheap
(accuracy threshold, split) happens at load time. The cache also records a fingerprint of
its sources (:meth:`GraphZoo.source_files`: the label tables by content, the other files by
name, size and modification time); when the zoo's files change (completed, regenerated,
members deleted, truncated or relabelled) the cache is rebuilt in place, with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Dataset

from ..graph import NeuralGraph, flat_from_graph, graph_from_values, stack_values, template
from ._atomic import atomic_torch_save

__all__ = ["GraphZoo", "ZooPart", "ZooNotFoundError", "ZooFormatError", "SPLITS",
           "split_position"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1


_MASK64 = (1 << 64) - 1
#: 2^64 / golden ratio, odd: consecutive numbers land evenly spread over [0, 1).
_GOLDEN64 = 0x9E3779B97F4A7C15
_TRAILING_NUMBER = re.compile(r"(.*?)(\d+)")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def split_position(identity: int | str, seed: int) -> float:
    """Where a member lies in ``[0, 1)`` for the random split; it depends only on its own
    ``identity`` (a run id, an image index, a name) and ``seed``.

    An identity ending in a number (``17``, ``"17"``, ``"run17"``) is split into a stem and
    that number; the position is ``hash(seed, stem) + number * (golden ratio - 1)`` modulo 1
    (exact 64-bit integer arithmetic). Consecutive numbers of one stem are thus spread
    almost evenly (any 20 consecutive run ids fill a 0.7/0.15/0.15 split), while members
    with other stems or seeds are placed independently. An identity without digits is
    hashed. A split is then a range of positions (``[0, 0.7)`` train, ...).
    """
    if isinstance(identity, bool) or not isinstance(identity, (int, str)):
        raise TypeError(f"a member identity must be an int or a str, got "
                        f"{type(identity).__name__} {identity!r}")
    stem, number = "", identity
    if isinstance(identity, str):
        match = _TRAILING_NUMBER.fullmatch(identity)
        stem, number = (match[1], int(match[2])) if match else (identity, 0)
    start = _hash64(f"{int(seed)}\x00{stem}")
    return ((start + int(number) * _GOLDEN64) & _MASK64) / 2.0 ** 64


class ZooNotFoundError(FileNotFoundError):
    """The zoo's files are not where the dataset looks; the message says how to get them."""


class ZooFormatError(ValueError):
    """A zoo file that does not follow its format; the message names the file and key."""


@dataclass
class ZooPart:
    """The members of one architecture, as read from the zoo's files.

    Attributes:
        arch: JSON-able keyword arguments from which :meth:`GraphZoo.build_model`
            builds the architecture.
        states: a list of state_dicts, or a mapping from key to stacked ``[m, ...]``
            tensors; or ``None`` when ``values`` is given.
        targets: ``[m]`` float targets (accuracy) or long labels.
        meta: per member, JSON-able facts (file, run, epoch, ...), kept in the cache.
        values: already stacked ``(template, values [m, P], ints [m, k])``, e.g. from a
            :class:`~neuralgraph_quasi.graph.StateStacker` filled while reading files
            one at a time (large zoos: the checkpoints are never all in memory).
    """

    arch: dict[str, Any]
    states: Any
    targets: Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)
    values: tuple | None = None


class GraphZoo(Dataset):
    """A zoo of networks as :class:`~neuralgraph_quasi.NeuralGraph` s, split and filtered.

    Subclasses implement :meth:`read` (the zoo's files to :class:`ZooPart` s),
    :meth:`build_model`, :meth:`source_exists` / :meth:`missing_message`, and
    may extend :meth:`processing_settings`, :meth:`member_identity` and :meth:`split_indices`.

    Args:
        root: the zoo's directory.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        splits: fractions of train/val/test (after filtering).
        split_seed: seed of the per-member split (:func:`split_position`).
        min_accuracy: keep members whose target is at least this (before splitting).
        transform: applied on every access (e.g. ``symmetry.RandomSymmetry``).
        pre_transform: applied once before caching; must keep each graph's structure.
        pre_filter: applied once before caching; members for which it is False are dropped.
        on_corrupt: ``"skip"`` (log and count) or ``"raise"`` for unreadable files.
        force_reload: re-process even if a cache exists.
    """

    #: Name used in cache directories and messages.
    zoo_name = "zoo"

    def __init__(self, root: str, split: str = "train", *,
                 splits: tuple[float, float, float] = (0.7, 0.15, 0.15), split_seed: int = 3,
                 min_accuracy: float | None = None, transform=None, pre_transform=None,
                 pre_filter=None, on_corrupt: str = "skip", log: bool = True,
                 force_reload: bool = False) -> None:
        if split not in (*SPLITS, "all"):
            raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
        if abs(sum(splits) - 1) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {splits}")
        self.split, self.splits, self.split_seed = split, tuple(splits), split_seed
        self.min_accuracy, self.on_corrupt = min_accuracy, on_corrupt
        self.skipped: dict[str, int] = {}
        self.root = osp.expanduser(str(root))
        self.pre_transform, self.pre_filter = pre_transform, pre_filter
        cached = osp.exists(osp.join(self.processed_dir, self.processed_file_names[0]))
        if (force_reload or not cached) and not self.source_exists():
            raise ZooNotFoundError(self.missing_message())
        super().__init__(self.root, transform, pre_transform, pre_filter, log, force_reload)
        self._load_cache()

    # -- to implement in subclasses ---------------------------------------------
    def source_exists(self) -> bool:
        raise NotImplementedError

    def missing_message(self) -> str:
        raise NotImplementedError

    def read(self) -> list[ZooPart]:
        raise NotImplementedError

    def build_model(self, arch: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def processing_settings(self) -> dict[str, Any]:
        """Everything that changes the processed cache (extend in subclasses)."""
        return {"cache_version": _CACHE_VERSION, "zoo": self.zoo_name}

    def member_identity(self, meta: dict[str, Any]) -> int | str:
        """A member's stable identity (from its ``meta``), which alone decides its random
        split: the ``run`` recorded for it, else its ``file``."""
        for key in ("run", "file"):
            if meta.get(key) not in (None, ""):
                return meta[key]
        raise ZooFormatError(f"{self.root}: a {self.zoo_name} member has neither a run nor a "
                             f"file to split it by (meta {sorted(meta)})")

    def source_files(self) -> tuple[list[str], list[str]]:
        """``(tables, files)`` the cache is built from: the label tables (fingerprinted by
        content) and every other source file (by name, size and modification time).
        Override in subclasses; the default (nothing) never finds a cache stale."""
        return [], []

    def source_fingerprint(self) -> str:
        """A digest of :meth:`source_files` that changes when any of them does."""
        tables, files = self.source_files()
        digest = hashlib.sha256()
        for path in tables:
            digest.update(f"table {osp.relpath(path, self.root)}\0".encode())
            try:
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
            except OSError:
                digest.update(b"missing")
        for path in files:
            try:
                stat = os.stat(path)
                record = f"{stat.st_size} {stat.st_mtime_ns}"
            except OSError:
                record = "missing"
            digest.update(f"\0file {osp.relpath(path, self.root)} {record}".encode())
        return digest.hexdigest()

    def split_indices(self, targets: Tensor) -> dict[str, Tensor]:
        """Train/val/test positions (into ``targets``, the members left after filtering):
        each member by its own :func:`split_position` and ``self.splits``, so that a
        member's split never depends on which other members exist."""
        members = self._split_pool
        if members.numel() != targets.numel():  # pragma: no cover - guards subclasses
            raise RuntimeError("split_indices: members and targets disagree")
        identities = [self.member_identity(self._meta_of(int(m))) for m in members]
        where = torch.tensor([split_position(i, self.split_seed) for i in identities],
                             dtype=torch.float64)
        train_end, val_end = self.splits[0], self.splits[0] + self.splits[1]
        return {"train": (where < train_end).nonzero().view(-1),
                "val": ((where >= train_end) & (where < val_end)).nonzero().view(-1),
                "test": (where >= val_end).nonzero().view(-1)}

    def _meta_of(self, member: int) -> dict[str, Any]:
        meta = self._parts[int(self._part_of[member])]["meta"]
        return meta[int(self._row_of[member])] if meta else {}

    # -- PyG plumbing -------------------------------------------------------------
    @property
    def raw_dir(self) -> str:
        return self.root

    @property
    def raw_file_names(self) -> list[str]:
        return []

    @property
    def processed_dir(self) -> str:
        settings = {**self.processing_settings(), "pre_transform": repr(self.pre_transform),
                    "pre_filter": repr(self.pre_filter)}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
        return osp.join(self.root, "processed", f"{self.zoo_name}-{digest.hexdigest()[:12]}")

    @property
    def processed_file_names(self) -> list[str]:
        return ["zoo.pt"]

    def process(self) -> None:
        source = self.source_fingerprint()  # before reading: a change meanwhile is seen later
        parts = []
        for part in self.read():
            if part.values is None:
                part.values = stack_values(self.build_model(part.arch), part.states)
            tpl, values, ints = part.values
            part.states = part.values = None  # only the flat values are kept
            targets, meta = part.targets, list(part.meta)
            keep = torch.cat([torch.isfinite(chunk).all(dim=1) for chunk in values.split(1024)]) \
                if values.size(0) else torch.zeros(0, dtype=torch.bool)
            if self.pre_transform is not None or self.pre_filter is not None:
                values, ints, keep = self._pre_process(tpl, values, ints, targets, keep)
            dropped = int((~keep).sum())
            if dropped:
                self.skipped["non-finite or filtered"] = (
                    self.skipped.get("non-finite or filtered", 0) + dropped)
                log.info("%s: dropped %d members (non-finite weights or pre_filter)",
                         self.zoo_name, dropped)
                values, ints, targets = values[keep], ints[keep], targets[keep]
                meta = [meta[r] for r in keep.nonzero().view(-1).tolist()] if meta else meta
            parts.append({"arch": json.dumps(part.arch, sort_keys=True), "values": values,
                          "ints": ints, "targets": targets, "meta": json.dumps(meta)})
        cache = {"parts": parts, "skipped": json.dumps(self.skipped), "source": source}
        atomic_torch_save(cache, self.processed_paths[0])
        self._fresh = cache  # _load_cache uses it instead of reading the file back

    def _pre_process(self, tpl, values, ints, targets, keep):
        like_graph = None
        for row in range(values.size(0)):
            graph = graph_from_values(tpl, values[row], ints[row], like_graph)
            like_graph = graph if like_graph is None else like_graph
            graph.y = targets[row:row + 1]
            if self.pre_filter is not None and not self.pre_filter(graph):
                keep[row] = False
                continue
            if self.pre_transform is not None:
                out = self.pre_transform(graph)
                if not torch.equal(out.edge_index, graph.edge_index):
                    raise ValueError("pre_transform must keep each graph's structure")
                values[row] = flat_from_graph(out).to(values.dtype)
        return values, ints, keep

    def read_checkpoint(self, path: str) -> dict | None:
        """A state_dict from ``path``, or ``None`` (logged, counted in ``skipped``) when the
        file is corrupt, truncated or missing and ``on_corrupt="skip"``."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ZooFormatError(f"{path}: not a state_dict ({type(state).__name__})")
            return state
        except Exception as exc:
            if self.on_corrupt == "raise":
                raise ZooFormatError(f"{path}: cannot read checkpoint: {exc}") from exc
            self.skipped["unreadable checkpoints"] = (
                self.skipped.get("unreadable checkpoints", 0) + 1)
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            return None

    # -- labels ---------------------------------------------------------------------
    def bad_member(self, reason: str, message: str) -> None:
        """A member that breaks a rule: raise :class:`ZooFormatError` with ``message``
        (``on_corrupt="raise"``), else log it and count it in ``skipped[reason]``."""
        if self.on_corrupt == "raise":
            raise ZooFormatError(message)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipping %s", message)

    def parse_accuracy(self, text: Any, where: str) -> float | None:
        """An accuracy label in ``[0, 1]`` from ``text``; ``None`` when it is not one
        (skipped and counted as ``"bad labels"``, or raised: :meth:`bad_member`).
        ``where`` names the file and row."""
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not 0.0 <= value <= 1.0:  # also NaN
            self.bad_member("bad labels", f"{where}: accuracy {text!r} is not a number in "
                                          "[0, 1]")
            return None
        return value

    def parse_class_label(self, text: Any, where: str,
                          num_classes: int | None = None) -> int | None:
        """A class label, an integer in ``[0, num_classes)`` (``[0, inf)`` when
        ``num_classes`` is ``None``); ``None`` when it is not one (see :meth:`parse_accuracy`)."""
        try:
            value = int(str(text).strip())
        except ValueError:
            self.bad_member("bad labels", f"{where}: label {text!r} is not an integer")
            return None
        if value < 0 or (num_classes is not None and value >= num_classes):
            bound = "inf" if num_classes is None else num_classes
            self.bad_member("bad labels", f"{where}: label {text!r} is not in [0, {bound})")
            return None
        return value

    # -- loading and access -------------------------------------------------------
    def _load_cache(self) -> None:
        cache = self.__dict__.pop("_fresh", None) or self._cache_if_current()
        self.skipped = json.loads(cache["skipped"])
        self._parts = []
        for part in cache["parts"]:
            arch = json.loads(part["arch"])
            tpl, _, _ = template(self.build_model(arch))
            proto = graph_from_values(tpl, part["values"][0], part["ints"][0]) \
                if part["values"].size(0) else None
            self._parts.append({**part, "arch": arch, "template": tpl, "proto": proto,
                                "meta": json.loads(part["meta"])})
        part_of = [torch.full((p["values"].size(0),), i, dtype=torch.long)
                   for i, p in enumerate(self._parts)]
        self._part_of = torch.cat(part_of) if part_of else torch.zeros(0, dtype=torch.long)
        self._row_of = torch.cat([torch.arange(p["values"].size(0)) for p in self._parts]) \
            if self._parts else torch.zeros(0, dtype=torch.long)
        targets = self.all_targets()
        members = torch.arange(targets.numel())
        if self.min_accuracy is not None:
            members = members[targets >= self.min_accuracy]
        self._split_pool = members
        if self.split == "all":
            self._members = members
        else:
            self._members = members[self.split_indices(targets[members])[self.split]]

    def _cache_if_current(self) -> dict:
        """The cache on disk if it was built from the files there now; else (or when it
        cannot be read) it is rebuilt in place, with a log line saying why."""
        path = self.processed_paths[0]
        if not self.source_exists():
            raise ZooNotFoundError(f"{self.missing_message()} (the cache {path} cannot be "
                                   "checked against its sources)")
        try:
            cache = torch.load(path, weights_only=True)
            reason = None if isinstance(cache, dict) and "parts" in cache else \
                "it is not a zoo cache"
        except Exception as exc:  # truncated or foreign file
            reason = f"it cannot be read ({type(exc).__name__}: {exc})"
        if reason is None and "source" not in cache:
            reason = "it records no fingerprint of its sources (an older cache)"
        elif reason is None and cache["source"] != self.source_fingerprint():
            reason = "the zoo's files changed since it was built"
        if reason is None:
            return cache
        log.warning("%s: rebuilding the cache %s in place: %s", self.zoo_name, path, reason)
        self.skipped = {}
        self.process()
        return self.__dict__.pop("_fresh")

    def all_targets(self) -> Tensor:
        """Targets of every cached member (before filtering and splitting)."""
        if not self._parts:
            return torch.zeros(0)
        return torch.cat([p["targets"] for p in self._parts])

    @property
    def targets(self) -> Tensor:
        """Targets of this split's members, in dataset order."""
        return self.all_targets()[self._members]

    def meta(self, idx: int) -> dict[str, Any]:
        """The facts recorded for member ``idx`` of this split (file, run, epoch, ...)."""
        return self._meta_of(int(self._members[idx]))

    def len(self) -> int:
        return int(self._members.numel())

    def locate(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Where the graphs at ``positions`` of this split are stored: their member ids,
        architecture ids, and rows in that architecture's value matrix."""
        members = self._members[positions]
        return members, self._part_of[members], self._row_of[members]

    def architecture(self, arch_id: int) -> dict[str, Any]:
        """What is stored for one architecture: its ``template`` (shared structure),
        ``values`` ``[M, P]`` (flat parameters per member), ``ints``, ``targets``."""
        return self._parts[arch_id]

    def get(self, idx: int) -> NeuralGraph:
        member = int(self._members[idx])
        part_id = int(self._part_of[member])
        part, row = self._parts[part_id], int(self._row_of[member])
        graph = graph_from_values(part["template"], part["values"][row], part["ints"][row],
                                  part["proto"])
        graph.y = part["targets"][row:row + 1]
        graph.arch = torch.tensor([part_id])
        graph.member = torch.tensor([member])
        return graph

    def make_model(self, graph: NeuralGraph | None = None) -> nn.Module:
        """A fresh module of ``graph``'s architecture (optional when the zoo has one).

        ``to_model(graph, like=dataset.make_model(graph))`` rebuilds any member exactly.
        """
        if graph is None:
            if len(self._parts) != 1:
                raise ValueError(f"{self.zoo_name} holds {len(self._parts)} architectures: "
                                 "pass the graph whose architecture you want")
            return self.build_model(self._parts[0]["arch"])
        return self.build_model(self._parts[int(graph.arch)]["arch"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.split}, {len(self)} graphs, root={self.root!r})"
