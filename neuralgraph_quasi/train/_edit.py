"""Editing INRs: the metanetwork outputs new weights; their image should be a transform of
the member's own image (dilated, or with more contrast).

Both images come from evaluating SIRENs on the pixel grid for a whole batch at once: the
batch's values are scattered into flat parameter vectors ``[B, P]`` (one indexing
operation, differentiable), split into the architecture's tensors and evaluated with
``torch.func.vmap`` over :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call, vmap
from torch.nn import functional as F

from ..data.inr_zoo import coordinate_grid
from ..symmetry._memo import structural
from ._tasks import Task

__all__ = ["EditINR", "batched_flat", "render_batch", "grey_dilation"]


def batched_flat(batch, params: list[dict]) -> Tensor:
    """``[B, P]`` flat parameter vectors of a batch of same-architecture graphs
    (the batched, differentiable form of :func:`~neuralgraph_quasi.graph.flat_from_graph`).

    Where each value goes depends only on the structure: found once per batch structure
    (``symmetry._memo``), each call is one gather and one scatter, with no host-device wait.
    """
    sizes = tuple(math.prod(p["shape"]) for p in params)
    rows, cols, nodes, slots, index = structural(
        batch, ("batched_flat", sizes), lambda: _flat_plan(batch, sizes))
    values = torch.cat([batch.edge_attr[rows, cols], batch.x[nodes, slots]])
    num_graphs, total = int(batch.num_graphs), sum(sizes)
    flat = values.new_zeros(num_graphs * total).index_put((index,), values)
    return flat.view(num_graphs, total)


def _flat_plan(batch, sizes: tuple[int, ...]):
    device = batch.x.device
    sizes_t = torch.tensor(sizes, dtype=torch.long, device=device)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    total = sum(sizes)
    node_graph = batch.batch
    width = batch.edge_attr.size(1)
    cols = torch.arange(width, device=device)
    has = batch.edge_param >= 0
    mask = has[:, None] & (cols < batch.edge_kshape.prod(-1)[:, None])
    rows, cols = mask.nonzero().unbind(1)
    edge_graph = node_graph[batch.edge_index[1, rows]]
    param = batch.edge_param[rows]
    epos = edge_graph * total + starts[param] + batch.edge_offset[rows] + cols
    nodes, slots = (batch.node_param >= 0).nonzero().unbind(1)
    npos = node_graph[nodes] * total + starts[batch.node_param[nodes, slots]] \
        + batch.node_offset[nodes, slots]
    return rows, cols, nodes, slots, torch.cat([epos, npos])


def render_batch(model: torch.nn.Module, batch, params: list[dict], coords: Tensor) -> Tensor:
    """``[B, pixels, C]``: every graph of ``batch`` evaluated as ``model`` on ``coords``."""
    flat = batched_flat(batch, params)
    split = flat.split([math.prod(p["shape"]) for p in params], dim=1)
    tensors = {p["name"]: t.reshape(-1, *p["shape"])
               for p, t in zip(params, split, strict=True)}
    return vmap(lambda ps: functional_call(model, ps, (coords,)))(tensors)


class EditINR(Task):
    """Edit SIRENs so that their image becomes ``transform(own image)``; loss: pixel MSE.

    Args:
        dataset: the training split (its architecture and pixel grid).
        transform: ``"dilate"`` (grey dilation, ``size`` × ``size`` window) or
            ``"contrast"`` (``clip(factor · image, -1, 1)``).
        image_size: side of the pixel grid; ``None``: the zoo's (``generator.json``) or 28.
    """

    model_task = "edit"
    score_name = "mse"

    def __init__(self, dataset, transform: str = "dilate", size: int = 3, factor: float = 2.0,
                 image_size: int | None = None) -> None:
        super().__init__(out_dim=1)
        if transform not in ("dilate", "contrast"):
            raise ValueError(f"edit.transform must be 'dilate' or 'contrast', got {transform!r}")
        self.transform, self.size, self.factor = transform, int(size), float(factor)
        self.image_size = int(image_size or _zoo_image_size(dataset.root) or 28)
        graph = dataset[0]
        self.params = graph.params
        self.model = dataset.make_model(graph)
        self._coords: dict[tuple, Tensor] = {}

    def coords(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._coords:
            self._coords[key] = coordinate_grid(self.image_size, like.dtype, like.device)
        return self._coords[key]

    def render(self, batch) -> Tensor:
        """``[B, pixels]`` images of a batch's networks."""
        image = render_batch(self.model.to(batch.x.device), batch, self.params,
                             self.coords(batch.x))
        return image.reshape(image.size(0), -1)

    @torch.no_grad()
    def target(self, batch) -> Tensor:
        image = self.render(batch).float()
        s = self.image_size
        if self.transform == "contrast":
            return (self.factor * image).clamp(-1, 1)
        return grey_dilation(image.view(-1, s, s), self.size).view(-1, s * s)

    def loss(self, out, batch) -> Tensor:
        return F.mse_loss(self.render(out).float(), self.target(batch))

    def predict(self, out, batch) -> Tensor:
        return self.render(out).float()

    def metrics(self, pred: Tensor, target: Tensor) -> dict[str, float]:
        return {"mse": float(F.mse_loss(pred, target)) if target.numel() else 0.0}

    def score(self, metrics: dict[str, float]) -> float:
        return -metrics["mse"]


def grey_dilation(images: Tensor, size: int) -> Tensor:
    """``scipy.ndimage.grey_dilation(images, size=(1, size, size), mode="nearest")`` on the
    images' device (a max filter with edge replication; equal to scipy's, value for value),
    so that the training step never copies images to the host.

    Args:
        images: ``[B, H, W]``.
    """
    before = (size - 1) // 2  # scipy's window for an even size reaches one further back
    after = size - 1 - before
    padded = F.pad(images[:, None], (before, after, before, after), mode="replicate")
    return F.max_pool2d(padded, size, stride=1)[:, 0]


def _zoo_image_size(root) -> int | None:
    manifest = Path(root) / "generator.json"
    if manifest.is_file():
        size = json.loads(manifest.read_text()).get("config", {}).get("image_size")
        return int(size) if size else None
    return None
