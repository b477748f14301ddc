"""MovieLens-100K for recommendation: reading and splitting (:mod:`.movielens`),
the synthetic fallback (:mod:`.synthetic`), and sequence inputs with
leave-one-out ranking evaluation (:mod:`.ranking`)."""

from graphopt.rec.data.movielens import (
    DATA_ENV,
    ML100K_ITEMS,
    ML100K_USERS,
    SYNTHETIC_NOTICE,
    DataError,
    EvalSet,
    MovieLens,
    Split,
    find_movielens,
    load_movielens,
    read_movielens_folder,
    recbole_folder,
)
from graphopt.rec.data.ranking import encode_histories, evaluate_ranking, item_scores, popularity_metrics
from graphopt.rec.data.synthetic import synthetic_movielens

__all__ = [
    "DATA_ENV",
    "DataError",
    "MovieLens",
    "EvalSet",
    "Split",
    "SYNTHETIC_NOTICE",
    "load_movielens",
    "read_movielens_folder",
    "find_movielens",
    "recbole_folder",
    "synthetic_movielens",
    "encode_histories",
    "item_scores",
    "evaluate_ranking",
    "popularity_metrics",
    "ML100K_USERS",
    "ML100K_ITEMS",
]
