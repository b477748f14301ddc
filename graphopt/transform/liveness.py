"""Tensor liveness over a GraphModule, from ``meta["val"]``: the buffers one
eager run allocates (which node makes each, its size, when it dies), the
weights it reads, and the size symbols renamed after the inputs' labels.

Read by :mod:`graphopt.transform.memory`; see its docstring for the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx

from graphopt.ir.fx import fetch_attr, target_name
from graphopt.transform.kernel_scratch import scratch_rule

__all__ = [
    "Poly",
    "Buffer",
    "WeightInfo",
    "dtype_bits",
    "size_poly",
    "compute_order",
    "label_symbols",
    "collect_weights",
    "collect_buffers",
    "aliased_inputs",
]

log = logging.getLogger(__name__)
aten = torch.ops.aten

_EMBEDDING_TABLE_OPS = (
    aten.embedding.default,
    aten.embedding_bag.default,
    aten.embedding_bag.padding_idx,
    aten._embedding_bag.default,
    aten._embedding_bag_forward_only.default,
)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.bool)
_NIBBLE_OPS = (aten.bitwise_right_shift.Tensor_Scalar, aten.__rshift__.Scalar)
#: quantize-embeddings{bits=4} unpacks the high nibble as floor(code * 1/16) in float (TensorRT has no shifts)
_NIBBLE_SCALE = 0.0625


def _unpacks_nibbles(gathered: torch.fx.Node) -> bool:
    """Whether the gathered codes are split into nibbles: a shift, or floor(float(codes) / 16)."""
    for user in gathered.users:
        if user.target in _NIBBLE_OPS:
            return True
        if user.target is aten._to_copy.default:
            for mul in user.users:
                if (mul.target is aten.mul.Tensor and _NIBBLE_SCALE in mul.args[1:]
                        and any(u.target is aten.floor.default for u in mul.users)):
                    return True
    return False

#: a size as {monomial in the size symbols: integer coefficient}
Poly = dict[Any, int]


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element, sub-byte dtypes (``torch.uint4``, ``torch.int4``) included."""
    name = str(dtype).replace("torch.", "")
    for prefix in ("uint", "int"):
        if name.startswith(prefix) and name[len(prefix):].isdigit() and int(name[len(prefix):]) < 8:
            return int(name[len(prefix):])
    return dtype.itemsize * 8


def size_poly(expr: Any) -> Poly:
    expr = sympy.expand(sympy.sympify(expr))
    out: Poly = {}
    for term, coeff in expr.as_coefficients_dict().items():
        out[term] = out.get(term, 0) + (int(coeff) if coeff.is_Integer else coeff)
    return {k: v for k, v in out.items() if v != 0}


@dataclass(frozen=True)
class WeightInfo:
    """One tensor the graph reads through ``get_attr``."""

    name: str
    kind: str  # embedding | dense | other
    role: str  # parameter | buffer | constant
    dtype: str  # e.g. float32, uint8 (4-bit packed)
    shape: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class Buffer:
    """One allocation of a run: made by ``node`` at position ``start``, freed after ``end``."""

    node: str
    op: str
    shape: str
    dtype: str
    size: Poly
    start: int
    end: int
    kind: str = "activation"  # activation | input | scratch (inside one kernel)


