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
import keyword
import logging
import os
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from graphopt.errors import CaptureError
from graphopt.ir.canonical import canonicalize
from graphopt.ir.capture_inputs import (
    DynamicSpec,
    check_dynamic,
    check_kept_static,
    dynamic_shapes,
    example_tensors,
    input_names,
    labels,
    signature_order,
)
from graphopt.ir.program import InputSpec, Program

__all__ = ["capture"]

log = logging.getLogger(__name__)

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
            prefix = f"output_{i}"
            if item is None:  # skipping it would shift every later output's position (a dict's None is skipped)
                raise CaptureError(f"model output {i} (of the {type(out).__name__} it returns) is None; graphopt "
                                   "serves tensor outputs: drop it from the return value, or return a dict "
                                   "(a None value there is left out)")
            sub_names, sub = _flatten_outputs(item)
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


@contextlib.contextmanager
def _state_kept(model: torch.nn.Module) -> Iterator[list[str]]:
    """Put back the buffers a forward updates (a step counter, running statistics): capture runs
    the model once, and neither the user's model nor the Program should start advanced. Yields the
    names of buffers the forward reassigned (``self.count = self.count + 1``), filled on exit."""
    buffers = dict(model.named_buffers())
    saved = {n: (b._version, b.detach().clone()) for n, b in buffers.items()}
    # weights a forward renormalises in place (Embedding/EmbeddingBag with max_norm; was: capture's own run
    # changed the user's weights by up to 1.15): only these, the rest is not copied (tables can be large)
    renormed = [p for m in model.modules() if getattr(m, "max_norm", None) is not None
                for p in m.parameters(recurse=False)]
    kept = [(p, p.detach().clone()) for p in renormed]
    reassigned: list[str] = []
    try:
        yield reassigned
    finally:
        with torch.no_grad():
            for p, value in kept:
                p.copy_(value)
            for n, b in buffers.items():
                owner, _, leaf = n.rpartition(".")
                module = model.get_submodule(owner)
                if getattr(module, leaf, None) is not b:
                    reassigned.append(n)
                    setattr(module, leaf, b)
                if b._version != saved[n][0]:
                    b.copy_(saved[n][1])


def _own_mutated_buffers(gm: torch.fx.GraphModule, ep: torch.export.ExportedProgram) -> None:
    """The Program gets its own copy of each buffer or weight its graph updates (a step counter;
    max_norm's in-place renormalisation, which export does not list): running it must not change
    the user's model (other weights and read-only buffers stay shared: no second copy of the tables)."""
    from graphopt.transform.state import mutated_attrs

    for fqn in set(ep.graph_signature.buffers_to_mutate.values()) | mutated_attrs(gm.graph):
        owner, _, leaf = fqn.rpartition(".")
        module = gm.get_submodule(owner)
        for table in (module._buffers, module._parameters):
            if leaf in table and table[leaf] is not None:
                own = table[leaf].detach().clone()
                table[leaf] = torch.nn.Parameter(own, requires_grad=False) if table is module._parameters else own


def _drop_input_writes(gm: torch.fx.GraphModule, ep: torch.export.ExportedProgram, label: str) -> None:
    """Take out the graph's write-back into a user input (``x.mul_(2)`` in forward): every runtime then
    computes the outputs as on a copy and leaves the caller's tensor alone (was: eager, TorchScript and
    Inductor changed the caller's tensor, ONNX Runtime did not)."""
    written = sorted(set(ep.graph_signature.user_inputs_to_mutate.values()))
    if not written:
        return
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target is torch.ops.aten.copy_.default
                and node.args[0] in placeholders and not node.users):
            gm.graph.erase_node(node)
    gm.recompile()
    warnings.warn(f"{label} modifies input(s) {', '.join(repr(n) for n in written)} in place; graphopt serves it "
                  "as if on a copy and leaves the caller's tensors unchanged: return the new value as an output "
                  "if you need it", stacklevel=3)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, label: str) -> Iterator[None]:
    """Capture with every module in eval mode, then give each its own flag back (was: only the top
    module's flag was looked at, so a Dropout or BatchNorm left training under an eval parent was
    captured in train mode; and ``model.train()`` afterwards flipped a frozen BatchNorm to train)."""
    flags = {m: m.training for m in model.modules()}
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if training:
        more = f" and {len(training) - 3} more" if len(training) > 3 else ""
        warnings.warn(f"{label} has modules in train mode ({', '.join(training[:3])}{more}); graphopt captures "
                      "the whole model in eval mode (dropout off, BatchNorm running stats): call model.eval() "
                      "first to silence this", stacklevel=4)
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DataParallel / DistributedDataParallel / torch.compile wrapper: the same
    computation, whose ``forward(*inputs)`` would hide the input names (``input_0``)."""
    seen = 0
    while seen < 8:
        inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, torch.nn.Module):
            return model
        model, seen = inner, seen + 1
    return model


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
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise CaptureError("capture takes the original nn.Module, not a TorchScript module; pass the model "
                           "before torch.jit.script/trace (graphopt lowers to TorchScript itself)")
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    model = _unwrapped(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    by_keyword = isinstance(example_inputs, Mapping)
    if by_keyword:
        names = signature_order(model, list(example_inputs.keys()))
        tensors = example_tensors(names, [example_inputs[n] for n in names])
    else:
        names = input_names(model, len(example_inputs))
        tensors = example_tensors(names, list(example_inputs))
    check_dynamic(names, tensors, dynamic)
    label = name or type(model).__name__
    with _eval_mode(model, label):
        with torch.no_grad(), _state_kept(model) as reassigned:  # state is captured as it was
            run = [t.clone() for t in tensors]  # a forward that writes into its input changes a copy
            out_names, _ = _flatten_outputs(model(**dict(zip(names, run))) if by_keyword else model(*run))
        wrapper = _make_wrapper(model, names, by_keyword)
        try:
            ep = torch.export.export(
                wrapper,
                tuple(tensors),
                dynamic_shapes=dynamic_shapes(names, tensors, dynamic),
                strict=False,
            )
            ep = ep.run_decompositions({})
        except Exception as e:  # torch raises many unrelated types here
            if os.environ.get("GRAPHOPT_DEBUG"):
                raise
            raise CaptureError(
                f"torch.export could not capture {label}: "
                f"{_summarize(e)}; {_hint(e)}"
            ) from e
    gm = ep.module()
    _own_mutated_buffers(gm, ep)
    _drop_input_writes(gm, ep, label)
    dropped = [n for n in reassigned if f"model.{n}" not in ep.graph_signature.buffers_to_mutate.values()]
    if dropped:
        warnings.warn(f"{label} reassigns buffer(s) {', '.join(dropped)} in forward; "
                      "torch.export keeps no such update, so the Program does not carry that state from one "
                      "call to the next: update the buffer in place (self.count.add_(1)) to keep it",
                      stacklevel=2)
    canonicalize(gm)  # addmm projections -> linear; layout-dependent views copy first
    dims = labels(names, gm, dynamic)
    check_kept_static(names, tensors, dynamic, dims)
    ranges = dict(input_ranges or {})
    specs = []
    for n, t in zip(names, tensors):
        low, high = ranges.get(n, (None, None))
        if low is None and not t.is_floating_point() and t.dtype != torch.bool and t.numel():
            low, high = int(t.min()), int(t.max()) + 1
        specs.append(InputSpec(n, t.dtype, tuple(t.shape), dims[n], low, high))
    return Program(
        gm,
        specs,
        out_names,
        name=name or type(model).__name__,
        example_inputs=tuple(tensors),
        meta=meta,
    )
