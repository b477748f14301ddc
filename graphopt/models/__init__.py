"""The model zoo's public name: ``from graphopt.models import load_model``.

The zoo lives in :mod:`graphopt.rec.zoo` (the recommender side of the tree);
this module is the stable import path the README and users rely on.
"""

from graphopt.rec.zoo import ZooModel, available_models, load_model, register_model

__all__ = ["ZooModel", "load_model", "available_models", "register_model"]
