"""Built-in passes (installed as ``graphopt.passes``): one module per pass.

Importing this package registers every pass and the preset pipelines.
"""

from graphopt.passes import (  # noqa: F401  (importing registers each pass)
    cast,
    cse,
    dce,
    embedding_bag_to_gather,
    fold_batchnorm,
    fold_constants,
    fuse_attention,
    fuse_linear_act,
    fuse_qkv,
    prune_embeddings,
    prune_ffn,
    prune_heads,
    prune_linear,
    prune_positions,
    quantize_embeddings,
    quantize_int8,
    quantize_int8_dynamic,
    remove_dropout,
    remove_noop,
    split_stages,
)

from graphopt.transform.base import register_preset

register_preset(
    "O1",
    "remove-dropout,remove-noop,cse,fold-constants,dce",
    "cleanup: dropout, no-op views/clones/casts, common subexpressions, constant subgraphs, dead code",
)
register_preset(
    "O2",
    "remove-dropout,remove-noop,cse,fold-constants,dce,"
    "fold-batchnorm,embedding-bag-to-gather,fuse-attention,prune-positions,fuse-qkv,fuse-linear-act,cse,dce",
    "O1 + fusions: batch-norm folding, EmbeddingBag as gather, SDPA attention, only the positions "
    "the outputs read, QKV, linear+activation",
)
