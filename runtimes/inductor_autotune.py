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
autotuned CPU package is run on the Program's sample inputs (and at batch 1 and
another sequence length where those dims are dynamic) before it is kept
(:func:`package_check`), in a fresh interpreter: a template can also write out
of bounds, and then the process aborts (bert4rec:base int8-mixed-bf16 with two
linears kept fp32 and four bf16, torch 2.13: ``free(): invalid next size``).
A package whose outputs are off by more than :data:`MAX_REL_ERROR` (relative
L2; bf16 rounding gives ~5e-3, the miscompile above ~1), or that ends the
interpreter running it, is compiled again without autotuning, and the manifest
says why (the inductor runtime first autotunes a package that crashed again
with epilogue fusion off, the cause below).

That abort has a known cause, avoided up front (:func:`narrowing_epilogues`): on
torch 2.13 the CPP GEMM template of a float (fp32 or bf16) linear whose fused
epilogue ends in a narrower dtype (GELU then the uint8 quantize of an int8
layer's input; tanh then a cast to bf16) stores its float result into the
narrow output before the narrow values: up to 3 extra bytes per byte written,
past the buffer at its end. A Program with such a linear is autotuned with
Inductor's epilogue fusion off (the template keeps its own bias/activation; the
quantize or cast runs as its own kernel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from graphopt.ir.fx import op_name, tensor_meta
from graphopt.ir.program import Program
from graphopt.runtime.backend import gemm_weight_elements, is_quantized, program_dtypes

__all__ = ["MIN_GEMM_WEIGHTS", "MAX_REL_ERROR", "autotune_by_default", "heap_is_checked", "narrowing_epilogues",
           "package_check", "package_error"]

#: ``max_autotune`` left unset is on for CPU Programs whose GEMM weights have at least this many elements
MIN_GEMM_WEIGHTS = 1_000_000
#: an autotuned package whose outputs are further than this from the Program's (relative L2) is not kept
MAX_REL_ERROR = 0.05
#: seconds the fresh interpreter may take to load and run a package on the check's inputs
CHECK_TIMEOUT_S = 600


def autotune_by_default(program: Program, device: str) -> bool:
    """Whether ``max_autotune`` left unset is on for ``program`` lowered to ``device``."""
    if device != "cpu" or gemm_weight_elements(program) < MIN_GEMM_WEIGHTS:
        return False
    low = program_dtypes(program) & {torch.bfloat16, torch.float16}
    return not (is_quantized(program) and not low)  # float32-activation int8: miscompiled (module docstring)


_GEMMS = ("linear", "addmm", "mm", "bmm", "matmul")
_VIEWS = ("view", "reshape", "_to_copy", "clone", "expand", "permute", "transpose", "squeeze", "unsqueeze")


def narrowing_epilogues(program: Program, depth: int = 5) -> list[str]:
    """Float linears whose output reaches a narrower dtype through elementwise and view ops only (an
    epilogue Inductor would fuse into the linear's GEMM template): the uint8 ``quantize_per_tensor`` of
    an int8 layer's input, or a cast to bf16 (an fp32 layer kept by int8-mixed-bf16's guard feeding a bf16
    one: bert-cls:base's pooler, tanh, then the bf16 classifier)."""
    found: list[str] = []
    for gemm in program.graph.nodes:
        if gemm.op != "call_function" or op_name(gemm) not in _GEMMS or _dequantized(gemm):
            continue
        val = tensor_meta(gemm)
        if val is None or not val.dtype.is_floating_point:
            continue
        width = val.dtype.itemsize
        frontier = list(gemm.users)
        for _ in range(depth):
            if any(_itemsize(n) and _itemsize(n) < width for n in frontier if _fusible(n)):
                found.append(gemm.name)
                break
            frontier = [u for n in frontier if _fusible(n) for u in n.users]
    return found


def _fusible(node: torch.fx.Node) -> bool:
    """An op an epilogue can hold: elementwise, a view or cast, a per-tensor quantize."""
    if node.op != "call_function":
        return False
    target = str(node.target)
    return (torch.Tag.pointwise in getattr(node.target, "tags", ()) or op_name(node) in _VIEWS
            or ("quantize_per_tensor" in target and "dequantize" not in target))


def _itemsize(node: torch.fx.Node) -> int:
    val = tensor_meta(node)
    return val.dtype.itemsize if val is not None else 0


def _dequantized(gemm: torch.fx.Node, depth: int = 3) -> bool:
    """Whether the GEMM reads a dequantized operand (an int8 layer: int8-mixed-bf16 casts the
    dequantized input and weight to bf16 first), looking back through view and cast ops."""
    frontier = [a for a in gemm.args[:2] if isinstance(a, torch.fx.Node)]
    for _ in range(depth):
        if any("dequantize" in str(n.target) for n in frontier):
            return True
        frontier = [a for n in frontier if n.op == "call_function" and op_name(n) in _VIEWS
                    for a in n.args[:1] if isinstance(a, torch.fx.Node)]
    return any("dequantize" in str(n.target) for n in frontier)


def check_inputs(program: Program) -> list[tuple[torch.Tensor, ...]]:
    """The Program's sample inputs, and at batch 1 and a shorter sequence where those dims are dynamic."""
    default = program.sample_inputs()
    labels = program.dynamic_labels()
    out = [default]
    if "batch" in labels:
        out.append(program.sample_inputs(batch=1, seed=1))
    seq = next((t.shape[d] for spec, t in zip(program.inputs, default) for d, lab in spec.dynamic.items()
                if lab == "seq"), None)
    if seq is not None and seq > 2:
        out.append(program.sample_inputs(seq=seq // 2 + 1, seed=2))
    return out


def package_check(package: Path, program: Program) -> tuple[float, str | None]:
    """Run the package in a fresh interpreter (heap checks on) on :func:`check_inputs`: the largest relative L2
    error of its float outputs against the Program's (0.0 when it has none; inf when it could
    not run), and how the interpreter ended when it did not end normally (else None)."""
    cases = check_inputs(program)
    with torch.no_grad():
        wants = [_floats(program(*x)) for x in cases]
    with tempfile.TemporaryDirectory(prefix="graphopt-check-") as tmp:
        feeds = Path(tmp) / "check.pt"
        torch.save({"inputs": cases, "wants": wants}, feeds)
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **_checked_heap())
        cmd = [sys.executable, "-m", "graphopt.runtimes.inductor_autotune", str(package), str(feeds)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            return float("inf"), f"running it took over {CHECK_TIMEOUT_S} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        errs = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return float("inf"), f"the process running it died ({how}{': ' + errs[-1] if errs else ''})"
    return float(json.loads(lines[-1])["error"]), None


def heap_is_checked() -> bool:
    """Whether :func:`package_check` runs the package on glibc's checking heap (libc_malloc_debug is
    installed), so that a write past a buffer aborts the check instead of passing unseen."""
    return bool(_checked_heap())


def _checked_heap() -> dict[str, str]:
    """glibc's checking allocator for the check's interpreter, where it is installed: a guard byte
    after each heap block, checked when the block is freed, so a write one byte past a buffer
    aborts the check instead of passing unseen."""
    import ctypes.util

    lib = ctypes.util.find_library("c_malloc_debug")
    if lib is None:
        return {}
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), lib]))
    return {"LD_PRELOAD": preload, "MALLOC_CHECK_": "3"}


def package_error(package: Path, program: Program) -> float:
    """:func:`package_check`'s error alone (inf when the package could not run)."""
    return package_check(package, program)[0]


def _floats(out: object) -> list[torch.Tensor | None]:
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.detach().float().cpu() if isinstance(o, torch.Tensor) and o.is_floating_point() else None for o in outs]


def _relative_error(got: object, wants: list[torch.Tensor | None]) -> float:
    gots = _floats(got)
    if len(gots) != len(wants):
        return float("inf")
    worst = 0.0
    for g, w in zip(gots, wants):
        if w is None:
            continue
        if g is None or g.shape != w.shape:
            return float("inf")
        norm = float(torch.linalg.vector_norm(w))
        diff = float(torch.linalg.vector_norm(g - w))
        worst = max(worst, diff / norm if norm > 0 else diff)
    return worst


def _main(argv: list[str]) -> int:
    """``python -m graphopt.runtimes.inductor_autotune PACKAGE CHECK.pt``: prints ``{"error": E}``."""
    import torch._inductor

    package, feeds = argv
    check = torch.load(feeds, weights_only=True)
    model = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        error = max(_relative_error(model(*x), w) for x, w in zip(check["inputs"], check["wants"]))
    print(json.dumps({"error": error}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
