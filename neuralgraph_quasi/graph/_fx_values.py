"""The abstract values of the fx converter (``_fx.py``): what each traced fx node evaluates to.

A materialised tensor is a :class:`TensorValue` (graph nodes plus the version of each unit);
the other values are stages not yet emitted into the graph: a :class:`Pending` ``Linear``, the
stages of a hand-written attention (:class:`Heads` → :class:`Scores` → :class:`Probs` →
:class:`Core` → :class:`Merged`), symbolic sizes (:class:`Dim`), parameter reads
(:class:`Param`) and a few wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ._builder import Stream


class Unsupported(Exception):
    """Raised while evaluating an fx node; turned into a ConversionError naming the node."""


@dataclass(frozen=True)
class TensorValue:
    """A materialised tensor: its units are ``stream.nodes``; ``written[i]`` is the clock at
    which unit i's current value was written (see ``FxState.read``)."""

    stream: Stream
    written: Tensor
    origin: str  # name of the fx node that made it


@dataclass
class Input:
    """The model's input; its nodes are made by the first layer that reads it."""

    rank: int | None
    value: TensorValue | None = None
    taken: str | None = None  # path of a converter that made its own input nodes
    flat: bool = False
    reads: set[int] = field(default_factory=set)  # indices of x.shape read (rank unknown)

    @property
    def tokens(self) -> bool:
        """Whether the input is a token sequence ``[B, T, d]``: its rank is 3, or, without
        ``example_input``, its shape was unpacked into three sizes (``b, t, d = x.shape``)."""
        if self.flat:
            return False
        return self.rank == 3 or self.rank is None and max(self.reads, default=-1) == 2


@dataclass
class Pending:
    """``Linear(src)`` not yet emitted: a plain layer, or an attention projection."""

    module: nn.Linear
    path: str
    src: TensorValue
    out: TensorValue | None = None
    claimed: bool = False  # split into attention heads (or into pieces, see Piece)
    taken: set[int] = field(default_factory=set)  # starts of the pieces split into heads

    @property
    def width(self) -> int:
        return self.module.out_features


@dataclass(frozen=True)
class Piece:
    """Output features ``[start, start + width)`` of a pending ``Linear``, cut by ``split``
    or ``chunk``: only attention heads may be made from it (a fused q/k/v projection)."""

    proj: Pending
    start: int
    width: int


@dataclass(frozen=True)
class Dim:
    """A size not known while tracing (batch, tokens, spatial), by axis label."""

    label: str
    owner: Input | None = field(default=None, compare=False, repr=False)

    def resolved(self) -> Dim | int:
        """The model input's feature width for its last axis, once a layer has read the
        input (``d`` of ``b, t, d = x.shape`` before ``d // heads``); else itself."""
        inp = self.owner
        if (inp is not None and inp.value is not None and inp.tokens
                and self.label == "input axis 2"):
            return inp.value.stream.width
        return self


@dataclass(frozen=True)
class Heads:
    """A projection ``[..., D]`` split into ``[..., outer, inner]``; ``axes`` labels the
    dimensions (``"A"``: the outer split axis, ``"I"``: the inner one, ``"T"``: tokens)."""

    proj: Pending
    outer: int
    inner: int
    axes: tuple[str, ...]
    start: int = 0  # first output feature of the Linear that these heads read
    pieces: int = 1  # > 1: a fused q/k/v output whose axis "P" indexes the pieces

    @property
    def width(self) -> int:
        return self.outer * self.inner


@dataclass(frozen=True)
class Mask:
    """A mask over (query, key) token pairs from a buffer (``tril[:, :, :T, :T] == 0``):
    the same for every batch element and head, so every attention symmetry keeps it."""

    name: str


@dataclass(frozen=True)
class _QueryKey:
    q: Heads
    k: Heads
    axes: tuple[str, ...]
    mask: str = ""  # how the scores are masked ("causal", "buffer NAME"); "" for none


class Scores(_QueryKey):
    """``q kᵀ`` per head."""


class Probs(_QueryKey):
    """``softmax(q kᵀ)`` per head, over keys."""


@dataclass(frozen=True)
class Core:
    """Attention output per head, ``softmax(q kᵀ) v`` (or SDPA)."""

    q: Heads
    k: Heads
    v: Heads
    axes: tuple[str, ...]
    mask: str = ""

    @property
    def heads(self) -> tuple[Heads, Heads, Heads]:
        return self.q, self.k, self.v


@dataclass(frozen=True)
class Merged:
    """Heads merged back into ``[..., T, D]``: must feed the output projection."""

    core: Core


@dataclass(frozen=True)
class Scaled:
    """``c * value`` for a Python number ``c``: only ``sin`` may consume it (SIREN)."""

    value: object
    factor: float


@dataclass(frozen=True)
class Param:
    """A parameter or buffer read in the forward (``get_attr``), possibly sliced."""

    name: str
    tensor: Tensor
    kind: str


@dataclass(frozen=True)
class Items:
    """A tuple returned by a module (``MultiheadAttention``: output and weights)."""

    items: tuple


@dataclass(frozen=True)
class Opaque:
    """A value the graph cannot use (an extra model input, attention weights)."""

    what: str


@dataclass
class InShape:
    """``x.shape`` of the model input: symbolic sizes (concrete ones from example_input).
    Without example_input, axis 0 is the batch and axis 1 the tokens (used only if the
    shape is unpacked into three sizes: see :attr:`Input.tokens`)."""

    items: tuple | None = None
    owner: Input | None = None

    def __getitem__(self, i):
        if self.items is not None:
            return self.items[i]
        if isinstance(i, int) and i >= 0 and self.owner is not None:
            self.owner.reads.add(i)
        return {0: Dim("B"), 1: Dim("T")}.get(i, Dim(f"input axis {i}", self.owner))


_NAMES = {Input: "the model input", Pending: "a Linear output", Heads: "attention heads",
          Piece: "a piece of a split Linear output", Mask: "an attention mask",
          Scores: "attention scores", Probs: "attention probabilities",
          Core: "an attention output per head", Merged: "merged attention heads",
          Scaled: "a value times a constant", Param: "a parameter", TensorValue: "a tensor",
          Items: "a tuple of module outputs"}


def describe(v) -> str:
    """``v`` in words, for error messages."""
    if isinstance(v, Opaque):
        return v.what
    return _NAMES.get(type(v), type(v).__name__)


def axes_of(s: Stream) -> tuple[str, ...]:
    """Labels of a stream's tensor axes (``"B"`` batch, ``"T"`` tokens, ``"F"`` features or
    channels, ``"S0"``/``"S1"`` spatial)."""
    if s.kind == "conv1d":
        return ("B", "F", "S0")
    if s.kind == "conv2d":
        return ("B", "F", "S0", "S1")
    return ("B", "T", "F") if s.tokens else ("B", "F")


def resolve(v):
    """``v``, with a size of the model input replaced by its value where known."""
    return v.resolved() if isinstance(v, Dim) else v


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
