"""Batches of zoo graphs without per-graph Python work.

Members of a :class:`~neuralgraph_quasi.data.GraphZoo` share their architecture's
structure and differ only in their values. PyG's collation rebuilds every structure
tensor graph by graph (about 1 s for 32 AGNews transformers on a CPU core); here the
structure of a batch of ``B`` members is batched once and cached, and each batch only
gathers its members' flat values through the template in one indexing operation
(``[B, P] -> edge_attr [B·E, k]``, ``x [B·N, s]``).

Graphs with a per-access ``transform`` (augmentation), or batches mixing architectures,
go through PyG's collation instead.
"""

from __future__ import annotations

import copy
import math
import weakref

import torch
from torch import Tensor
from torch_geometric.data import Batch

from ..data import GraphZoo
from ..graph import collate
from ..symmetry._memo import share_structure_memo

__all__ = ["ZooLoader"]


class ZooLoader:
    """Iterate over ``dataset`` in batches (a :class:`~torch_geometric.data.Batch` each).

    Args:
        dataset: a dataset of graphs (fast path: a :class:`GraphZoo` without transform).
        batch_size: graphs per batch.
        sampler: an iterable of dataset positions (e.g. a ``DistributedSampler``); ``None``:
            dataset order.
        drop_last: drop the last incomplete batch.
        device: where batches are built (the structure cache lives there).

    Structures are cached per dataset object, device, architecture and batch size, and
    shared by every loader over that dataset: the trainer's per-epoch loaders and each
    ``evaluate`` reuse them (collating 256 AGNews graphs takes seconds) together with what
    the model memoised on them.
    """

    def __init__(self, dataset, batch_size: int, sampler=None, drop_last: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.dataset, self.batch_size, self.sampler = dataset, int(batch_size), sampler
        self.drop_last, self.device = drop_last, torch.device(device)
        self.fast = isinstance(dataset, GraphZoo) and dataset.transform is None
        self._structure: dict[tuple[int, int, str], Batch] = \
            _structures_of(dataset) if self.fast else {}

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = list(self.sampler) if self.sampler is not None else range(len(self.dataset))
        positions = torch.as_tensor(list(order), dtype=torch.long)
        for start in range(0, positions.numel(), self.batch_size):
            chunk = positions[start:start + self.batch_size]
            if self.drop_last and chunk.numel() < self.batch_size:
                return
            yield self.batch(chunk)

    def batch(self, positions: Tensor) -> Batch:
        """The batch of the graphs at ``positions`` (of the dataset), on :attr:`device`."""
        # Host-to-device copies are asynchronous (non_blocking): from pageable memory the copy
        # is staged before the call returns, so the CPU tensors may be freed at once.
        if not self.fast:
            return collate([self.dataset[int(i)] for i in positions]).to(self.device,
                                                                         non_blocking=True)
        ds = self.dataset
        members, part_ids, rows = ds.locate(positions)  # CPU tensors: no device wait
        if bool((part_ids != part_ids[0]).any()):
            return collate([ds[int(i)] for i in positions]).to(self.device, non_blocking=True)
        part_id = int(part_ids[0])
        part = ds.architecture(part_id)
        count = int(positions.numel())
        key = (part_id, count, str(self.device))
        structure = self._structure.get(key)
        if structure is None:
            structure = collate([ds[int(positions[0])]] * count).to(self.device)
            # every batch is a shallow copy of this structure: what the model memoises on it
            # (index tensors, sizes; ``symmetry._memo``) is computed once, not per batch
            share_structure_memo(structure)
            self._structure[key] = structure
        tpl = part["template"]
        values = part["values"][rows].to(self.device, non_blocking=True)
        edge_attr, x = tpl.materialize(values) if self.device.type == "cpu" else \
            _device_template(tpl, self.device).materialize(values)
        batch = copy.copy(structure)
        batch.edge_attr = edge_attr.reshape(-1, edge_attr.size(-1))
        batch.x = x.reshape(-1, x.size(-1))
        batch.int_buffers = part["ints"][rows].reshape(-1).to(self.device, non_blocking=True)
        batch.y = part["targets"][rows].to(self.device, non_blocking=True)
        batch.arch = torch.full((count,), part_id, dtype=torch.long, device=self.device)
        batch.member = members.to(self.device, non_blocking=True)
        return batch


_STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structures_of(dataset) -> dict:
    """The structure cache of ``dataset``, shared by its loaders (dropped with it)."""
    try:
        return _STRUCTURES.setdefault(dataset, {})
    except TypeError:  # not weak-referenceable or not hashable: a cache per loader
        return {}


class DeviceTemplate:
    """A :class:`~neuralgraph_quasi.graph._builder.Template`'s ``materialize`` with its
    gather indices and masks on ``device``, made once per template: the template's own
    method would move nothing but test ``edge_const`` for non-zeros on every call, which
    waits for the device."""

    def __init__(self, tpl, device: torch.device) -> None:
        self.dtype, self.num_values = tpl.dtype, tpl.num_values
        self.ecols = tpl.edge_gather.clamp(min=0).to(device)
        self.ncols = tpl.node_gather.clamp(min=0).to(device)
        self.emask = (tpl.edge_gather >= 0).to(device)
        self.nmask = (tpl.node_gather >= 0).to(device)
        const = tpl.edge_const.to(tpl.dtype)
        self.const = const.to(device) if bool(const.ne(0).any()) else None

    def materialize(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """``(edge_attr, x)`` from flat parameter values ``[P]`` or ``[M, P]`` (as
        ``Template.materialize``)."""
        flat = flat.to(self.dtype)
        if self.num_values == 0:
            flat = flat.new_zeros(*flat.shape[:-1], 1)
        edge_attr = torch.where(self.emask, flat[..., self.ecols], 0)
        if self.const is not None:
            edge_attr[..., 0] += self.const
        x = torch.where(self.nmask, flat[..., self.ncols], 0)
        return edge_attr, x


_DEVICE_TEMPLATES: dict[tuple[int, str], tuple[object, DeviceTemplate]] = {}


def _device_template(tpl, device: torch.device) -> DeviceTemplate:
    key = (id(tpl), str(device))
    hit = _DEVICE_TEMPLATES.get(key)
    if hit is None or hit[0] is not tpl:  # the template is kept: its id cannot be reused
        hit = _DEVICE_TEMPLATES[key] = (tpl, DeviceTemplate(tpl, device))
    return hit[1]
