"""Where a CPU variant's time goes: the oneDNN primitives one call runs, by kind and shape.

    with onednn_trace() as trace:
        runner(*inputs)
    for row in summarize(trace.records()):
        print(row.kind, row.mkn, row.dtypes, row.post_ops, row.calls, row.ms)

oneDNN times each primitive it executes itself and prints it when verbose
(``torch.backends.mkldnn.verbose``): ``onednn_verbose,v1,primitive,exec,cpu,
<kind>,<implementation>,<propagation>,<memory descriptors>,<attributes>,<aux>,
<problem>,<ms>``. The GEMMs of Inductor's oneDNN lowerings (``_linear_pointwise``,
``qlinear_pointwise``) are ``inner_product`` or ``matmul`` primitives; the CPU
flash attention runs oneDNN's ``brgemm`` micro-kernels, thousands of tiny
records per call, summed here as one row per shape. Verbose printing slows the
call it traces, so take wall-clock time from an untraced call.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["Primitive", "PrimitiveRow", "parse_verbose", "summarize", "onednn_trace", "problem_mkn"]


@dataclass(frozen=True)
class Primitive:
    """One executed primitive: ``kind`` (inner_product, matmul, brgemm, reorder, ...),
    ``impl`` (e.g. ``brg_matmul:avx10_1_512_amx``), ``problem`` as oneDNN prints it,
    source -> destination dtypes, post-ops, and oneDNN's own time in ms."""

    kind: str
    impl: str
    problem: str
    dtypes: str
    post_ops: str
    ms: float


@dataclass(frozen=True)
class PrimitiveRow:
    """The primitives of one kind, problem, dtypes and post-ops: how many ran, their total ms;
    ``mkn`` = (rows, reduction, columns) for GEMM-like kinds, else None."""

    kind: str
    mkn: tuple[int, int, int] | None
    problem: str
    dtypes: str
    post_ops: str
    calls: int
    ms: float


_DTYPE = re.compile(r"(?:^|\s)(src|dst):([a-z0-9]+)")
_POST_OPS = re.compile(r"attr-post-ops:(\S+)")


def parse_verbose(lines: Iterable[str]) -> list[Primitive]:
    """The ``exec`` records of oneDNN verbose output (other lines are ignored)."""
    out = []
    for line in lines:
        if not line.startswith("onednn_verbose,") or ",exec," not in line:
            continue
        fields = line.rstrip("\n").split(",")
        if len(fields) < 8 or fields[2] not in ("primitive", "ukernel"):
            continue
        try:
            ms = float(fields[-1])
        except ValueError:
            continue
        descriptors, attributes = (fields[8], fields[9]) if len(fields) > 11 else ("", "")
        dtypes = dict(_DTYPE.findall(descriptors))
        post = _POST_OPS.search(attributes)
        kind, impl = fields[5], fields[6] if len(fields) > 6 else ""
        if kind.startswith("brgemm"):  # ukernel records: "brgemm, ,<problem>,<ms>"
            kind, impl = "brgemm", "ukernel"
        out.append(Primitive(kind, impl, fields[-2].strip(), f"{dtypes.get('src', '?')}->{dtypes.get('dst', '?')}",
                             post.group(1) if post else "", ms))
    return out


def problem_mkn(kind: str, problem: str) -> tuple[int, int, int] | None:
    """(rows, reduction, columns) of a GEMM-like problem: ``mb2048ic256oc768`` (inner
    product) or ``[B x]2048x256:[B x]256x768`` (matmul, leading batch dims folded into the rows)."""
    if kind == "inner_product":
        m = re.fullmatch(r"mb(\d+)ic(\d+)oc(\d+)", problem)
        return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None
    if kind in ("matmul", "brgemm"):
        parts = problem.split(":")
        if len(parts) < 2:
            return None
        try:
            a = [int(d) for d in parts[0].split("x")]
            b = [int(d) for d in parts[1].split("x")]
        except ValueError:
            return None
        if len(a) < 2 or len(b) < 2:
            return None
        rows = 1
        for d in a[:-1]:
            rows *= d
        return rows, a[-1], b[-1]
    return None


def summarize(records: Iterable[Primitive]) -> list[PrimitiveRow]:
    """One row per (kind, problem, dtypes, post-ops), most time first."""
    rows: dict[tuple[str, str, str, str], list[float]] = {}
    for r in records:
        rows.setdefault((r.kind, r.problem, r.dtypes, r.post_ops), []).append(r.ms)
    out = [PrimitiveRow(k[0], problem_mkn(k[0], k[1]), k[1], k[2], k[3], len(v), sum(v)) for k, v in rows.items()]
    return sorted(out, key=lambda r: -r.ms)


class _Trace:
    """What the traced block made oneDNN print (``text``, filled when the block ends)."""

    def __init__(self) -> None:
        self.text = ""

    def records(self) -> list[Primitive]:
        return parse_verbose(self.text.splitlines())


@contextlib.contextmanager
def onednn_trace() -> Iterator[_Trace]:
    """oneDNN verbose on for the block, its output (C stdout) captured instead of printed."""
    import sys

    import torch

    libc = ctypes.CDLL(None)
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as f:
        path = f.name
    trace = _Trace()
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.dup2(fd, 1)
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            yield trace
    finally:
        libc.fflush(None)  # oneDNN prints through C stdio: flush it into the file before restoring fd 1
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)
        with open(path) as f:
            trace.text = f.read()
        os.unlink(path)
