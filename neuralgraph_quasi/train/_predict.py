"""Use a finished run on your own network: ``load_run(run_dir).predict(module)``."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ..graph import collate, to_graph, to_model
from ._build import build_model
from ._checkpoint import CheckpointError, load_checkpoint
from ._tasks import TASKS

__all__ = ["RunPredictor", "load_run"]


class RunPredictor:
    """A trained metanetwork and its task, ready to read networks.

    Attributes:
        model: the metanetwork (eval mode).
        task: ``"predict"`` (accuracy), ``"classify"`` or ``"edit"``.
        config: the run's config (a dict).
    """

    def __init__(self, model: nn.Module, task: str, config: dict, runtime: dict,
                 device: torch.device) -> None:
        self.model, self.task, self.config, self.runtime = model.eval(), task, config, runtime
        self.device = device

    def _batch(self, modules):
        graphs = []
        for m in modules:
            graph = to_graph(m)
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
        CheckpointError: naming the file, when it is missing or unreadable.
    """
    path = Path(run_dir) / checkpoint
    state = load_checkpoint(path, map_location="cpu")  # the model is moved below
    if "runtime" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} does not record the model's shapes: not a run of "
                              "neuralgraph_quasi.train.run")
    model = build_model(OmegaConf.create(state["model_config"]), state["runtime"])
    model.load_state_dict(state["model"])
    return RunPredictor(model.to(device), state["task"], state["config"], state["runtime"],
                        torch.device(device))
