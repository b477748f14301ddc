"""Tests of the recommender side (zoo, data, fine-tuning)."""

import pytest

from graphopt.rec.data import recbole_folder

#: tests that read the real MovieLens-100K (recbole's copy)
needs_data = pytest.mark.skipif(recbole_folder() is None,
                                reason="MovieLens-100K not installed: pip install --no-deps recbole==1.2.1")
