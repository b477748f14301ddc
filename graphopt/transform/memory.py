"""Memory analysis: what a Program holds (weights) and what one run allocates
(activations), symbolic in its dynamic dims.

Weights: every tensor a ``get_attr`` reads, once (tied weights count once),
by kind (``embedding``: the table of an embedding lookup, its quantized codes
and row scales included; ``dense``: any other tensor of rank >= 2; ``other``:
biases, norms, index buffers), role (parameter, buffer, constant) and dtype.

Activations: one eager run of the GraphModule, modelled from ``meta["val"]``
by liveness over the compute nodes in graph order (the order torch.fx's
generated code runs them, freeing each value after its last use). A node
allocates its output(s), except a view or an in-place op (the op's schema says
its result aliases an input; a reshape that must copy is told apart by
rerunning it on fake tensors), which extends the life of the buffer it
aliases. A buffer lives from its node to the last use of anything aliasing it;
the Program's outputs live to the end; a value nobody uses is freed at once.
Inputs are the caller's (counted apart), weights are weights; what is computed
from weights at run time (a dequantized int8 weight) is an activation. Scratch
that known kernels allocate inside (SDPA's float mask and blocks, the Python
quantize/dequantize kernels' temporaries: :mod:`graphopt.transform.kernel_scratch`)
is live while its node runs. The peak is the largest sum of live buffers at
any node, while it runs (its inputs, its scratch and its output all alive).

Sizes are polynomials in the symbols of the dynamic dims, renamed after the
inputs' labels (``batch``, ``seq``); the peak is the ``Max`` of the live sums
no other live sum dominates for every positive size, and :meth:`MemoryAnalysis.at`
evaluates it (and the largest tensors live there) at given sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy

from graphopt.errors import PreconditionError
from graphopt.transform.liveness import (
    Buffer,
    Poly,
    WeightInfo,
    collect_buffers,
    collect_weights,
    dtype_bits,
    label_symbols,
)

__all__ = [
    "MemoryAnalysis",
    "MemoryEstimate",
    "WeightInfo",
    "analyze_memory",
    "dtype_bits",
    "parse_bytes",
    "format_bytes",
]

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"2GB"`` -> 2e9, ``"1.5GiB"`` -> 1.5 * 2**30, ``"512MB"``, ``"4096"`` (bytes).
    SI units are powers of 1000, IEC units (KiB, MiB, GiB) of 1024. Raises ValueError."""
    s = text.strip().lower().replace(" ", "")
    i = len(s)
    while i and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    if unit not in _UNITS or not number:
        raise ValueError(f"{text!r} is not a size like 2GB, 512MB, 1.5GiB or 4096")
    value = float(number) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (powers of 1024, the unit RSS is read in)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------ polynomials
def _add(acc: Poly, poly: Poly, sign: int = 1) -> None:
    for term, coeff in poly.items():
        value = acc.get(term, 0) + sign * coeff
        if value:
            acc[term] = value
        else:
            acc.pop(term, None)


def _dominates(a: Poly, b: Poly) -> bool:
    """a >= b for every positive size (coefficient-wise: every monomial is positive)."""
    return all(a.get(t, 0) >= c for t, c in b.items()) and all(c >= 0 for t, c in a.items() if t not in b)


def _to_expr(poly: Poly) -> Any:
    return sympy.Add(*(c * t for t, c in poly.items())) if poly else sympy.Integer(0)


def _value(poly: Poly, values: Mapping[Any, int], cache: dict[Any, int]) -> int:
    total = 0
    for term, coeff in poly.items():
        if term not in cache:
            cache[term] = int(sympy.sympify(term).xreplace(values))
        total += coeff * cache[term]
    return int(total)


