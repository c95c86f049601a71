"""Use a finished run on your own network: ``load_run(run_dir).predict(module)``.

A run's checkpoints record the structure of every architecture of its zoo
(:func:`structure_signature`); a network of another structure (an MLP, a transformer of
another width, depth, head count or class count) is refused with
:class:`ArchitectureError`, naming what differs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ..graph import NeuralGraph, collate, to_graph, to_model
from ..graph._schema import Act, NodeType
from ._build import build_model
from ._checkpoint import CheckpointError, load_checkpoint
from ._tasks import TASKS

__all__ = ["RunPredictor", "load_run", "ArchitectureError", "structure_signature",
           "zoo_architectures"]

log = logging.getLogger(__name__)

#: The graph attributes that make up a network's structure (not its values).
_STRUCTURE = ("edge_index", "edge_type", "edge_role", "edge_head", "edge_pos", "edge_layer",
              "edge_param", "edge_offset", "edge_kshape", "node_type", "node_op", "node_layer",
              "node_perm", "node_unit", "node_head", "node_pos", "node_act", "node_param",
              "node_offset")


class ArchitectureError(ValueError):
    """A network whose graph structure is none of the architectures a run was trained on."""


def structure_signature(graph: NeuralGraph) -> dict[str, Any]:
    """What identifies a graph's structure, JSON-able: a ``digest`` of every structural
    attribute and the parameter shapes, plus a readable summary (shapes, node and edge
    counts, heads, activations) used to say what differs."""
    digest = hashlib.sha256()
    for key in _STRUCTURE:
        value = graph[key]
        digest.update(f"{key}{list(value.shape)}".encode())
        digest.update(value.detach().cpu().to(torch.int64).numpy().tobytes())
    shapes = [list(p["shape"]) for p in graph.params]
    digest.update(json.dumps(shapes).encode())
    acts = Counter(Act(int(a)).name.lower() for a in graph.node_act.tolist())
    return {"digest": digest.hexdigest(), "shapes": shapes,
            "names": [p["name"] for p in graph.params], "nodes": int(graph.num_nodes),
            "edges": int(graph.edge_index.size(1)),
            "heads": int((graph.node_type == NodeType.HEAD).sum()),
            "activations": dict(sorted(acts.items()))}


def zoo_architectures(dataset) -> list[dict[str, Any]]:
    """:func:`structure_signature` of every architecture a zoo dataset holds."""
    out = []
    for arch_id in range(len(dataset._parts)):
        proto = dataset.architecture(arch_id).get("proto")
        if proto is not None:
            out.append(structure_signature(proto))
    return out


def _difference(got: dict[str, Any], want: dict[str, Any]) -> str:
    """The first way ``got`` differs from ``want`` (both :func:`structure_signature` s)."""
    if len(got["shapes"]) != len(want["shapes"]):
        return (f"it has {len(got['shapes'])} parameter tensors, the zoo's networks "
                f"{len(want['shapes'])}")
    for i, (a, b) in enumerate(zip(got["shapes"], want["shapes"], strict=True)):
        if a != b:
            return (f"parameter {i} ({got['names'][i]}) has shape {a}, the zoo's "
                    f"({want['names'][i]}) {b}")
    for key, what in (("heads", "attention heads"), ("nodes", "nodes"), ("edges", "edges")):
        if got[key] != want[key]:
            return f"it has {got[key]} {what}, the zoo's networks {want[key]}"
    if got["activations"] != want["activations"]:
        return f"activations {got['activations']}, the zoo's {want['activations']}"
    return "same sizes, but its layers are wired differently"


def _closest(got: dict[str, Any], known: list[dict[str, Any]]) -> dict[str, Any]:
    def score(want):
        return (len(got["shapes"]) == len(want["shapes"]),
                sum(a == b for a, b in zip(got["shapes"], want["shapes"], strict=False)),
                got["heads"] == want["heads"], got["activations"] == want["activations"])
    return max(known, key=score)


class RunPredictor:
    """A trained metanetwork and its task, ready to read networks.

    Attributes:
        model: the metanetwork (eval mode).
        task: ``"predict"`` (accuracy), ``"classify"`` or ``"edit"``.
        config: the run's config (a dict).
    """

    def __init__(self, model: nn.Module, task: str, config: dict, runtime: dict,
                 device: torch.device, architectures: list[dict] | None = None) -> None:
        self.model, self.task, self.config, self.runtime = model.eval(), task, config, runtime
        self.device = device
        self.architectures = architectures

    def check(self, module: nn.Module, graph: NeuralGraph | None = None) -> NeuralGraph:
        """``module``'s graph, after checking that its values are finite and its structure
        is one the run was trained on.

        Raises:
            ArchitectureError: naming what differs from the closest recorded architecture.
            ValueError: naming a parameter with non-finite values.
        """
        for name, value in module.state_dict().items():
            if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{type(module).__name__}: parameter {name!r} has non-finite "
                                 "values (NaN or inf)")
        graph = to_graph(module) if graph is None else graph
        if self.architectures is None:
            return graph
        signature = structure_signature(graph)
        if any(signature["digest"] == a["digest"] for a in self.architectures):
            return graph
        closest = _closest(signature, self.architectures)
        raise ArchitectureError(
            f"{type(module).__name__} is not an architecture this run was trained on "
            f"({len(self.architectures)} in its zoo): {_difference(signature, closest)}")

    def _batch(self, modules):
        graphs = []
        for m in modules:
            graph = self.check(m)
            width = int(self.runtime["kernel_width"])
            if graph.edge_attr.size(1) < width:
                graph = graph.pad_kernels(width)
            graphs.append(graph)
        dtype = next(self.model.parameters()).dtype
        batch = collate(graphs).to(self.device)
        batch.edge_attr, batch.x = batch.edge_attr.to(dtype), batch.x.to(dtype)
        return batch, graphs

    @torch.no_grad()
    def predict(self, module: nn.Module | list[nn.Module]) -> float | torch.Tensor:
        """The predicted accuracy of ``module`` (a float; a tensor for a list of modules),
        or, for a classification run, class probabilities ``[C]`` (``[N, C]``)."""
        single = isinstance(module, nn.Module)
        modules = [module] if single else list(module)
        if self.task == "edit":
            raise ValueError("this run edits networks: call .edit(module)")
        batch, _ = self._batch(modules)
        out = self.model(batch)
        if self.task == "classify":
            probs = torch.softmax(out.float(), -1).cpu()
            return probs[0] if single else probs
        pred = TASKS["predict"]().predict(out, batch).cpu()
        return float(pred[0]) if single else pred

    @torch.no_grad()
    def edit(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` with the weights the editing metanetwork outputs."""
        if self.task != "edit":
            raise ValueError(f"this run is a {self.task!r} run, not an editing run: use .predict")
        batch, graphs = self._batch([module])
        edited = self.model(batch)
        graph = edited.to_data_list()[0] if hasattr(edited, "to_data_list") else edited
        like = copy.deepcopy(module)
        return to_model(graph.cpu(), like)


