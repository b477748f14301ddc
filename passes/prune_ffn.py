"""prune-ffn: remove transformer FFN intermediate neurons."""

from __future__ import annotations

from graphopt.pass_base import Option, Pass, register_pass
from graphopt.pruning import CRITERIA, check_ratio, find_channel_groups, run_ratio_prune


@register_pass
class PruneFFN(Pass):
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
    options = (
        Option("ratio", float, 0.3, "fraction of intermediate neurons to remove, in [0, 1)", check=check_ratio),
        Option("criterion", str, "l1", "neuron importance", choices=CRITERIA),
        Option("scope", str, "layer", "rank neurons per layer or across all layers", choices=("layer", "global")),
    )
    requires = frozenset({"shapes"})
    exact = False
    tolerance = float("inf")
    backend_notes = "shrinks weights and shapes: every backend gets the smaller model"

    def validate(self) -> None:
        if self.criterion == "taylor":
            self.requires = type(self).requires | {"calibration_data"}

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        groups, declined = find_channel_groups(program.gm)
        ffn = [g for g in groups if g.kind == "ffn"]
        return run_ratio_prune(program, ctx, ffn, declined if not ffn else [], ratio=self.ratio,
                               criterion=self.criterion, scope=self.scope, unit="neurons")
