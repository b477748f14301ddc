"""Capture's inputs: names and order, the example tensors export traces with, which dims come out
dynamic and their labels (the Program's input contract), and the checks on a ``dynamic`` spec."""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from graphopt.errors import CaptureError

DynamicSpec = bool | Mapping[str, Mapping[int, str]]


def _forward_params(model: torch.nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def input_names(model: torch.nn.Module, n: int) -> list[str]:
    """Names of ``n`` positional inputs: forward's parameter names where it has that many."""
    positional = [p.name for p in _forward_params(model) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= n:
        return positional[:n]
    return [f"input_{i}" for i in range(n)]


def signature_order(model: torch.nn.Module, keys: Sequence[str]) -> list[str]:
    """A keyword example's names in forward's own order where forward names every key (was: the
    dict's order, so ``capture(m, {"mask": ..., "ids": ...})`` for ``forward(ids, mask)`` made a
    positional call in the model's order feed the mask as ids)."""
    order = [p.name for p in _forward_params(model) if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if all(k in order for k in keys):
        return sorted(keys, key=order.index)
    return list(keys)


def _not_a_tensor(name: str, value: Any) -> str:
    kind = type(value).__name__
    if value is None:
        step = (f"give the example as a dict of its tensor inputs by name, without '{name}', so forward's "
                "default applies")
    elif isinstance(value, (tuple, list, Mapping)):
        step = (f"pass each tensor in it as an input of its own (a wrapper nn.Module whose forward takes them "
                f"can rebuild the {kind} for the model)")
    else:
        step = (f"fix it outside the graph with a wrapper nn.Module (forward(self, ...): return "
                f"model(..., {name}={value!r})) or functools.partial, and pass only tensors")
    return f"input '{name}' is {kind}; graphopt captures tensor inputs only: {step}"


def example_tensors(names: Sequence[str], values: Sequence[Any]) -> list[torch.Tensor]:
    """The example as contiguous copies, detached from the caller's tensors. torch.export records an
    example's strides and AOTInductor compiles for that layout, while runners hand it contiguous
    tensors (was: a transposed example made the Inductor artifact compute wrong scores); a copy also
    keeps capture's own run of a forward that writes into its input off the caller's tensor."""
    for n, t in zip(names, values):
        if not isinstance(t, torch.Tensor):
            raise CaptureError(_not_a_tensor(n, t))
    return [t.detach().clone(memory_format=torch.contiguous_format) for t in values]


def dynamic_shapes(
    names: Sequence[str], tensors: Sequence[torch.Tensor], dynamic: DynamicSpec
) -> tuple[dict[int, Any] | None, ...]:
    out = []
    for name, t in zip(names, tensors):
        if dynamic is True:
            dims = dict.fromkeys(range(t.dim()), torch.export.Dim.AUTO)
        elif dynamic is False:
            dims = {}
        else:
            dims = dict.fromkeys(dynamic.get(name, {}), torch.export.Dim.AUTO)
        out.append(dims or None)
    return tuple(out)


_BAG_OPS = ("aten.embedding_bag.", "aten._embedding_bag.", "aten._embedding_bag_forward_only.")


def _flat_bag_inputs(gm: torch.fx.GraphModule, input_name: Mapping[torch.fx.Node, str]) -> set[str]:
    """Inputs an EmbeddingBag reads as flat ids or per-sample weights (with offsets): their length is
    the number of ids in the batch, never the batch, even where an example holds one id per bag."""
    flat: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith(_BAG_OPS):
            continue
        args = list(node.args)
        if len(args) < 3 or args[2] is None:  # 2-D ids, no offsets: they lead with the batch
            continue
        weights = node.kwargs.get("per_sample_weights", args[6] if len(args) > 6 else None)
        for arg in (args[1], weights):
            if arg in input_name:
                flat.add(input_name[arg])
    return flat


def _side_by_side(gm: torch.fx.GraphModule) -> set[frozenset[str]]:
    """Pairs of size symbols that stand as two dims of one tensor in the graph (a (users, items)
    score matrix): two extents the model keeps apart, whatever sizes an example gave them."""
    pairs: set[frozenset[str]] = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        syms = {str(s.node.expr) for s in val.shape if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol}
        pairs.update(frozenset(p) for p in itertools.combinations(sorted(syms), 2))
    return pairs


def labels(
    names: Sequence[str], gm: torch.fx.GraphModule, dynamic: DynamicSpec
) -> dict[str, dict[int, str]]:
    """Which dims really came out symbolic, with their labels: the caller's where named. Else a
    leading dim is "batch" where its example size is the one most inputs lead with (export may keep
    a mask's batch apart from its ids'; the contract holds them equal), unless the graph holds its
    symbol apart from the batch's (both dims of one tensor: was labelled "batch" when an example's
    users and items counts happened to be equal, and every request with other counts was refused).
    Any other dim shares a label with the dims export gave its symbol: EmbeddingBag's flat ids and
    offsets lead with different sizes and so get two labels, not one "batch"."""
    symbols: dict[str, dict[int, Any]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for name, ph in zip(names, placeholders):
        val = ph.meta.get("val")
        symbols[name] = {d: size.node for d, size in enumerate(val.shape)
                         if isinstance(size, torch.SymInt) and not isinstance(size.node.maybe_as_int(), int)
                         } if isinstance(val, torch.Tensor) else {}
    named = {name: dict(dynamic.get(name, {})) if isinstance(dynamic, Mapping) else {} for name in symbols}
    flat = _flat_bag_inputs(gm, dict(zip(placeholders, names)))
    leading = Counter(dims[0].hint for name, dims in symbols.items()
                      if 0 in dims and 0 not in named[name] and name not in flat)
    batch = leading.most_common(1)[0][0] if leading else None
    apart = _side_by_side(gm)
    batch_symbols: list[str] = []
    label_of: dict[str, str] = {}
    out: dict[str, dict[int, str]] = {name: {} for name in symbols}
    # leading dims first (a stable sort keeps input order): their labels carry over to the same symbol elsewhere
    for name, d, node in sorted(((n, d, node) for n, dims in symbols.items() for d, node in dims.items()),
                                key=lambda item: item[1] != 0):
        key = str(node.expr)
        if d in named[name]:
            out[name][d] = named[name][d]
        elif key in label_of:
            out[name][d] = label_of[key]
        else:
            if (d == 0 and node.hint == batch and name not in flat
                    and not any(frozenset((key, b)) in apart for b in batch_symbols)):
                batch_symbols.append(key)
                label_of[key] = "batch"
            else:
                label_of[key] = f"{name}_dim{d}"
            out[name][d] = label_of[key]
    return {name: dict(sorted(dims.items())) for name, dims in out.items()}


def check_dynamic(names: Sequence[str], tensors: Sequence[torch.Tensor], dynamic: DynamicSpec) -> None:
    """A ``dynamic`` mapping names only inputs and dims the model has (was: silently ignored)."""
    if not isinstance(dynamic, Mapping):
        return
    for name, dims in dynamic.items():
        if name not in names:
            raise CaptureError(f"dynamic names input '{name}', but the model's inputs are {list(names)}")
        rank = tensors[list(names).index(name)].dim()
        bad = [d for d in dims if not isinstance(d, int) or not 0 <= d < rank]
        if bad:
            raise CaptureError(f"dynamic names dim {bad[0]!r} of input '{name}', which has {rank} dims "
                               f"(0 to {rank - 1})")


def check_kept_static(names: Sequence[str], tensors: Sequence[torch.Tensor], dynamic: DynamicSpec,
                      labels: Mapping[str, Mapping[int, str]]) -> None:
    """A dim the caller asked dynamic that export kept static. With a mapping: an error where the
    example's size of 0 or 1 is the reason (torch.export specializes those), else a warning naming the
    size it keeps. With ``dynamic=True``: a warning for each size-0/1 dim (was: silent, and refused at
    serving time with "capture with that dim dynamic", which the caller had done)."""
    if dynamic is True:
        fixed = [f"'{name}' dim {d} (size {t.shape[d]})" for name, t in zip(names, tensors)
                 for d in range(t.dim()) if d not in labels[name] and t.shape[d] <= 1]
        if fixed:
            warnings.warn(f"input {', '.join(fixed[:4])}{' and more' if len(fixed) > 4 else ''} stays fixed: "
                          "torch.export captures a size of 0 or 1 in the example as a constant; to let it vary, "
                          "capture with an example of size >= 2 there", stacklevel=3)
    if not isinstance(dynamic, Mapping):
        return
    for name, t in zip(names, tensors):
        for d, label in dynamic.get(name, {}).items():
            if d in labels[name]:
                continue
            if t.shape[d] <= 1:
                raise CaptureError(f"input '{name}' dim {d} ({label}) has size {t.shape[d]} in the example, which "
                                   "torch.export captures as a constant; capture with an example of size >= 2 there")
            warnings.warn(f"torch.export kept input '{name}' dim {d} ({label}) static at {t.shape[d]}: the model "
                          "fixes that size; requests must have it", stacklevel=3)
