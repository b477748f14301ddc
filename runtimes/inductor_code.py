"""What an AOTInductor package runs: the calls in its generated C++ wrapper.

An AOTI package (``model.pt2``) keeps the wrapper source it was compiled from
(``data/aotinductor/model/*.wrapper.cpp``). :func:`wrapper_calls` lists, in
order, each call the wrapper makes: fused C++ kernels (``cpp_fused_*``, named
after the ops fused into them) and ATen/oneDNN fallbacks
(``aoti_torch_cpu_*``), with, for oneDNN int8 linears, the post-op and output
dtype. It is how tests and benchmarks prove which int8 kernels run (e.g. every
quantized linear as ``onednn.qlinear_pointwise`` with its requantization fused,
no ``dequantize`` left) without a profiler. :func:`gemm_census` tells, for a
max-autotuned package, which GEMMs went to oneDNN and which to Inductor's CPP
GEMM template (AMX or not): what autotuning picked, read from the code.
"""

from __future__ import annotations

import collections
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Call", "wrapper_source", "wrapper_calls", "census", "gemm_census"]

_CALL = re.compile(r"\b(cpp_fused_\w+?|aoti_torch_cpu_\w+)\(")
_DTYPE_VAR = re.compile(r"int32_t (var_\d+) = cached_torch_dtype_(\w+);")
_QLINEAR = re.compile(r"aoti_torch_cpu__qlinear_pointwise(?:_binary)?(?:_tensor)?\((.*)\);")


@dataclass(frozen=True)
class Call:
    """One call of the wrapper: ``kernel`` (name without the trailing index);
    for ``qlinear_pointwise``: ``output_dtype`` (float32/uint8/bfloat16...),
    ``post_ops`` (e.g. ``("gelu",)``, ``("sum",)``)."""

    kernel: str
    output_dtype: str = ""
    post_ops: tuple[str, ...] = ()

    @property
    def is_qlinear(self) -> bool:
        return self.kernel.startswith("aoti_torch_cpu__qlinear_pointwise")


def wrapper_source(package: str | Path) -> str:
    """The generated C++ wrapper(s) inside an AOTI package."""
    with zipfile.ZipFile(package) as z:
        names = [n for n in z.namelist() if n.endswith(".wrapper.cpp")]
        if not names:
            raise ValueError(f"{package}: no generated wrapper source in the package")
        return "\n".join(z.read(n).decode() for n in names)


def _call_lines(source: str):
    """``(line, called name)`` for each kernel call of the wrapper's run function (declarations skipped)."""
    for line in source.splitlines():
        if line.strip().startswith(("//", "extern", "void ", "static ", "AOTITorchError ", "#")):
            continue
        match = _CALL.search(line)
        yield line, (match.group(1) if match else None)


def wrapper_calls(source: str) -> list[Call]:
    """Every kernel call of the wrapper's run function, in order (declarations skipped)."""
    dtypes: dict[str, str] = {}
    calls: list[Call] = []
    for line, name in _call_lines(source):
        for var, dtype in _DTYPE_VAR.findall(line):
            dtypes[var] = dtype
        if name is None:
            continue
        kernel = re.sub(r"_\d+$", "", name)
        q = _QLINEAR.search(line)
        if q is None:
            calls.append(Call(kernel))
            continue
        args = q.group(1)
        out = next((dtypes[v] for v in re.findall(r"&(var_\d+)", args) if v in dtypes), "")
        posts = tuple(p for p in re.findall(r'"(\w+)"', args) if p not in ("none", ""))
        calls.append(Call(kernel, out, posts))
    return calls


def census(package: str | Path) -> collections.Counter[str]:
    """``kernel -> count`` over the wrapper's calls."""
    return collections.Counter(c.kernel for c in wrapper_calls(wrapper_source(package)))


_ONEDNN_GEMM = re.compile(r"aoti_torch_cpu__?(q?linear_pointwise|mkl_linear|addmm|mm|bmm|baddbmm)(_\w+)?$")


def gemm_census(package: str | Path) -> collections.Counter[str]:
    """How many GEMM calls of the package run where: ``onednn`` (ATen/oneDNN linear, matmul and
    int8 linear fallbacks), ``template-amx`` / ``template`` (Inductor's CPP GEMM template, whose
    generated kernel calls an AMX micro-kernel or an AVX one: a ``<kernel>_micro_gemm`` in the
    package's kernel source). Attention (SDPA) is not counted."""
    with zipfile.ZipFile(package) as z:  # a package of fallback calls only may have no kernel source
        kernels = "\n".join(z.read(n).decode() for n in z.namelist() if n.endswith(".kernel.cpp"))
    counts: collections.Counter[str] = collections.Counter()
    for _, name in _call_lines(wrapper_source(package)):
        if name is None:
            continue
        if _ONEDNN_GEMM.match(name):
            counts["onednn"] += 1
        elif re.search(rf"\b{name}_micro_gemm_amx", kernels):
            counts["template-amx"] += 1
        elif re.search(rf"\b{name}_micro_gemm", kernels):
            counts["template"] += 1
    return counts
