"""Model -> Program with ``torch.export`` (non-strict), at the
``run_decompositions({})`` level where linear, SDPA, layer_norm, gelu and
embedding stay single nodes, then canonicalized (:mod:`graphopt.ir.canonical`):
``addmm`` projections (Hugging Face ``Conv1D``) become ``linear``, and views
that hold only for one kernel's output layout (a ``reshape`` after SDPA's
transposed CPU output) copy first, so every later re-trace and decomposition
(ONNX export, Inductor) accepts the graph.

Hugging Face models that return a ``ModelOutput`` are wrapped so the Program
returns a flat tuple of tensors whose names are recorded.
"""

from __future__ import annotations

import contextlib
import inspect
import keyword
import logging
import os
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from graphopt.errors import CaptureError
from graphopt.ir.canonical import canonicalize
from graphopt.ir.program import InputSpec, Program

__all__ = ["capture"]

log = logging.getLogger(__name__)

DynamicSpec = bool | Mapping[str, Mapping[int, str]]


def _flatten_outputs(out: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a model's output, in a stable order."""
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if (hasattr(out, "to_tuple") and hasattr(out, "keys")) or isinstance(out, Mapping):  # dict, ModelOutput
        names, tensors = [], []
        for key in out.keys():
            value = out[key]
            if not isinstance(value, (torch.Tensor, Mapping, tuple, list)) and not hasattr(value, "to_tuple"):
                continue  # None, a cache object: not an output
            sub_names, sub = _flatten_outputs(value)
            names += [str(key) if n == "output" else f"{key}.{n.removeprefix('output_')}" for n in sub_names]
            tensors += sub
        return names, tensors
    if isinstance(out, (tuple, list)):
        names, tensors = [], []
        for i, item in enumerate(out):
            sub_names, sub = _flatten_outputs(item)
            prefix = f"output_{i}"
            names += [prefix if n == "output" else f"{prefix}.{n}" for n in sub_names]
            tensors += sub
        return names, tensors
    raise CaptureError(
        f"model returned {type(out).__name__}; return tensors, tuples, dicts or a ModelOutput"
    )


def _make_wrapper(model: torch.nn.Module, names: Sequence[str], by_keyword: bool) -> torch.nn.Module:
    """An nn.Module whose forward takes the named inputs positionally and
    returns a flat tuple of tensors (placeholders then carry the input names)."""
    for n in names:
        if not n.isidentifier() or keyword.iskeyword(n):
            raise CaptureError(f"input name {n!r} is not a Python identifier; rename it")
    params = ", ".join(names)
    call = ", ".join(f"{n}={n}" for n in names) if by_keyword else params
    src = f"def forward(self, {params}):\n    return self._flatten(self.model({call}))\n"
    scope: dict[str, Any] = {}
    exec(src, scope)  # noqa: S102 - generated from validated identifiers only

    class _Captured(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        @staticmethod
        def _flatten(out: Any) -> tuple[torch.Tensor, ...]:
            return tuple(_flatten_outputs(out)[1])

    _Captured.forward = scope["forward"]  # type: ignore[method-assign]
    return _Captured()


def _input_names(model: torch.nn.Module, n: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) >= n:
        return positional[:n]
    return [f"input_{i}" for i in range(n)]


def _summarize(e: BaseException) -> str:
    """One line from a torch.export failure: the headline plus the user frame."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    headline = lines[0] if lines else type(e).__name__
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    user_frame = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if not frame.filename.startswith((torch_dir, here)) and "site-packages/torch" not in frame.filename:
            user_frame = f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.line or frame.name})"
    if len(headline) > 240:
        headline = headline[:237] + "..."
    where = f" at {user_frame}" if user_frame else ""
    return f"{type(e).__name__}: {headline}{where}"


def _hint(e: BaseException) -> str:
    text = str(e)
    if "data-dependent" in text or "GuardOnDataDependent" in type(e).__name__:
        return "the model branches on tensor values; replace the branch with torch.where/torch.cond"
    if "Constraints violated" in text or "specialized" in text or "ConstraintViolation" in type(e).__name__:
        return "a dim marked dynamic was specialized; capture with dynamic=False or a narrower dynamic map"
    if "Unsupported" in type(e).__name__ or "not supported" in text:
        return "rewrite the unsupported construct or capture a submodule without it"
    return "run with --debug for torch's full trace"


def _dynamic_shapes(
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


def _labels(
    names: Sequence[str], gm: torch.fx.GraphModule, dynamic: DynamicSpec
) -> dict[str, dict[int, str]]:
    """Which dims really came out symbolic, with their labels: the caller's where named. Else a
    leading dim is "batch" where its example size is the one most inputs lead with (export may keep
    a mask's batch apart from its ids'; the contract holds them equal), and any other dim shares
    a label with the dims export gave its symbol: EmbeddingBag's flat ids and offsets lead with
    different sizes and so get two labels, not one "batch" that refuses every real request."""
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
    label_of: dict[str, str] = {}
    out: dict[str, dict[int, str]] = {name: {} for name in symbols}
    # leading dims first (a stable sort keeps input order): their labels carry over to the same symbol elsewhere
    for name, d, node in sorted(((n, d, node) for n, dims in symbols.items() for d, node in dims.items()),
                                key=lambda item: item[1] != 0):
        if d in named[name]:
            out[name][d] = named[name][d]
        else:
            own = "batch" if d == 0 and node.hint == batch and name not in flat else f"{name}_dim{d}"
            out[name][d] = label_of.setdefault(str(node.expr), own)
    return {name: dict(sorted(dims.items())) for name, dims in out.items()}


def _check_dynamic(names: Sequence[str], tensors: Sequence[torch.Tensor], dynamic: DynamicSpec) -> None:
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


def _check_kept_static(names: Sequence[str], tensors: Sequence[torch.Tensor], dynamic: DynamicSpec,
                       labels: Mapping[str, Mapping[int, str]]) -> None:
    """A dim the caller named dynamic that export kept static: an error where the example's size of
    0 or 1 is the reason (torch.export specializes those), else a warning naming the size it keeps."""
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


@contextlib.contextmanager
def _state_kept(model: torch.nn.Module) -> Iterator[list[str]]:
    """Put back the buffers a forward updates (a step counter, running statistics): capture runs
    the model once, and neither the user's model nor the Program should start advanced. Yields the
    names of buffers the forward reassigned (``self.count = self.count + 1``), filled on exit."""
    buffers = dict(model.named_buffers())
    saved = {n: (b._version, b.detach().clone()) for n, b in buffers.items()}
    reassigned: list[str] = []
    try:
        yield reassigned
    finally:
        with torch.no_grad():
            for n, b in buffers.items():
                owner, _, leaf = n.rpartition(".")
                module = model.get_submodule(owner)
                if getattr(module, leaf, None) is not b:
                    reassigned.append(n)
                    setattr(module, leaf, b)
                if b._version != saved[n][0]:
                    b.copy_(saved[n][1])


def _own_mutated_buffers(gm: torch.nn.Module, ep: torch.export.ExportedProgram) -> None:
    """The Program gets its own copy of each buffer its graph updates: running it must not advance
    the user's model (weights and read-only buffers stay shared: no second copy of the tables)."""
    for fqn in set(ep.graph_signature.buffers_to_mutate.values()):
        owner, _, leaf = fqn.rpartition(".")
        module = gm.get_submodule(owner)
        if leaf in module._buffers and module._buffers[leaf] is not None:
            module._buffers[leaf] = module._buffers[leaf].detach().clone()


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    dynamic: DynamicSpec = True,
    name: str | None = None,
    input_ranges: Mapping[str, tuple[int, int]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Program:
    """Capture ``model`` into a :class:`Program`.

    ``example_inputs`` is a tensor, a tuple (positional) or a dict (keyword).
    ``dynamic=True`` lets every dim vary where torch.export can keep it
    symbolic; a mapping ``{input: {dim: label}}`` names the dynamic dims
    (``{"input_ids": {0: "batch", 1: "seq"}}``); ``False`` captures static
    shapes. ``input_ranges`` bounds random integer inputs (``[low, high)``).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    by_keyword = isinstance(example_inputs, Mapping)
    if by_keyword:
        names = list(example_inputs.keys())
        tensors = list(example_inputs.values())
    else:
        tensors = list(example_inputs)
        names = _input_names(model, len(tensors))
    for n, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise CaptureError(
                f"input '{n}' is {type(t).__name__}; graphopt captures tensor inputs only"
            )
    _check_dynamic(names, tensors, dynamic)
    was_training = model.training
    if was_training:
        warnings.warn(
            "model is in train mode; graphopt captures it in eval mode (dropout off, BN frozen)",
            stacklevel=2,
        )
        model.eval()
    try:
        with torch.no_grad(), _state_kept(model) as reassigned:  # state is captured as it was
            out_names, _ = _flatten_outputs(model(**dict(zip(names, tensors))) if by_keyword else model(*tensors))
        wrapper = _make_wrapper(model, names, by_keyword)
        try:
            ep = torch.export.export(
                wrapper,
                tuple(tensors),
                dynamic_shapes=_dynamic_shapes(names, tensors, dynamic),
                strict=False,
            )
            ep = ep.run_decompositions({})
        except Exception as e:  # torch raises many unrelated types here
            if os.environ.get("GRAPHOPT_DEBUG"):
                raise
            raise CaptureError(
                f"torch.export could not capture {name or type(model).__name__}: "
                f"{_summarize(e)}; {_hint(e)}"
            ) from e
    finally:
        if was_training:
            model.train()
    gm = ep.module()
    _own_mutated_buffers(gm, ep)
    dropped = [n for n in reassigned if f"model.{n}" not in ep.graph_signature.buffers_to_mutate.values()]
    if dropped:
        warnings.warn(f"{name or type(model).__name__} reassigns buffer(s) {', '.join(dropped)} in forward; "
                      "torch.export keeps no such update, so the Program does not carry that state from one "
                      "call to the next: update the buffer in place (self.count.add_(1)) to keep it",
                      stacklevel=2)
    canonicalize(gm)  # addmm projections -> linear; layout-dependent views copy first
    labels = _labels(names, gm, dynamic)
    _check_kept_static(names, tensors, dynamic, labels)
    ranges = dict(input_ranges or {})
    specs = []
    for n, t in zip(names, tensors):
        low, high = ranges.get(n, (None, None))
        if low is None and not t.is_floating_point() and t.dtype != torch.bool and t.numel():
            low, high = int(t.min()), int(t.max()) + 1
        specs.append(InputSpec(n, t.dtype, tuple(t.shape), labels[n], low, high))
    return Program(
        gm,
        specs,
        out_names,
        name=name or type(model).__name__,
        example_inputs=tuple(t.detach().clone() for t in tensors),
        meta=meta,
    )