# ------------------------------------------------------------------ records
@dataclass
class MemoryEstimate:
    """The analysis evaluated at one set of sizes (bytes)."""

    sizes: dict[str, int]
    weights: int
    activations: int
    inputs: int
    outputs: int
    peak_node: str
    peak_op: str
    largest: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """What the model adds to the caller's memory: weights + activation peak."""
        return self.weights + self.activations

    def to_json(self) -> dict[str, Any]:
        return {
            "sizes": dict(self.sizes), "weight_bytes": self.weights, "activation_peak_bytes": self.activations,
            "input_bytes": self.inputs, "output_bytes": self.outputs, "total_bytes": self.total,
            "peak_at": {"node": self.peak_node, "op": self.peak_op}, "largest_live": self.largest,
        }


@dataclass
class MemoryAnalysis:
    """Weights and the activation-peak model of one Program (see the module doc)."""

    program: str
    weights: list[WeightInfo]
    order: list[str]  # compute nodes, graph order
    buffers: list[Buffer]
    symbols: dict[str, Any]  # label -> sympy Symbol
    defaults: dict[str, int]  # label -> example size
    others: dict[Any, int]  # unlabelled size symbol -> the value used for it
    candidates: list[tuple[int, Poly]]  # (position, live bytes) not dominated by another position
    notes: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- weights
    @property
    def weight_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    def weights_by_kind(self) -> list[dict[str, Any]]:
        """Rows ``{kind, dtype, tensors, bytes}``, largest first."""
        groups: dict[tuple[str, str], list[int]] = {}
        for w in self.weights:
            g = groups.setdefault((w.kind, w.dtype), [0, 0])
            g[0] += 1
            g[1] += w.bytes
        rows = [{"kind": k, "dtype": d, "tensors": n, "bytes": b} for (k, d), (n, b) in groups.items()]
        return sorted(rows, key=lambda r: -r["bytes"])

    # ---------------------------------------------------------------- sizes
    @property
    def labels(self) -> list[str]:
        return list(self.symbols)

    def resolve(self, sizes: Mapping[str, int | None] | None = None) -> dict[str, int]:
        """Label -> size: the given ones (``None`` = not given), the example sizes for the rest."""
        given = {k: v for k, v in (sizes or {}).items() if v is not None}
        return {label: int(given.get(label, self.defaults[label])) for label in self.symbols}

    def _values(self, sizes: Mapping[str, int]) -> dict[Any, int]:
        values = {self.symbols[k]: v for k, v in sizes.items() if k in self.symbols}
        values.update(self.others)
        return values

    @property
    def peak_expr(self) -> Any:
        """The activation peak (bytes) as a sympy expression in the labels."""
        exprs = [_to_expr(p) for _, p in self.candidates]
        return sympy.Max(*exprs) if len(exprs) > 1 else (exprs[0] if exprs else sympy.Integer(0))

    def expr_of(self, kind: str) -> Any:
        """Bytes of every ``kind`` buffer (``input``, or ``output``) as an expression."""
        acc: Poly = {}
        last = len(self.order)
        for b in self.buffers:
            if (kind == "input" and b.kind == "input") or (kind == "output" and b.kind != "input" and b.end >= last):
                _add(acc, b.size)
        return _to_expr(acc)

    # ---------------------------------------------------------------- evaluation
    def live_profile(self, sizes: Mapping[str, int | None] | None = None) -> tuple[list[int], list[int]]:
        """(activation bytes live at each compute position, input bytes live there)."""
        values, cache = self._values(self.resolve(sizes)), {}
        n = len(self.order)
        acts, ins = [0] * (n + 1), [0] * (n + 1)
        for b in self.buffers:
            size = _value(b.size, values, cache)
            target = ins if b.kind == "input" else acts
            lo, hi = max(b.start, 0), min(b.end, n - 1)
            if lo <= hi:
                target[lo] += size
                target[hi + 1] -= size
        for arr in (acts, ins):
            for i in range(1, n + 1):
                arr[i] += arr[i - 1]
        return acts[:n], ins[:n]

    def bytes_by_node(self, sizes: Mapping[str, int | None] | None = None) -> dict[str, int]:
        """Node -> bytes the model says it allocates (its outputs and its kernel scratch)."""
        values, cache = self._values(self.resolve(sizes)), {}
        out: dict[str, int] = {}
        for b in self.buffers:
            if b.kind != "input":
                node = b.node.split(":")[0].split("[")[0]
                out[node] = out.get(node, 0) + _value(b.size, values, cache)
        return out

    def at(self, batch: int | None = None, seq: int | None = None, **sizes: int | None) -> MemoryEstimate:
        """The estimate at ``batch``/``seq`` (and other labels); example sizes for what is not given."""
        resolved = self.resolve({"batch": batch, "seq": seq, **sizes})
        values, cache = self._values(resolved), {}
        best, where = -1, 0
        for position, poly in self.candidates:
            value = _value(poly, values, cache)
            if value > best:
                best, where = value, position
        n = len(self.order)
        live = [b for b in self.buffers if b.kind != "input" and b.start <= where <= b.end]
        sized = ((_value(b.size, values, cache), b) for b in live)
        largest = sorted((x for x in sized if x[0] > 0), key=lambda x: -x[0])[:5]
        node = self.order[where] if self.order else ""
        op = next((b.op for b in self.buffers if b.node == node), "")
        return MemoryEstimate(
            sizes=resolved,
            weights=self.weight_bytes,
            activations=max(best, 0),
            inputs=sum(_value(b.size, values, cache) for b in self.buffers if b.kind == "input"),
            outputs=sum(_value(b.size, values, cache) for b in self.buffers if b.kind != "input" and b.end >= n),
            peak_node=node,
            peak_op=op,
            largest=[{"node": b.node, "op": b.op, "shape": b.shape, "dtype": b.dtype, "bytes": v} for v, b in largest],
        )

    def to_json(self, shapes: list[dict[str, int | None]] | None = None) -> dict[str, Any]:
        return {
            "program": self.program,
            "weights": {"total_bytes": self.weight_bytes, "by_kind": self.weights_by_kind(),
                        "tensors": [w.__dict__ | {"shape": list(w.shape)} for w in self.weights]},
            "labels": {k: {"example": self.defaults[k]} for k in self.symbols},
            "activation_peak_bytes": str(self.peak_expr),
            "input_bytes": str(self.expr_of("input")),
            "estimates": [self.at(**s).to_json() for s in (shapes or [{}])],
            "notes": list(self.notes),
        }


