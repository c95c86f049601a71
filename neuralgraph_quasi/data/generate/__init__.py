"""Offline generators of model zoos in their published layouts.

* :func:`generate_agnews` (:mod:`.agnews`): the AGNews-architecture Small Transformer Zoo,
  trained many models at once on a synthetic corpus or the user's AG News CSV.
"""

from .agnews import AGNewsZooConfig, load_zoo_inputs
from .agnews import generate as generate_agnews
from .corpus import Corpus, FrozenEmbedding

__all__ = ["AGNewsZooConfig", "generate_agnews", "load_zoo_inputs", "Corpus", "FrozenEmbedding"]
