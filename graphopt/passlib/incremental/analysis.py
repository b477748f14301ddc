"""What the incremental derivation needs to know about a causal Program, and
the checks that it may be derived at all.

:func:`analyze` finds, in a captured Program with inputs ``(ids, mask)`` of
dims ``(batch, seq)``:

- each attention: a ``scaled_dot_product_attention`` node (what
  ``fuse-attention`` or transformers' ``sdpa`` produce) with its q, k, v;
- the running event counts: ``cumsum`` of the mask along seq, from which the
  model computes positions (``cumsum(mask) - 1``: positions count from each
  user's first real event, whatever the left padding);
- the position table those counts index, if any (its rows bound how far a
  user's positions may count).

It then checks, by running the Program on a left-padded probe batch, that
every attention reads exactly the causal, padding-masked keys
(:func:`check_causal`): a bidirectional model (BERT) or an attention that
ignores padding is refused with the reason, before anything is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt.errors import PreconditionError
from graphopt.ir.fx import is_op, tensor_meta
from graphopt.ir.program import Program

__all__ = ["Attention", "CausalPlan", "analyze", "check_causal", "probe_inputs"]

aten = torch.ops.aten

#: ops through which the mask's values reach a cumsum unchanged (casts and views)
_PASS_THROUGH = (
    aten.view.default, aten.reshape.default, aten._to_copy.default, aten.clone.default,
    aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim,
)
#: elementwise integer ops between the running count and a position-table lookup
_INDEX_MATH = (
    aten.sub.Tensor, aten.sub.Scalar, aten.add.Tensor, aten.add.Scalar, aten.clamp.default,
    aten.clamp_min.default, aten.mul.Tensor, aten.mul.Scalar, aten.view.default, aten.reshape.default,
    aten.unsqueeze.default, aten.expand.default, aten._to_copy.default, aten.clone.default,
)
_SDPA = aten.scaled_dot_product_attention.default
#: an additive float mask entry at or below this is "masked"
_MASKED = -1e4


@dataclass
class Attention:
    """One attention of the Program: the SDPA node and its keys/values' layout."""

    node: torch.fx.Node
    heads: int  # key/value heads (fewer than query heads under GQA)
    head_dim: int
    dtype: torch.dtype

    @property
    def qkv(self) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
        return self.node.args[0], self.node.args[1], self.node.args[2]  # type: ignore[return-value]

    def sdpa_kwargs(self) -> dict[str, Any]:
        """The SDPA options to keep (the mask and is_causal are replaced by the window)."""
        kwargs = {k: v for k, v in self.node.kwargs.items() if k in ("scale", "enable_gqa")}
        return kwargs


@dataclass
class CausalPlan:
    """Where the derivation rewrites: inputs, attentions, running counts."""

    ids: str
    mask: str
    attentions: list[Attention]
    counts: list[torch.fx.Node] = field(default_factory=list)
    #: rows of the position table the counts index (None: no table, e.g. rotary or no positions)
    max_positions: int | None = None


def _fail(program: Program, why: str, fix: str) -> PreconditionError:
    return PreconditionError(f"incremental state for {program.name}: {why}; {fix}")


def _inputs(program: Program) -> tuple[str, str]:
    names = program.input_names
    specs = {s.name: s for s in program.inputs}
    if len(names) != 2 or "attention_mask" not in names:
        raise _fail(program, f"inputs are {names}", "it needs exactly (ids, attention_mask), both (batch, seq)")
    mask = "attention_mask"
    ids = next(n for n in names if n != mask)
    for name in (ids, mask):
        labels = specs[name].dynamic
        if labels.get(0) != "batch" or labels.get(1) != "seq" or len(specs[name].shape) != 2:
            raise _fail(program, f"input '{name}' has shape {list(specs[name].shape)} with dynamic dims {labels}",
                        "capture it with {0: 'batch', 1: 'seq'} dynamic")
    if specs[ids].dtype.is_floating_point:
        raise _fail(program, f"input '{ids}' is {specs[ids].dtype}", "the events must be integer ids")
    return ids, mask


def _attentions(program: Program) -> list[Attention]:
    found = []
    for node in program.graph.nodes:
        if not is_op(node, _SDPA):
            continue
        k = tensor_meta(node.args[1])
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        if dropout:
            raise _fail(program, f"attention {node.name} has dropout_p={dropout}", "capture the model in eval mode")
        if k is None or k.dim() != 4 or not isinstance(k.shape[1], int) or not isinstance(k.shape[3], int):
            raise _fail(program, f"attention {node.name} has keys of shape {None if k is None else list(k.shape)}",
                        "keys must be (batch, heads, seq, head_dim) with static heads and head_dim")
        found.append(Attention(node, int(k.shape[1]), int(k.shape[3]), k.dtype))
    if not found:
        raise _fail(program, "no scaled_dot_product_attention in the graph",
                    "run fuse-attention first (O2 does), or capture with attn_implementation='sdpa'")
    return found


