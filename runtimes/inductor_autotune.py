"""When the inductor runtime autotunes GEMMs, and the check every autotuned package passes.

``max_autotune`` left unset is decided per Program (:func:`autotune_by_default`):
on for CPU Programs whose GEMMs read at least :data:`MIN_GEMM_WEIGHTS` weight
elements, where it pays (AMX Xeon, 2 threads, 2026-12-03, bert4rec:base and
bert-cls:base, bf16 and int8-mixed-bf16: 1.32-1.58x at batch 1, 1.22-1.33x at
batch 8, 0.96-1.21x at batch 32; compile 17-27 s -> 33-68 s), off for smaller
ones (each distinct GEMM shape costs ~4 s of C++ compile and benchmarking,
which tiny models never earn back: bert4rec:tiny 23 s -> 77 s), off on CUDA
(Triton autotuning is opt-in there) and off for float32-activation int8
Programs: on torch 2.13 Inductor's CPP int8 GEMM template computes those wrong
(bert4rec:tiny ``O2,quantize-int8``: relative error 1.04 against the Program,
top-10 overlap 0.24; int8-mixed-bf16 and float Programs are right).

Because a template can be wrong where nobody has measured it, every
autotuned CPU package is run once on the Program's sample inputs before it is
kept (:func:`package_error`); one whose outputs are off by more than
:data:`MAX_REL_ERROR` (relative L2; bf16 rounding gives ~5e-3, the miscompile
above ~1) is compiled again without autotuning, and the manifest says why.
"""

from __future__ import annotations

from pathlib import Path

import torch

from graphopt.ir.program import Program
from graphopt.runtime.backend import gemm_weight_elements, is_quantized, program_dtypes

__all__ = ["MIN_GEMM_WEIGHTS", "MAX_REL_ERROR", "autotune_by_default", "package_error"]

#: ``max_autotune`` left unset is on for CPU Programs whose GEMM weights have at least this many elements
MIN_GEMM_WEIGHTS = 1_000_000
#: an autotuned package whose outputs are further than this from the Program's (relative L2) is not kept
MAX_REL_ERROR = 0.05


def autotune_by_default(program: Program, device: str) -> bool:
    """Whether ``max_autotune`` left unset is on for ``program`` lowered to ``device``."""
    if device != "cpu" or gemm_weight_elements(program) < MIN_GEMM_WEIGHTS:
        return False
    low = program_dtypes(program) & {torch.bfloat16, torch.float16}
    return not (is_quantized(program) and not low)  # float32-activation int8: miscompiled (module docstring)


def package_error(package: Path, program: Program) -> float:
    """The largest relative L2 error of the package's float outputs against the Program's,
    on the Program's sample inputs (0.0 when it has no float outputs)."""
    import torch._inductor

    inputs = program.sample_inputs()
    with torch.no_grad():
        got = torch._inductor.aoti_load_package(str(package))(*inputs)
        want = program(*inputs)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    worst = 0.0
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            g, w = g.detach().float().cpu(), w.detach().float().cpu()
            if g.shape != w.shape:
                return float("inf")
            norm = float(torch.linalg.vector_norm(w))
            diff = float(torch.linalg.vector_norm(g - w))
            worst = max(worst, diff / norm if norm > 0 else diff)
    return worst if len(got) == len(want) else float("inf")
