"""Offline generators of model zoos in their published layouts.

Each trains many small models at once (vectorised over the model axis), writes atomically,
resumes after an interruption, and does nothing when its zoo is complete.

* :func:`generate_agnews` (:mod:`.agnews`): AGNews-Transformers (Small Transformer Zoo
  layout) on a synthetic 4-topic corpus or the user's AG News CSV.
* :func:`generate_mnist` (:mod:`.mnist`): MNIST-Transformers on scikit-learn's digits.
* :func:`generate_cnn` (:mod:`.cnn`): a Small CNN Zoo (weights.npy / metrics.csv /
  layout.csv, TensorFlow layouts) on scikit-learn's digits.
* :func:`generate_inr` (:mod:`.inr`): SIREN INRs of scikit-learn's digits, NFN layout.
"""

from .agnews import AGNewsZooConfig, load_zoo_inputs
from .agnews import generate as generate_agnews
from .cnn import CNNZooConfig
from .cnn import generate as generate_cnn
from .corpus import Corpus, FrozenEmbedding
from .inr import INRZooConfig
from .inr import generate as generate_inr
from .mnist import MNISTZooConfig
from .mnist import generate as generate_mnist

__all__ = ["AGNewsZooConfig", "generate_agnews", "load_zoo_inputs", "Corpus", "FrozenEmbedding",
           "CNNZooConfig", "generate_cnn", "INRZooConfig", "generate_inr", "MNISTZooConfig",
           "generate_mnist"]
