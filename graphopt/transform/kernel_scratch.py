"""Scratch known kernels allocate and free while they run: memory that is in
no graph value but counts towards the peak of an eager CPU run.

Each rule maps a node to ``[(what, shape, dtype)]`` allocated while that node
runs, sizes as sympy expressions in the graph's size symbols. The rules were
read from the kernels' sources and checked allocation by allocation with the
torch profiler (``benchmarks/bench_memory.py``, torch 2.13 CPU):

- ``scaled_dot_product_attention``: a boolean mask becomes a float mask of its
  (broadcast) shape; the flash kernel's logsumexp; its per-thread blocks.
- ``_native_batch_norm_legit_no_training``: saved mean/invstd (the fake kernel
  says empty, the CPU kernel allocates one value per channel each).
- ``quantized_decomposed`` quantize/dequantize: Python kernels whose float
  temporaries overlap.

Not modelled: oneDNN's own scratch in bf16/fp16 matmuls (0.1-0.2 MiB per
call), MKL packing, allocator caching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx

__all__ = ["scratch_rule", "Scratch"]

aten = torch.ops.aten

#: (what, shape, dtype) of one temporary allocation inside a kernel
Scratch = tuple[str, Sequence[Any], torch.dtype]


def _expr(size: Any) -> Any:
    if isinstance(size, sympy.Basic):
        return size
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _strided_last(val: torch.Tensor) -> bool:
    """A last dim of more than one element whose stride is not 1 (T5's position bias
    arrives heads-innermost: (batch, heads, q, k) with strides (.., 1, .., heads))."""
    size, stride = val.shape[-1], val.stride()[-1]
    return isinstance(stride, int) and stride not in (0, 1) and not (isinstance(size, int) and size == 1)


def _sdpa_scratch(node: torch.fx.Node) -> list[Scratch]:
    """What CPU SDPA allocates and frees inside: a boolean mask converted to a
    float mask of the query's dtype (its broadcast shape, materialized), a
    float mask whose last dim is strided copied contiguous (its shape), the
    logsumexp (batch, heads, seq) its flash kernel returns and drops, and the
    kernel's per-thread blocks (sized at the example seq and this process's
    torch threads: small, bounded by the split sizes)."""
    query = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(query, torch.Tensor):
        return []
    out: list[Scratch] = [("logsumexp", list(query.shape[:-1]), torch.float32)]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    mask_val = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
    if isinstance(mask_val, torch.Tensor) and mask_val.dtype == torch.bool:
        out.append(("float mask", list(mask_val.shape), query.dtype))
    elif isinstance(mask_val, torch.Tensor) and _strided_last(mask_val):
        out.append(("mask made contiguous", list(mask_val.shape), mask_val.dtype))
    key = node.args[1].meta.get("val") if isinstance(node.args[1], torch.fx.Node) else None
    if isinstance(key, torch.Tensor) and query.dim() >= 2 and key.dim() >= 2:
        # per-thread blocks of the CPU flash kernel: scores (q_split x kv_split),
        # row max and sum, and an output block (q_split x head_dim), in float32
        q, kv, head = _expr(query.shape[-2]), _expr(key.shape[-2]), _expr(query.shape[-1])
        q_split = sympy.Min(q, sympy.Piecewise((256, q >= 768), (64, q >= 192), (32, True)))
        kv_split = sympy.Min(kv, 512)
        per_thread = q_split * kv_split + 2 * q_split + q_split * head
        if query.dtype != torch.float32:  # reduced-precision copies of the score block
            per_thread += q_split * kv_split * query.dtype.itemsize / 4
        out.append(("flash blocks", [torch.get_num_threads() * per_thread], torch.float32))
    return out


def _batch_norm_scratch(node: torch.fx.Node) -> list[Scratch]:
    """Eval batch norm: the fake kernel says its saved mean/invstd are empty,
    the CPU kernel allocates both, one value per channel."""
    x, saved = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not isinstance(saved, (tuple, list)) or len(saved) < 3:
        return []
    if any(isinstance(t, torch.Tensor) and t.numel() != 0 for t in saved[1:3]):
        return []  # counted as outputs already
    return [("saved mean/invstd", [2 * _expr(x.shape[1])], x.dtype)]


def _numel(val: torch.Tensor) -> Any:
    numel = sympy.Integer(1)
    for size in val.shape:
        numel = numel * _expr(size)
    return numel


def _qdq_scratch(node: torch.fx.Node) -> list[Scratch]:
    """The Python kernels of ``quantized_decomposed`` (torch/ao/quantization/fx/_decomposed.py)
    run as several eager ops whose float temporaries overlap; bytes per element
    at their peak inside, counting the CPU TensorIterator's cast copies of mixed-dtype inputs:
    quantize (x*s, round, +zp, clamp, .to): two float32 temporaries, 8 (12 from a
    16-bit input, which is first cast to float32); dequantize per tensor
    (.to(float32), -zp, *s): two, 8; dequantize per channel (int8 - int64 zero
    points, then * float scales): 16 (8 without zero points)."""
    out = node.meta.get("val")
    x = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(out, torch.Tensor):
        return []
    name = str(node.target)
    n = _numel(out)
    if ".quantize_per_tensor" in name:
        per = 8 + (4 if isinstance(x, torch.Tensor) and x.dtype != torch.float32 else 0)
    elif ".dequantize_per_tensor" in name:
        per = 8
    elif ".dequantize_per_channel" in name:
        per = 8 if (len(node.args) > 2 and node.args[2] is None) else 16
    else:
        return []
    extra = per * n - n * out.dtype.itemsize
    return [("python-kernel temporaries", [extra], torch.uint8)]


def _python_kernel_ops() -> dict[Any, Any]:
    ops = getattr(torch.ops, "quantized_decomposed", None)
    table = {}
    for name in ("quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel"):
        packet = getattr(ops, name, None) if ops is not None else None
        for overload in ("default", "tensor", "tensor2"):
            op = getattr(packet, overload, None) if packet is not None else None
            if op is not None:
                table[op] = _qdq_scratch
    return table


#: scratch known kernels allocate and free while they run (not in the graph)
_KERNEL_SCRATCH = {
    aten.scaled_dot_product_attention.default: _sdpa_scratch,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_scratch,
}


def scratch_rule(target: Any) -> Callable[[torch.fx.Node], list[Scratch]] | None:
    """The scratch rule of an op, or None."""
    if target in _KERNEL_SCRATCH:
        return _KERNEL_SCRATCH[target]
    if "quantized_decomposed" in str(target):  # registered once torch.ao's quantization is imported
        return _python_kernel_ops().get(target)
    return None
