r"""QuasiGNN: a graph metanetwork ``F = α·β`` with the α-map acting between backbone layers."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..graph._schema import Slot
from ._alpha import Alpha, AlphaMap, statistics_per_node
from ._backbone import Backbone
from ._gl_invariant import gl_invariant_view
from ._mpnn import MPNN, exact_dtype, graph_ids, mlp, no_autocast
from ._stats import NUM_STATS, layer_statistics, tensor_statistics

__all__ = ["QuasiGNN", "BACKBONES"]


def _scale_mpnn(hidden_dim: int, num_layers: int, kernel_width: int, **options) -> Backbone:
    from ._scale_mpnn import ScaleMPNN

    if options:
        raise ValueError(f"backbone='scale_mpnn' takes no {sorted(options)} (it reads raw "
                         "values, so that it stays scale-equivariant)")
    return ScaleMPNN(hidden_dim, num_layers, kernel_width=kernel_width)


#: Backbone factories by name: ``(hidden_dim, num_layers, kernel_width, **options) ->
#: Backbone``.
BACKBONES = {"mpnn": MPNN, "scale_mpnn": _scale_mpnn}
TASKS = ("predict", "edit")


class QuasiGNN(nn.Module):
    r"""A quasi-equivariant graph metanetwork on :class:`~neuralgraph_quasi.NeuralGraph`
    batches.

    .. math::
        F(\theta) = \psi\big(\beta_{>k}(\alpha(\theta)\cdot\beta_{\le k}(\theta))\big)

    ``β`` is an equivariant message-passing backbone (``"mpnn"``: permutations;
    ``"scale_mpnn"``: permutations and positive scalings); ``α(θ)`` (an
    :class:`~neuralgraph_quasi.nn.AlphaMap`) is a group element computed from the input
    network's weight statistics and the backbone's states after layer ``k``, and acts on
    those states (node states like biases, edge states like weights, attention blocks
    through per-head ``M`` and ``N``). ``ψ`` is an invariant readout (``task="predict"``)
    or an equivariant head that writes new weights and biases (``task="edit"``).

    Where α acts decides what it does (``docs/quasi.md``): the later layers of the
    ``"mpnn"`` backbone are not equivariant to scales or GL factors, so α changes what
    the network computes while the prediction keeps its permutation invariance. Under
    ``"scale_mpnn"`` the scale part of α commutes with every later layer and cancels in a
    scale-invariant readout; for editing, ``F(g·θ) = α(g·θ)·g·α(θ)⁻¹·F(θ)`` still gives
    networks with the same function, but ``F`` is not strictly equivariant.

    Args:
        hidden_dim: width of node and edge states.
        num_layers: backbone layers.
        task: ``"predict"`` (``[B, out_dim]`` raw outputs) or ``"edit"`` (a batch with the
            same structure and edited weights and biases).
        quasi: use α (``False``: the same network without it).
        backbone: ``"mpnn"`` or ``"scale_mpnn"``.
        eps_init: initial ε of α (one per output kind: scales, Q/K factors, V/O factors).
        out_dim: outputs per graph for ``predict``.
        kernel_width: longest edge vector the model accepts (9: 3×3 kernels).
        alpha: ``"learned"`` (ε and γ trained), ``"fixed"`` (ε pinned at ``eps_init``, γ
            trained) or ``"frozen"`` (α pinned at the identity: the ablation with the same
            parameters).
        alpha_on: where α acts: ``"input"`` (the input network's values, before the
            backbone reads them: ``β(α(θ)·θ)``; the default with ``"mpnn"``) or
            ``"states"`` (the backbone's states after layer ``alpha_after``; the default
            with ``"scale_mpnn"``). See ``docs/quasi.md``.
        alpha_after: with ``alpha_on="states"``, index of the backbone layer after which α
            acts (default: the middle, ``num_layers // 2 - 1``, or 0 with one layer).
        gamma_hidden: hidden width of α's MLPs γ.
        eps_min, eps_max: bounds of a learned ε (:class:`AlphaMap`).
        value_norm: (``"mpnn"``) read per-tensor normalised values and their scales
            (:func:`~neuralgraph_quasi.nn.normalised_values`); default on.
        aggregators: (``"mpnn"``) PyG aggregations of every layer.
        readout_stats: also give the prediction head the per-layer statistics of the input
            network's tensors (``layer_statistics``, ``stat_depth`` layers), as STATNN sees
            them. Invariant to permutations but not to scalings, so only with ``"mpnn"``.
        stat_depth: layers of the statistics table (deeper layers share its last row).
        gl_invariant: read attention through per-head ``W_Qᵀ W_K`` and ``W_O W_V`` products
            (:func:`~neuralgraph_quasi.nn.gl_invariant_view`) instead of raw projections:
            predictions become invariant to ``gl`` as well (``"mpnn"``, ``predict`` only).

    Attributes:
        invariant_to: (``predict``) kinds, as in :func:`~neuralgraph_quasi.symmetry.sample`,
            to which the prediction is invariant.
        equivariant_to: (``edit``) kinds ``g`` for which ``to_model(F(g·θ))`` computes the
            same function as ``to_model(F(θ))``.
    """

    def __init__(self, hidden_dim: int = 64, num_layers: int = 4, task: str = "predict",
                 quasi: bool = True, backbone: str = "mpnn", eps_init: float = 0.01,
                 out_dim: int = 1, kernel_width: int = 9, alpha: str = "learned",
                 alpha_after: int | None = None, gamma_hidden: int = 32,
                 readout_stats: bool | None = None, stat_depth: int = 32,
                 gl_invariant: bool = False, alpha_on: str | None = None,
                 eps_min: float = 0.0, eps_max: float = 0.95, value_norm: bool | None = None,
                 aggregators: tuple[str, ...] | list[str] | None = None) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        if alpha not in AlphaMap.MODES:
            raise ValueError(f"alpha must be one of {AlphaMap.MODES}, got {alpha!r}")
        if alpha_on is None:
            alpha_on = "input" if backbone == "mpnn" else "states"
        if alpha_on not in ("input", "states"):
            raise ValueError(f"alpha_on must be 'input' or 'states', got {alpha_on!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if gl_invariant and (task != "predict" or backbone != "mpnn"):
            raise ValueError("gl_invariant=True needs task='predict' and backbone='mpnn' (the "
                             "view drops the raw attention weights an edit would write)")
        self.task, self.quasi, self.backbone_name = task, quasi, backbone
        self.gl_invariant = gl_invariant
        options = {k: v for k, v in (("value_norm", value_norm),
                                     ("aggregators", None if aggregators is None
                                      else tuple(aggregators))) if v is not None}
        self.backbone = BACKBONES[backbone](hidden_dim, num_layers, kernel_width, **options)
        self.alpha_on = alpha_on
        self.alpha_after = max(num_layers // 2 - 1, 0) if alpha_after is None else alpha_after
        if not 0 <= self.alpha_after < num_layers:
            raise ValueError(f"alpha_after must index a layer in [0, {num_layers}), "
                             f"got {alpha_after}")
        # Under scale_mpnn the states of attention nodes are scale-invariant but the
        # statistics are not: GL factors built from them would break scale invariance.
        self.alpha = AlphaMap(hidden_dim, gamma_hidden, eps_init, mode=alpha,
                              gl=backbone != "scale_mpnn", eps_min=eps_min,
                              eps_max=eps_max) if quasi else None
        kinds = self.backbone.equivariant_to
        if readout_stats is None:
            readout_stats = task == "predict" and "scale" not in kinds
        if readout_stats and "scale" in kinds:
            raise ValueError("readout_stats=True would break the scale invariance of "
                             f"backbone={backbone!r}: weight statistics change under scalings")
        self.readout_stats = bool(readout_stats) and task == "predict"
        self.stat_depth = stat_depth
        if task == "predict":
            stat_dim = stat_depth * 2 * NUM_STATS if self.readout_stats else 0
            # standardised like STATNN's input (statistics span many orders of magnitude)
            self.stat_norm = nn.BatchNorm1d(stat_dim) if self.readout_stats else None
            self.head = mlp(self.backbone.readout_dim + stat_dim, hidden_dim, out_dim)
        if gl_invariant:
            kinds = kinds | {"gl"}
        self.invariant_to = frozenset(kinds) if task == "predict" else frozenset()
        self.equivariant_to = frozenset(kinds) if task == "edit" else frozenset()
        self.last_alpha: Alpha | None = None
        self._read = None  # the batch whose values the backbone read (α(θ)·θ or θ)

    def states(self, batch, stats=None) -> tuple[Tensor, Tensor]:
        """Node and edge states after the backbone (α applied where configured)."""
        h, e = self.backbone.encode(batch)
        self.last_alpha = None
        self._read = batch
        if self.alpha is not None and self.alpha_on == "input":
            stats = tensor_statistics(batch) if stats is None else stats
            self.last_alpha = self.alpha(batch, h, statistics_per_node(batch, stats=stats))
            # a shallow copy: structure shared (and what is memoised on it), values moved
            self._read = copy.copy(batch)
            self._read.edge_attr, self._read.x = self._moved_values(batch)
            h, e = self.backbone.encode(self._read)
        for i in range(self.backbone.num_layers):
            h, e = self.backbone.layer(i, batch, h, e)
            if self.alpha is not None and self.alpha_on == "states" and i == self.alpha_after:
                stats = tensor_statistics(batch) if stats is None else stats
                self.last_alpha = self.alpha(batch, h, statistics_per_node(batch, stats=stats))
                h, e = self.last_alpha.act(batch, h, e)
        return h, e

    def forward(self, batch):
        if self.gl_invariant:
            batch = gl_invariant_view(batch)
        stats = tensor_statistics(batch) if self.readout_stats or self.alpha is not None \
            else None
        h, e = self.states(batch, stats)
        if self.task == "edit":
            return self._edited(batch, *self.backbone.edit(batch, h, e))
        features = self.backbone.readout(batch, h, e)
        if self.readout_stats:
            # the statistics of what the backbone read: α(θ)·θ when α acts on the input
            read = stats if self._read is batch else tensor_statistics(self._read)
            table = layer_statistics(read, graph_ids(batch)[1], self.stat_depth)
            # standardised in at least float32: statistics that vary little across networks
            # would collapse to one bfloat16 value under autocast
            table = self._standardise(table.flatten(1).to(exact_dtype(features.dtype)))
            features = torch.cat([features, table], dim=-1)
        return self.head(features)

    def gradient_rms(self) -> dict[str, float]:
        """Per-parameter RMS of the gradients now held by α's ``γ`` networks (``"gamma"``),
        its ``ρ`` (``"eps"``, the parameters of ε) and the backbone (``"backbone"``): whether
        training can move α at all is read off their ratios. Groups without a gradient
        are left out."""
        groups = {"backbone": list(self.backbone.parameters())}
        if self.alpha is not None:
            groups["eps"] = [self.alpha.rho]
            groups["gamma"] = [p for name, p in self.alpha.named_parameters()
                               if name.startswith("gamma")]
        out = {}
        for name, params in groups.items():
            grads = [p.grad.detach().double().reshape(-1) for p in params if p.grad is not None]
            if grads:
                flat = torch.cat(grads)
                out[name] = float(flat.pow(2).mean().sqrt())
        return out

    def _standardise(self, table: Tensor) -> Tensor:
        """Batch-normalise the statistics; a single graph in training uses running stats."""
        norm = self.stat_norm
        if self.training and table.size(0) < 2:
            return nn.functional.batch_norm(table, norm.running_mean, norm.running_var,
                                            norm.weight, norm.bias, False, 0.0, norm.eps)
        return norm(table)

    def _moved_values(self, batch, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(edge_attr, x)`` of ``α(θ)·θ``: the batch's weights and biases moved by the last
        α (GL factors, then scales), in at least float32 with autocast off."""
        x, edge_attr = batch.x, batch.edge_attr
        dtype = exact_dtype(x.dtype) if dtype is None else dtype
        with no_autocast(x.device.type):
            values, moved = self.last_alpha.act(
                batch, x[:, Slot.BIAS:Slot.GAIN + 1].to(dtype), edge_attr.to(dtype))
        x = torch.cat([values.to(x.dtype), x[:, Slot.GAIN + 1:]], dim=-1)
        return moved.to(edge_attr.dtype), x

    def _edited(self, batch, edge_update: Tensor, bias_update: Tensor):
        """``α(θ)·θ + Δ``: the input's weights moved by α, plus the head's update, on the
        entries that hold parameter values (weights, biases).

        Moving the skip term by α too makes the whole output ``α(θ)·β(θ)`` when the layers
        after α commute with it, so that α never changes what an edited network computes
        there (``docs/quasi.md``).
        """
        k = batch.edge_attr.size(1)
        edge_attr, x = batch.edge_attr, batch.x
        if self.last_alpha is not None:
            # The output weights are α·θ + Δ: move θ at full precision (autocast off, at
            # least float32), or bfloat16 would round every weight the edit passes through.
            edge_attr, x = self._moved_values(batch, exact_dtype(edge_update.dtype))
        length = batch.edge_kshape.prod(-1)
        keep = (batch.edge_param >= 0)[:, None] & (
            torch.arange(k, device=length.device)[None] < length[:, None])
        # a shallow copy: the structure tensors are shared with the input (read-only, as a
        # zoo's), so that what is memoised on them serves the output too
        out = copy.copy(batch)
        out.edge_attr = edge_attr + torch.where(keep, edge_update[:, :k], 0.0).to(
            edge_attr.dtype)
        has_bias = batch.node_param[:, Slot.BIAS] >= 0
        x = x.clone()
        x[:, Slot.BIAS] = x[:, Slot.BIAS] + torch.where(has_bias, bias_update, 0.0).to(x.dtype)
        out.x = x
        return out

    def extra_repr(self) -> str:
        where = f"alpha_after={self.alpha_after}" if self.alpha_on == "states" else "input"
        return (f"task={self.task!r}, backbone={self.backbone_name!r}, quasi={self.quasi}, "
                f"alpha_on={where}")

