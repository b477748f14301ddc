"""prune-heads: remove whole attention heads (Q/K/V rows, output-projection columns)."""

from __future__ import annotations

from graphopt.passes._ratio_prune import RatioPrunePass, ratio_options

from graphopt.passlib.pruning import find_head_groups
from graphopt.transform.base import register_pass

__all__ = ["PruneHeads"]


@register_pass
class PruneHeads(RatioPrunePass):
    """Remove the lowest-importance attention heads so every attention gets smaller.

    Matches: each ``scaled_dot_product_attention`` whose Q/K/V are
    ``linear -> view [b, s, heads, head_dim] -> transpose(1, 2)`` (the linear
    may be a fused QKV projection read through ``split``/``split_with_sizes``/
    ``slice``, as ``fuse-qkv`` leaves it, so the pass runs before or after it)
    and whose output reaches one output-projection linear through
    ``[view] -> transpose -> [clone] -> view [b, s, heads*head_dim]``.
    Declined (with a reason): grouped-query attention, per-head masks, shared
    or computed weights, any other consumer on the way.
    Produces: Q/K/V weights/biases without the removed heads' rows, the output
    projection without their input columns, literal head counts in views and
    split sizes updated (``-1`` entries stay). SDPA's scale is unchanged
    (head_dim is unchanged).
    Importance: per head, the criterion summed over its Q/K/V rows and output
    columns (``l1``, ``l2``; ``taylor``: sum |w * grad| over the calibration
    batches of a pseudo-label loss). ``scope=layer`` removes floor(ratio*heads)
    heads per attention; ``scope=global`` removes floor(ratio*all heads) ranked
    across layers (scores normalized per layer) and refuses to empty a layer.
    Requires shapes (and calibration data for taylor). Preserves nothing.
    Approximate: tolerance=inf because verify-each compares with the pre-pass
    outputs and pruning changes them by a model-dependent amount, not a numeric
    error; verify-each still checks lint, that it runs, output shapes and
    finiteness. The tests hold ratio 0 to 1e-5 and check top-10 overlap.
    Before/after (4 heads of 8, one removed): ``linear(x, Wq[32, 32]) ->
    view [b, s, -1, 8]`` -> ``linear(x, Wq[24, 32]) -> view [b, s, -1, 8]``;
    ``view(sdpa, [b, 4, s, 8])`` -> ``view(sdpa, [b, 3, s, 8])``;
    ``linear(merged, Wo[32, 32])`` -> ``linear(merged, Wo[32, 24])``.
    """

    name = "prune-heads"
    unit = "heads"
    options = ratio_options("heads")

    def groups(self, gm):  # type: ignore[no-untyped-def]
        return find_head_groups(gm)
