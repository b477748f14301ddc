"""The rewrite-rule layer: a pass as a list of rules run by one driver.

A :class:`Rule` says what it matches, why it declines and how it rewrites
(onnxscript's ``pattern``/``check``/``rewrite``); :func:`apply_rules` walks the
graph, counts each rule's applications (Inductor's ``PatternMatcherPass``
counters) and builds the PassResult. A :class:`RewritePass` only lists its
rules::

    class DoubleRelu(Rule[Match]):
        name = "relu-relu"                         # the stats key

        def match(self, gm, node):                 # None: not this pattern (silent)
            if is_op(node, aten.relu.default) and is_op(node.args[0], aten.relu.default):
                return Match(node)
            return None

        def check(self, gm, match):                # a reason declines (reported)
            return None if len(match.node.args[0].users) == 1 else "inner relu is read elsewhere"

        def rewrite(self, gm, match):              # old node -> its replacement
            return {match.node: match.node.args[0]}

    @register_pass
    class RemoveDoubleRelu(RewritePass):
        name = "remove-double-relu"

        def rules(self):
            return [DoubleRelu()]

What the driver does:

- Walk: the nodes in graph order as they were when the walk began; nodes
  erased meanwhile are skipped, nodes created are not visited in that walk.
  At each node the rules are tried in order: the first whose ``match`` is not
  None and whose ``check`` passes rewrites it; a declining check records
  ``"where: reason"`` against ``match.node`` and lets the next rule try.
- One walk by default. ``fixpoint=True`` walks again until a walk rewrites
  nothing (at most ``max_walks`` walks, else GraphoptError): for rules whose
  rewrites create new matches.
- Replacement: ``rewrite`` returns ``{old: new}``. Every use of ``old`` (but
  ``new`` itself) then reads ``new``; ``new`` takes ``old``'s ``meta["val"]``
  if it has none, so later matches in the walk can read a replacement's shape;
  ``old`` and the inputs that became dead are erased.
- Shapes: when the graph carries fake values, each created node gets
  ``meta["val"]`` inferred once (:func:`graphopt.ir.shapes.fill_vals`), in
  graph order, after the walk that created it, not after each match. Rules
  may read the metadata of replacements during a walk, not of other new nodes.
- End, when a rule fired: dead code the rewrites left (weights a rewrite
  replaced in place) is removed, nodes dead before stay; the graph is linted
  and the GraphModule recompiled.
- Result: ``modified`` iff a rule fired; ``stats`` maps ``match.kind`` (the
  rule's name when None) to its count; ``declined`` lists each node still in
  the graph once per reason; ``details`` holds the ``detail`` of each applied match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch.fx

from graphopt.errors import GraphoptError
from graphopt.ir.fx import where
from graphopt.ir.shapes import fill_vals, graph_fake_mode
from graphopt.transform.base import Pass, PassResult

if TYPE_CHECKING:
    from graphopt.ir.program import Program
    from graphopt.transform.manager import PassContext

__all__ = ["Match", "Rule", "apply_rules", "RewritePass"]


@dataclass(eq=False)
class Match:
    """One place a rule matched. Rules subclass it to carry the nodes they bound.

    ``node`` is where a decline is reported; ``kind`` is the stats key when a
    rule counts its applications by kind (``conv+bn`` vs ``linear+bn``);
    ``detail`` is a record appended to ``PassResult.details`` when applied.
    """

    node: torch.fx.Node
    kind: str | None = field(default=None, kw_only=True)
    detail: dict[str, Any] | None = field(default=None, kw_only=True)


M = TypeVar("M", bound=Match)


class Rule(Generic[M]):
    """A rewrite rule: ``match`` a node, ``check`` the match, ``rewrite`` it."""

    #: intent, and the stats key unless a match sets ``kind``
    name: str = ""

    def match(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> M | None:
        """The match rooted at ``node``, or None when ``node`` is not this rule's pattern."""
        raise NotImplementedError

    def check(self, gm: torch.fx.GraphModule, match: M) -> str | None:
        """Why the rule must not rewrite ``match`` (reported), or None to rewrite it."""
        return None

    def rewrite(self, gm: torch.fx.GraphModule, match: M) -> Mapping[torch.fx.Node, torch.fx.Node]:
        """Insert the replacement; return ``{old: new}`` for the driver to redirect and erase."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<rule {self.name or type(self).__name__}>"


def _impure(node: torch.fx.Node) -> bool:
    return node.is_impure() or node.op == "call_module"


def _erase_dead(graph: torch.fx.Graph, nodes: Sequence[torch.fx.Node]) -> None:
    """Erase ``nodes`` that have no users, then their inputs that became dead."""
    work = list(nodes)
    while work:
        node = work.pop()
        if node._erased or node.users or node.op not in ("call_function", "get_attr") or _impure(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        work.extend(inputs)


def _replace(graph: torch.fx.Graph, replacements: Mapping[torch.fx.Node, torch.fx.Node]) -> None:
    for old, new in replacements.items():
        if old is new:
            continue
        if "val" not in new.meta and "val" in old.meta:
            new.meta["val"] = old.meta["val"]  # provisional: refreshed when the walk ends
        old.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    _erase_dead(graph, list(replacements))


class _Run:
    """State of one apply_rules call: counts, declines, details."""

    def __init__(self, gm: torch.fx.GraphModule, rules: Sequence[Rule[Any]]):
        self.gm, self.rules = gm, list(rules)
        self.counts: dict[str, int] = {}
        self.declines: dict[torch.fx.Node, dict[str, None]] = {}
        self.details: list[dict[str, Any]] = []

    def walk(self) -> int:
        fired = 0
        for node in list(self.gm.graph.nodes):
            if node._erased:
                continue
            for rule in self.rules:
                match = rule.match(self.gm, node)
                if match is None:
                    continue
                reason = rule.check(self.gm, match)
                if reason:
                    self.declines.setdefault(match.node, {})[f"{where(match.node)}: {reason}"] = None
                    continue
                _replace(self.gm.graph, rule.rewrite(self.gm, match))
                self.declines.pop(match.node, None)
                key = match.kind or rule.name
                self.counts[key] = self.counts.get(key, 0) + 1
                if match.detail is not None:
                    self.details.append(match.detail)
                fired += 1
                break
        return fired

    def declined(self) -> list[str]:
        return [text for node, texts in self.declines.items() if not node._erased for text in texts]


def apply_rules(
    program: Program, rules: Sequence[Rule[Any]], *, fixpoint: bool = False, max_walks: int = 8
) -> PassResult:
    """Apply ``rules`` to ``program`` (in place) as the module docstring describes."""
    gm, graph = program.gm, program.gm.graph
    dead_before = {n for n in graph.nodes if not n.users}
    known = set(graph.nodes)
    has_shapes = graph_fake_mode(graph) is not None
    run = _Run(gm, rules)
    for _ in range(max_walks):
        fired = run.walk()
        if fired and has_shapes:
            new = [n for n in graph.nodes if n not in known]
            fill_vals(graph, new)
            known.update(new)
        if not fired or not fixpoint:
            break
    else:
        names = ", ".join(r.name for r in run.rules)
        raise GraphoptError(
            f"rules {names} still rewrote the graph after {max_walks} walks; "
            "one rule probably undoes another (or raise max_walks)"
        )
    if run.counts:
        graph.eliminate_dead_code(is_impure_node=lambda n: n in dead_before or _impure(n))
        graph.lint()
        gm.recompile()
    return PassResult(program, modified=bool(run.counts), stats=dict(run.counts),
                      declined=run.declined(), details=run.details)


class RewritePass(Pass):
    """A pass made of rules: subclasses define ``rules()``; ``run`` is :func:`apply_rules`.

    ``fixpoint`` selects re-walking until nothing changes; ``notes`` may add
    one-line remarks computed from the result.
    """

    fixpoint: ClassVar[bool] = False

    def rules(self) -> Sequence[Rule[Any]]:
        raise NotImplementedError

    def notes(self, result: PassResult) -> list[str]:
        return []

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        result = apply_rules(program, self.rules(), fixpoint=self.fixpoint)
        result.notes.extend(self.notes(result))
        return result