def load_run(run_dir: str | Path, checkpoint: str = "best.ckpt",
             device: str | torch.device = "cpu") -> RunPredictor:
    """Open the metanetwork a run trained (its ``best.ckpt`` by default).

    Raises:
        CheckpointError: naming the file, when it is missing or unreadable, or its model
            does not fit the current model definition.
        ValueError: ``device`` is not a device name.
    """
    path = Path(run_dir) / checkpoint
    state = load_checkpoint(path, map_location="cpu")  # the model is moved below
    if "runtime" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} does not record the model's shapes: not a run of "
                              "neuralgraph_quasi.train.run")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a torch device: {exc}") from None
    target = state["model_config"].get("_target_", "the model")
    try:
        model = build_model(OmegaConf.create(state["model_config"]), state["runtime"])
        model.load_state_dict(state["model"])
    except Exception as exc:  # noqa: BLE001 - a config or state of another model definition
        raise CheckpointError(f"{path} does not fit the current definition of {target} "
                              f"(written by an older version?): {_one_line(exc)}") from None
    architectures = state.get("architectures")
    if architectures is None:
        log.warning("%s records no zoo architectures (an older run): networks of any "
                    "structure are scored", path)
    return RunPredictor(model.to(device), state["task"], state["config"], state["runtime"],
                        device, architectures)


def _one_line(exc: BaseException) -> str:
    """``load_state_dict``'s multi-line report (or any error) on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[1:] if len(lines) > 1 and "Error(s) in" in lines[0] else lines)
    return text if len(text) <= 400 else text[:397] + "..."
