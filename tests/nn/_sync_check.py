"""A CPU stand-in for CUDA's sync debug mode: record the calls that would make the host
wait for the device (or copy host data to it) if the tensors were on a GPU."""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode

#: Calls that read device data on the host, or size an output from data.
SYNCING = frozenset({
    "__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
    # the checked solvers wait for their info flag; tensors from host data are copied
    "linalg_solve", "linalg_inv", "inverse", "tensor", "as_tensor",
})
#: Factories that land on the CPU unless told otherwise.
FACTORIES = frozenset({"zeros", "ones", "empty", "full", "arange", "eye", "linspace",
                       "randn", "rand", "randint", "randperm", "tensor", "as_tensor"})
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_"})


def _host_index(index) -> bool:
    """A boolean mask (nonzero inside) or a Python list (copied to the device)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any((isinstance(i, torch.Tensor) and i.dtype == torch.bool) or isinstance(i, list)
               for i in parts)


class SyncCheck(TorchFunctionMode):
    """Inside ``with SyncCheck() as check:``, ``check.calls`` counts ``(call, file:line)``
    of every syncing call, boolean-mask or list indexing, and factory without ``device``
    made from the package or PyG."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        reason = None
        if name in SYNCING:
            reason = name
        elif name in _INDEXING and len(args) > 1 and _host_index(args[1]):
            reason = f"{name}[mask or list]"
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            reason = "repeat_interleave without output_size"
        if name in FACTORIES and "device" not in kwargs:
            reason = f"{name} without device"
        if reason is not None:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "neuralgraph_quasi" in f.filename or "torch_geometric" in f.filename]
            where = (f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}"
                     if frames else "?")
            self.calls[(reason, where)] += 1
        return func(*args, **kwargs)
