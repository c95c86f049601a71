"""Group elements of a network's weight-space symmetry group, in a normal form.

Every element is stored as ``g = D · Π · G`` and acts on a graph's values in
that order (``G`` first):

* ``G``: per attention head, a pair ``(M, N)`` of invertible ``d_head × d_head``
  matrices (``gl``, which includes permutations of positions inside a head);
* ``Π``: a node map ``σ`` (``perm``): hidden-unit permutations and head
  permutations. The permuted graph holds at node ``n`` the old value of node
  ``σ(n)``, and at edge ``(i, j)`` the old value of edge ``(σ(i), σ(j))``;
* ``D``: a multiplier ``d`` per node (``scale``): positive scalings and sign
  flips. A weight edge ``(i, j)`` is multiplied by ``d_j / d_i``, and the bias
  (for an affine normalisation: the gain and shift) of node ``j`` by ``d_j``.

With these conventions the group law has a closed form (derived in
``docs/symmetry.md``): for ``a ∘ b`` (``b`` acts first),
``σ = σ_b ∘ σ_a``, ``d = d_a · (d_b ∘ σ_a)``, ``M = (M_a ∘ σ_b⁻¹) · M_b`` and
``N = N_b · (N_a ∘ σ_b⁻¹)``, where ``∘ σ`` re-indexes per-head factors by the
head-node map.

Convention of the stored ``M`` and ``N``: they are the matrices of the XW
convention used by Transformer-NFN (``W_Q → W_Q Mᵀ``, ``W_K → W_K M⁻¹``,
``W_V → W_V N``, ``W_O → N⁻¹ W_O`` with ``q = x W_Q``). In PyTorch's
``[out, in]`` layout the same matrices act on head ``h``'s rows as
``W_Q → M W_Q``, ``W_K → M⁻ᵀ W_K``, ``W_V → Nᵀ W_V``, and on its columns as
``W_O[:, h] → W_O[:, h] N⁻ᵀ`` (biases like their rows; ``b_O`` unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GroupElement"]


@dataclass(frozen=True, eq=False)
class GroupElement:
    """An element of the symmetry group of one graph or of a batch of graphs.

    Attributes:
        perm: ``[N]`` node map ``σ`` (identity: ``arange(N)``).
        scale: ``[N]`` float64 multipliers ``d`` (positive scales times signs).
        heads: ``[H]`` node ids of the attention head nodes the GL factors belong to.
        M: ``[H, D, D]`` float64 query/key factors (identity-padded past each head's width).
        N: ``[H, D, D]`` float64 value/output factors.

    Elements are immutable; :meth:`compose` and :meth:`inverse` return new ones.
    """

    perm: Tensor
    scale: Tensor
    heads: Tensor
    M: Tensor
    N: Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.perm.numel())

    @staticmethod
    def identity(num_nodes: int, heads: Tensor | None = None, width: int = 0) -> GroupElement:
        """The identity element for a graph of ``num_nodes`` nodes and the given head nodes."""
        heads = torch.zeros(0, dtype=torch.long) if heads is None else heads
        eye = torch.eye(width, dtype=torch.float64).expand(heads.numel(), width, width).clone()
        return GroupElement(torch.arange(num_nodes), torch.ones(num_nodes, dtype=torch.float64),
                            heads, eye, eye.clone())

    def _head_map(self) -> Tensor:
        """``r`` such that head row ``k`` is mapped by ``σ`` to head row ``r[k]``."""
        device = self.heads.device
        row = torch.full((self.num_nodes,), -1, dtype=torch.long, device=device)
        row[self.heads] = torch.arange(self.heads.numel(), device=device)
        return row[self.perm[self.heads]]

    def _check(self, other: GroupElement) -> None:
        if self.num_nodes != other.num_nodes or not torch.equal(self.heads, other.heads):
            raise ValueError("group elements belong to different graphs "
                             f"({self.num_nodes} vs {other.num_nodes} nodes)")

    def compose(self, other: GroupElement) -> GroupElement:
        """``self ∘ other``: acting with it equals acting with ``other``, then ``self``."""
        self._check(other)
        a, b = self, other
        perm = b.perm[a.perm]
        scale = a.scale * b.scale[a.perm]
        # (M_a ∘ σ_b⁻¹)[k] = M_a[σ_b⁻¹(k)], i.e. row r_b[k] of the result holds M_a[k].
        r_b = b._head_map()
        Ma, Na = torch.empty_like(a.M), torch.empty_like(a.N)
        Ma[r_b], Na[r_b] = a.M, a.N
        return GroupElement(perm, scale, a.heads, Ma @ b.M, b.N @ Na)

    def inverse(self) -> GroupElement:
        """The element that undoes this one."""
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.num_nodes, device=self.perm.device)
        scale = (1.0 / self.scale)[inv]
        # M'[k] = M⁻¹[σ(k)] for head rows.
        r = self._head_map()
        return GroupElement(inv, scale, self.heads, torch.linalg.inv(self.M)[r],
                            torch.linalg.inv(self.N)[r])

    def to(self, device) -> GroupElement:
        return GroupElement(*(t.to(device) for t in (self.perm, self.scale, self.heads, self.M,
                                                     self.N)))

    def __repr__(self) -> str:
        moved = int((self.perm != torch.arange(self.num_nodes, device=self.perm.device)).sum())
        scaled = int((self.scale != 1).sum())
        return (f"GroupElement(nodes={self.num_nodes}, permuted={moved}, scaled={scaled}, "
                f"heads={self.heads.numel()})")