def compute_order(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes that run, in graph order (no placeholders, ``get_attr`` or output)."""
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")]


# ------------------------------------------------------------------ symbols
def _expr(size: Any) -> Any:
    if isinstance(size, sympy.Basic):
        return size
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def label_symbols(program: Any) -> tuple[dict[str, Any], dict[str, int], dict[Any, Any], dict[Any, int], list[str]]:
    """(label -> Symbol, label -> example size, shape-env symbol -> label Symbol,
    unlabelled symbol -> the value used for it, notes).

    Labels come from the Program's inputs (``InputSpec.dynamic``); a dim the
    inputs share a label for (``batch`` on ``input_ids`` and ``attention_mask``)
    becomes one symbol. A symbol no input labels (data-dependent) is evaluated
    at its example value, with a note."""
    symbols: dict[str, Any] = {}
    defaults: dict[str, int] = {}
    rename: dict[Any, Any] = {}
    env = None
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    for spec, node in zip(program.inputs, placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for dim, label in spec.dynamic.items():
            if dim >= val.dim() or not isinstance(val.shape[dim], torch.SymInt):
                continue
            env = val.shape[dim].node.shape_env
            expr = _expr(val.shape[dim])
            symbol = symbols.setdefault(label, sympy.Symbol(label, positive=True, integer=True))
            defaults.setdefault(label, int(spec.shape[dim]))
            if expr.is_Symbol:
                rename.setdefault(expr, symbol)
    others: dict[Any, int] = {}
    notes: list[str] = []
    seen: set[Any] = set()
    for node in program.gm.graph.nodes:
        for val in _tensors(node.meta.get("val")):
            for size in val.shape:
                if isinstance(size, torch.SymInt):
                    seen |= _expr(size).free_symbols
    for s in sorted(seen - set(rename), key=str):
        env = env or _shape_env(program)
        hint = env.var_to_val.get(s) if env is not None else None
        others[s] = int(hint) if hint is not None else 1
        notes.append(f"size {s} is not an input's labelled dim (data-dependent?); counted as {others[s]}")
    return symbols, defaults, rename, others, notes


def _shape_env(program: Any) -> Any:
    for node in program.gm.graph.nodes:
        for val in _tensors(node.meta.get("val")):
            for size in val.shape:
                if isinstance(size, torch.SymInt):
                    return size.node.shape_env
    return None


def _tensors(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (tuple, list)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


# ------------------------------------------------------------------ weights
def _is_table(node: torch.fx.Node, seen: set[torch.fx.Node] | None = None) -> bool:
    """Whether ``node``'s value reaches an embedding lookup's table argument
    (directly, or through views and dtype conversions)."""
    seen = seen if seen is not None else set()
    if node in seen:
        return False
    seen.add(node)
    for user in node.users:
        if user.op != "call_function":
            continue
        if user.target in _EMBEDDING_TABLE_OPS and user.args and user.args[0] is node:
            return True
        if user.target is aten._to_copy.default or _alias_source(user, 0) is node:
            if _is_table(user, seen):
                return True
    return False


def _dtype_label(node: torch.fx.Node, value: torch.Tensor) -> str:
    name = str(value.dtype).replace("torch.", "")
    if value.dtype == torch.uint8:  # quantize-embeddings{bits=4} packs two codes per byte
        for user in node.users:
            if user.target in _EMBEDDING_TABLE_OPS and _unpacks_nibbles(user):
                return "uint8 (4-bit packed)"
    return name


def collect_weights(gm: torch.fx.GraphModule) -> list[WeightInfo]:
    """Every tensor a live ``get_attr`` reads, once per tensor."""
    params = {id(p) for p in gm.parameters()}
    buffers = {id(b) for b in gm.buffers()}
    first: dict[int, WeightInfo] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        value = fetch_attr(gm, str(node.target))
        if not isinstance(value, torch.Tensor):
            continue
        table = _is_table(node)
        if id(value) in first:
            if table and first[id(value)].kind != "embedding":  # a tied table read as a head elsewhere
                first[id(value)] = WeightInfo(**{**first[id(value)].__dict__, "kind": "embedding"})
            continue
        kind = "embedding" if table else "dense" if value.dim() >= 2 and value.dtype not in _INDEX_DTYPES else "other"
        role = "parameter" if id(value) in params else "buffer" if id(value) in buffers else "constant"
        first[id(value)] = WeightInfo(
            name=str(node.target), kind=kind, role=role, dtype=_dtype_label(node, value),
            shape=tuple(value.shape), bytes=(value.numel() * dtype_bits(value.dtype) + 7) // 8,
        )
    return list(first.values())


# ------------------------------------------------------------------ aliasing
def _arg_value(node: torch.fx.Node, schema: Any, index: int) -> Any:
    arg = schema.arguments[index]
    if index < len(node.args) and not arg.kwarg_only:
        return node.args[index]
    return node.kwargs.get(arg.name)


#: ops whose schema says "aliases its input" but that copy when a view cannot express the result
_MAYBE_COPY = (aten.reshape, aten.flatten, aten.contiguous, aten.to, aten.reshape_as, aten.type_as, aten.unflatten)


def _copies(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """Whether a maybe-copy op (reshape of a non-contiguous tensor) copies: rerun
    it on its inputs' fake tensors and see whether the result shares storage."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.node import map_arg
    from torch.multiprocessing.reductions import StorageWeakRef

    if getattr(node.target, "overloadpacket", None) not in _MAYBE_COPY:
        return False
    x = source.meta.get("val")
    if not isinstance(x, FakeTensor):
        return False
    args = map_arg(node.args, lambda n: n.meta.get("val"))
    kwargs = map_arg(node.kwargs, lambda n: n.meta.get("val"))
    try:
        with x.fake_mode:
            y = node.target(*args, **kwargs)  # type: ignore[operator]
        base = next(a for a in args if isinstance(a, FakeTensor))
        return StorageWeakRef(y.untyped_storage()) != StorageWeakRef(base.untyped_storage())
    except Exception:  # noqa: BLE001 - cannot rerun: trust the schema
        log.debug("could not rerun %s to tell view from copy", node.name, exc_info=True)
        return False


def _alias_source(node: torch.fx.Node, index: int) -> torch.fx.Node | None:
    """The input node that return ``index`` of ``node`` aliases (a view or an
    in-place write), per the op's schema (a maybe-copy op rerun on fakes)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema
    returns = schema.returns
    if not returns:
        return None
    ret = returns[min(index, len(returns) - 1)]  # a Tensor[] return: every element
    if ret.alias_info is None:
        return None
    sets = set(ret.alias_info.before_set)
    for j, arg in enumerate(schema.arguments):
        info = arg.alias_info
        # a Tensor(a)[] return carries its set on the elements; the input then reads (a -> *)
        if info is None or not (sets & set(info.before_set) or (not sets and "*" in info.after_set)):
            continue
        value = _arg_value(node, schema, j)
        if not isinstance(value, torch.fx.Node):
            return None
        return None if _copies(node, value) else value
    return None


def aliased_inputs(node: torch.fx.Node) -> list[torch.fx.Node | None]:
    """Per tensor output of ``node``: the node it aliases, or None if it allocates."""
    val = node.meta.get("val")
    if node.op == "call_function" and target_name(node.target) == "getitem":
        return [node.args[0]] if isinstance(node.args[0], torch.fx.Node) else [None]
    count = len(val) if isinstance(val, (tuple, list)) else 1
    return [_alias_source(node, i) for i in range(count)]


# ------------------------------------------------------------------ buffers
def _buffer(name: str, op: str, shape: Sequence[Any], dtype: torch.dtype, start: int, end: int,
            kind: str, rename: dict[Any, Any]) -> Buffer:
    numel = sympy.Integer(1)
    for s in shape:
        numel = numel * _expr(s)
    return Buffer(
        node=name, op=op,
        shape=str([str(_expr(s).xreplace(rename)) for s in shape]).replace("'", ""),
        dtype=str(dtype).replace("torch.", ""),
        size=size_poly((numel * dtype_bits(dtype)).xreplace(rename) / 8),
        start=start, end=end, kind=kind,
    )


def collect_buffers(
    gm: torch.fx.GraphModule, rename: dict[Any, Any], notes: list[str]
) -> tuple[list[str], list[Buffer]]:
    """Compute order (names) and every buffer one run allocates, inputs included (``kind="input"``)."""
    order = compute_order(gm)
    position = {n: i for i, n in enumerate(order)}
    end_of_graph = len(order)
    # owner[(node, i)] -> buffer key; a key is (node that allocated, output index) or "weight"
    owner: dict[tuple[torch.fx.Node, int], Any] = {}
    made: dict[Any, dict[str, Any]] = {}

    def last_use(node: torch.fx.Node) -> int:
        uses = [end_of_graph if u.op == "output" else position.get(u, end_of_graph) for u in node.users]
        return max(uses, default=position.get(node, -1))

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner[(node, 0)] = "weight"
            continue
        if node.op == "output":
            continue
        tensors = node.meta.get("val")
        items = list(tensors) if isinstance(tensors, (tuple, list)) else [tensors]
        if node.op == "placeholder":
            sources: Sequence[torch.fx.Node | None] = [None] * len(items)
        else:
            sources = aliased_inputs(node)
        is_getitem = target_name(node.target) == "getitem" and node.op == "call_function"
        for i, val in enumerate(items):
            if not isinstance(val, torch.Tensor):
                continue
            src = sources[i] if i < len(sources) else None
            if src is not None:
                src_index = int(node.args[1]) if is_getitem else 0
                key = owner.get((src, src_index))
                if key is not None:
                    owner[(node, i)] = key
                    if key != "weight":
                        made[key]["end"] = max(made[key]["end"], last_use(node))
                    continue
            key = (node, i)
            owner[key] = key
            made[key] = {
                "val": val,
                "start": position.get(node, -1),
                "end": last_use(node),
                "kind": "input" if node.op == "placeholder" else "activation",
            }
    buffers = []
    for (node, i), info in made.items():
        val = info["val"]
        buffers.append(_buffer(
            node.name if i == 0 else f"{node.name}[{i}]",
            target_name(node.target) if node.op != "placeholder" else "input",
            list(val.shape), val.dtype, info["start"], info["end"], info["kind"], rename,
        ))
    for node in order:
        scratch = scratch_rule(node.target) if node.op == "call_function" else None
        for what, shape, dtype in scratch(node) if scratch else ():
            p = position[node]
            buffers.append(_buffer(f"{node.name}:{what}", target_name(node.target), shape, dtype, p, p, "scratch", rename))
    if any(n.op in ("call_module", "call_method") and isinstance(n.meta.get("val"), torch.Tensor) for n in order):
        notes.append("call_module/call_method nodes are counted as allocating their outputs")
    return [n.name for n in order], buffers
