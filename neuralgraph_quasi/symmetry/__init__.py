"""Weight-space symmetry groups: sample, compose, invert, act on graphs and models.

>>> from neuralgraph_quasi import to_graph, to_model, symmetry
>>> g = to_graph(model)
>>> element = symmetry.sample(g)                 # the largest known group
>>> equivalent = to_model(symmetry.act(element, g), model)   # same function
>>> symmetry.act(element.inverse(), symmetry.act(element, g))  # back to g
"""

from ._act import act
from ._element import GroupElement
from ._reindex import reindex
from ._sample import (
    GL_CONDITION,
    KINDS,
    identity,
    sample,
    scalable_nodes,
    sign_flippable_nodes,
)
from ._transforms import RandomSymmetry

__all__ = [
    "GroupElement",
    "KINDS",
    "GL_CONDITION",
    "sample",
    "act",
    "identity",
    "reindex",
    "RandomSymmetry",
    "scalable_nodes",
    "sign_flippable_nodes",
]
