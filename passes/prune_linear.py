"""prune-linear: remove hidden units of MLP towers (DLRM, two-tower)."""

from __future__ import annotations

from graphopt.passes._ratio_prune import RatioPrunePass, ratio_options

from graphopt.passlib.pruning import find_channel_groups
from graphopt.transform.base import register_pass

__all__ = ["PruneLinear"]


@register_pass
class PruneLinear(RatioPrunePass):
    """Remove the lowest-importance hidden units of MLP layers, through ReLU/BatchNorm.

    Matches: ``linear -> (elementwise activation | eval dropout | 2-D
    BatchNorm)* -> linear(s)``: the hidden layers of MLP towers (DLRM bottom/top
    MLPs, two-tower towers). Transformer FFNs (down projection into a
    residual add) are left to ``prune-ffn``. A linear whose output feeds
    anything else (cat, stack, a residual add, a view, the model output) is
    declined with the op that blocks it.
    Produces: the producer linear without the removed rows (weight, bias),
    BatchNorm weight/bias/running stats without those channels, every
    consumer linear without the matching input columns.
    Importance per unit: the criterion summed over its producer row and
    consumer columns (``taylor``: |w * grad| over calibration batches).
    ``scope=layer``: floor(ratio * width) per layer; ``scope=global``: ranked
    across layers. Requires shapes (and calibration data for taylor).
    Preserves nothing. Approximate, tolerance=inf (see prune-heads).
    Before/after (ratio 0.5): ``relu(bn(linear(x, W1[16, 13]))) -> linear(., W2[8, 16])``
    -> ``relu(bn8(linear(x, W1[8, 13]))) -> linear(., W2[8, 8])``.
    """

    name = "prune-linear"
    unit = "units"
    options = ratio_options("units")

    def groups(self, gm):  # type: ignore[no-untyped-def]
        groups, declined = find_channel_groups(gm)
        return [g for g in groups if g.kind == "mlp"], declined