def analyze_memory(program: Any) -> MemoryAnalysis:
    """Build the :class:`MemoryAnalysis` of ``program`` from its ``meta["val"]``."""
    gm = program.gm
    symbols, defaults, rename, others, notes = label_symbols(program)
    weights = collect_weights(gm)
    order, buffers = collect_buffers(gm, rename, notes)
    candidates = _pareto_peaks(len(order), buffers)
    if not order:
        raise PreconditionError(f"{program.name}: the graph has no compute nodes to analyse")
    return MemoryAnalysis(program.name, weights, order, buffers, symbols, defaults, others, candidates, notes)


def _pareto_peaks(n: int, buffers: list[Buffer]) -> list[tuple[int, Poly]]:
    """Live activation bytes at each position, keeping those no other one dominates."""
    starts: dict[int, list[Buffer]] = {}
    ends: dict[int, list[Buffer]] = {}
    for b in buffers:
        if b.kind == "input":
            continue
        starts.setdefault(b.start, []).append(b)
        ends.setdefault(b.end, []).append(b)
    live: Poly = {}
    kept: list[tuple[int, Poly]] = []
    for p in range(n):
        for b in starts.get(p, ()):
            _add(live, b.size)
        if not any(_dominates(k, live) for _, k in kept):
            kept = [(q, k) for q, k in kept if not _dominates(live, k)]
            kept.append((p, dict(live)))
        for b in ends.get(p, ()):
            _add(live, b.size, -1)
    return kept