def _counts(program: Program, mask_name: str) -> list[torch.fx.Node]:
    """cumsum nodes over the mask along seq (through casts and views)."""
    ph = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == mask_name)
    counts, frontier, seen = [], [ph], {ph}
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            if user in seen:
                continue
            seen.add(user)
            if is_op(user, aten.cumsum.default) and user.args[0] is cur:
                val = tensor_meta(user)
                dim = user.args[1]
                if val is None or dim not in (-1, val.dim() - 1):
                    raise _fail(program, f"{user.name} sums the mask along dim {dim}", "counts must run along seq")
                counts.append(user)
            elif is_op(user, *_PASS_THROUGH) and user.args and user.args[0] is cur:
                frontier.append(user)
    return counts


def _position_rows(counts: list[torch.fx.Node]) -> int | None:
    """Rows of the smallest table indexed by a value computed from the counts."""
    rows: list[int] = []
    frontier, seen = list(counts), set(counts)
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            if is_op(user, aten.embedding.default) and len(user.args) > 1 and user.args[1] is cur:
                table = tensor_meta(user.args[0])
                if table is not None and isinstance(table.shape[0], int):
                    rows.append(int(table.shape[0]))
            elif is_op(user, *_INDEX_MATH) and user not in seen:
                seen.add(user)
                frontier.append(user)
    return min(rows) if rows else None


def analyze(program: Program) -> CausalPlan:
    """The :class:`CausalPlan` of ``program``; raises ``PreconditionError`` with the reason
    when the Program is not a causal (ids, mask) model the derivation handles."""
    ids, mask = _inputs(program)
    attentions = _attentions(program)
    counts = _counts(program, mask)
    plan = CausalPlan(ids, mask, attentions, counts, _position_rows(counts))
    check_causal(program, plan)
    return plan


def probe_inputs(program: Program, lengths: list[int], seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(ids, mask)`` with ``lengths[b]`` real events per user, ids in the input's range."""
    spec = next(s for s in program.inputs if s.name != "attention_mask")
    mask_spec = next(s for s in program.inputs if s.name == "attention_mask")
    low = spec.low if spec.low is not None else 0
    high = spec.high if spec.high is not None else low + 2
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(max(low, 1) if high - low > 1 else low, high, (len(lengths), seq), generator=gen,
                        dtype=spec.dtype)
    mask = torch.zeros(len(lengths), seq, dtype=mask_spec.dtype)
    for b, n in enumerate(lengths):
        mask[b, seq - n:] = 1
        ids[b, : seq - n] = low
    return ids, mask


class _AttentionMasks(torch.fx.Interpreter):
    """Runs the graph and records what each SDPA node reads as its mask."""

    def __init__(self, gm: torch.fx.GraphModule, nodes: set[torch.fx.Node]):
        super().__init__(gm)
        self.nodes = nodes
        self.seen: dict[str, tuple[Any, bool, int]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.nodes:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            causal = bool(args[5] if len(args) > 5 else kwargs.get("is_causal", False))
            self.seen[n.name] = (mask, causal, int(args[0].shape[2]))
        return out


def _allowed(mask: Any, causal: bool, n_query: int, keys: int, batch: int) -> torch.Tensor:
    """What the recorded mask lets each query read: ``(batch, heads or 1, n_query, keys)`` bool."""
    if mask is None:
        allowed = torch.ones(1, 1, n_query, keys, dtype=torch.bool)
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > _MASKED
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if causal:
        allowed = allowed & torch.ones(n_query, keys, dtype=torch.bool).tril(keys - n_query)
    return allowed.expand(batch, allowed.shape[1], n_query, keys)


def check_causal(program: Program, plan: CausalPlan) -> None:
    """Every attention reads exactly ``key <= query`` among real events (probed on a
    left-padded batch); float masks must be 0 where they allow (no additive bias)."""
    lengths, seq = [6, 3], 6
    ids, mask = probe_inputs(program, lengths, seq)
    by_name = {plan.ids: ids, plan.mask: mask}
    recorder = _AttentionMasks(program.gm, {a.node for a in plan.attentions})
    with torch.no_grad():
        recorder.run(*(by_name[n] for n in program.input_names))
    valid = mask.bool()
    for attention in plan.attentions:
        recorded, causal, n_query = recorder.seen[attention.node.name]
        if recorded is not None and recorded.is_floating_point():
            biased = (recorded > _MASKED) & (recorded != 0)
            if bool(biased.any()):
                raise _fail(program, f"attention {attention.node.name} adds a float bias to its scores "
                            "(relative positions?)", "only masks that allow or block a key are supported")
        allowed = _allowed(recorded, causal, n_query, seq, len(lengths))
        q_index = torch.arange(seq - n_query, seq)
        expected = (torch.arange(seq).unsqueeze(0) <= q_index.unsqueeze(1)).unsqueeze(0) & valid.unsqueeze(1)
        for b, n in enumerate(lengths):
            real = q_index >= seq - n  # rows of real queries; padded rows may read anything
            got = allowed[b, :, real]
            want = expected[b, real].unsqueeze(0).expand_as(got)
            if not torch.equal(got, want):
                bad = (got != want).nonzero()[0].tolist()
                query, key = int(q_index[real][bad[1]]), int(bad[2])
                reads = "reads" if bool(got[tuple(bad)]) else "does not read"
                raise _fail(program, f"attention {attention.node.name} is not causal over real events: query "
                            f"{query} {reads} key {key} (user {b}, {n} of {seq} positions real)",
                            "incremental state needs a causal model whose attention masks padding")
