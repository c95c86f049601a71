"""Quantities that depend only on a batch's structure, computed once and kept on the batch.

On a GPU, finding the nodes of a type (``nonzero``), indexing with a boolean mask,
``torch.unique``, or sizing a tensor from data (``int(t.max())``) each make the host wait
for the device. What they compute here (index tensors, widths, depths) depends only on the
structure of a batch (types, edges, addresses), not on its values, and the batches of a zoo
share one structure (:class:`~neuralgraph_quasi.train.ZooLoader` copies one cached
structure per batch; a benchmark reuses one batch). :func:`structural` computes such a
quantity the first time and returns it again as long as the batch still holds the same
structure tensors, unmodified: every field except the values (:data:`VALUE_KEYS`) is
compared by identity and by its in-place version counter, so a re-indexed, cloned, moved
or edited batch recomputes instead of reading a stale entry.

The memo lives in the batch's storage (``__dict__``, not a data field: PyG never sees it).
Shallow copies share it, which is how the batches of a :class:`ZooLoader` share the entries
of their structure; a copy whose structure differs writes its entries into a memo of its own
(copy on write), so the original keeps its entries.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["structural", "share_structure_memo", "use_structure_memo", "VALUE_KEYS"]

T = TypeVar("T")

#: Fields that hold values (weights, targets, ids), never read by a structural quantity.
VALUE_KEYS = frozenset({"x", "edge_attr", "y", "int_buffers", "member", "arch"})
_ATTR = "_ngq_structure_memo"


def _storage(batch):
    store = getattr(batch, "_store", None)
    return store if store is not None and hasattr(store, "_mapping") else None


def _signature(store, extra: tuple) -> tuple | None:
    """``(key, object, version)`` of every structure field, or None when one is an inference
    tensor (no version counter: never memoised)."""
    items = []
    for key, value in store._mapping.items():
        if key in VALUE_KEYS:
            continue
        if isinstance(value, Tensor):
            if value.is_inference():
                return None
            items.append((key, value, value._version))
        else:
            items.append((key, value, None))
    for i, value in enumerate(extra):
        if isinstance(value, Tensor) and value.is_inference():
            return None
        items.append((i, value, value._version if isinstance(value, Tensor) else None))
    return tuple(items)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        ka == kb and na == nb
        and (va is vb or (type(va) in _SCALARS and type(vb) is type(va) and va == vb))
        for (ka, va, na), (kb, vb, nb) in zip(a, b, strict=True))


_SCALARS = (int, float, str, bool)


def structural(batch, name: Hashable, compute: Callable[[], T], extra: tuple = ()) -> T:
    """``compute()``, memoised on ``batch`` under ``name`` while its structure is unchanged.

    ``compute`` must read only structure fields of ``batch`` (never :data:`VALUE_KEYS`) and
    the tensors in ``extra`` (compared by identity and version as well), and return tensors
    that callers treat as read-only. It runs outside inference mode, so that an entry made
    under ``torch.inference_mode`` can serve a later training step. Objects that are not PyG
    data (no storage) are not memoised.
    """
    store = _storage(batch)
    signature = None if store is None else _signature(store, extra)
    if signature is None:
        return compute()
    memo: dict[Hashable, tuple[tuple, Any]] | None = store.__dict__.get(_ATTR)
    if memo is None:
        memo = store.__dict__[_ATTR] = {}
    entry = memo.get(name)
    if entry is not None and _same(entry[0], signature):
        return entry[1]
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            value = compute()
    else:
        value = compute()
    if entry is None:
        memo[name] = (signature, value)
    else:  # made for another structure that copies of this batch may still hold
        store.__dict__[_ATTR] = {**memo, name: (signature, value)}
    return value


def share_structure_memo(batch) -> None:
    """Give ``batch`` its memo now, so that its shallow copies share (and fill) the same one
    (for a cached structure that every batch copies)."""
    store = _storage(batch)
    if store is not None:
        store.__dict__.setdefault(_ATTR, {})


def use_structure_memo(batch, memo: dict) -> None:
    """Make ``memo`` (a dict kept by the caller, empty at first) ``batch``'s memo: for a
    batch rebuilt every call around the same structure tensors (a view), so that what is
    memoised on one call serves the next."""
    store = _storage(batch)
    if store is not None:
        store.__dict__[_ATTR] = memo
