"""prune-ffn: remove transformer FFN intermediate neurons."""

from __future__ import annotations

from graphopt.passes._ratio_prune import RatioPrunePass, ratio_options

from graphopt.passlib.pruning import find_channel_groups
from graphopt.transform.base import register_pass

__all__ = ["PruneFFN"]


@register_pass
class PruneFFN(RatioPrunePass):
    """Remove the lowest-importance FFN intermediate neurons of every transformer layer.

    Matches: ``linear (up) -> activation (gelu, relu, silu...) [-> dropout]
    -> linear (down)`` where the down projection's output feeds a residual
    ``add`` (a transformer block). Other linear chains are left to
    ``prune-linear``; gated FFNs (``act(gate) * up``) are declined.
    Produces: the up projection without the removed rows (weight and bias),
    the down projection without the matching input columns.
    Importance per neuron: the criterion summed over its up-projection row
    (and bias) and down-projection column; ``taylor`` uses |w * grad| over
    the calibration batches. ``scope=layer``: floor(ratio * width) per layer;
    ``scope=global``: ranked across layers (normalized per layer).
    Requires shapes (and calibration data for taylor). Preserves nothing.
    Approximate, tolerance=inf (see prune-heads: verify-each still checks
    lint, running, shapes, finiteness; tests hold ratio 0 to 1e-5 and check
    top-10 overlap).
    Before/after (ratio 0.5): ``gelu(linear(x, W1[64, 32], b1[64])) ->
    linear(., W2[32, 64])`` -> ``gelu(linear(x, W1[32, 32], b1[32])) -> linear(., W2[32, 32])``.
    """

    name = "prune-ffn"
    unit = "neurons"
    options = ratio_options("neurons")

    def groups(self, gm):  # type: ignore[no-untyped-def]
        groups, declined = find_channel_groups(gm)
        ffn = [g for g in groups if g.kind == "ffn"]
        return ffn, (declined if not ffn else [])
