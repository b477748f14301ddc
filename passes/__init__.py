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
    quantize_int8_weights,
    remove_dropout,
    remove_noop,
    split_stages,
)

from graphopt.transform.base import register_preset

_O1 = "remove-dropout,remove-noop,cse,fold-constants,dce"
_FUSIONS = "fold-batchnorm,embedding-bag-to-gather,fuse-attention,prune-positions,fuse-qkv"
_O2 = f"{_O1},{_FUSIONS},fuse-linear-act,cse,dce"


def _small(bits: int) -> str:
    """O2 with the size passes before linear+activation fusion (which needs fp32 weights)."""
    return f"{_O1},{_FUSIONS},quantize-embeddings{{bits={bits} min_rows=1024}},quantize-int8-weights,fuse-linear-act,cse,dce"


register_preset(
    "O1",
    _O1,
    "cleanup: dropout, no-op views/clones/casts, common subexpressions, constant subgraphs, dead code",
)
register_preset(
    "O2",
    _O2,
    "O1 + fusions: batch-norm folding, EmbeddingBag as gather, SDPA attention, only the positions "
    "the outputs read, QKV, linear+activation",
)
register_preset(
    "Os",
    _small(8),
    "optimize for size (like -Os): O2 + row-wise 8-bit embedding tables of >= 1024 rows (fp16 scale/offset "
    "per row, gathered then dequantized) + int8 linear weights (weight-only)",
)
register_preset(
    "Oz",
    _small(4),
    "Os with 4-bit embedding tables (two codes per byte): smaller still, at 16 levels per row",
)
