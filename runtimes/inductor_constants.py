"""A CPU AOTInductor package loaded with its weights on 64-byte boundaries.

AOTInductor copies a package's constants (weights, packed weights, biases) into
one block it takes from ``std::malloc`` (``RAII_cpuMalloc`` in
``aoti_runtime/model_base.h``) and lays them out at 64-byte offsets *within*
it. glibc returns 16-byte-aligned blocks (a block of 32 MB or more is its own
mapping, returned 16 bytes past the page), so every weight starts 16, 32 or 48
bytes off a cache line, or, by luck, on one: each GEMM's weight rows then
straddle cache lines and its AMX/AVX-512 tile loads split. Measured on an Intel
Xeon with AMX (Emerald Rapids, 2 threads, torch 2.13, 2026-12-06,
benchmarks/bench_constant_alignment.py): bert4rec:large's bf16 package (its block
is mapped: never aligned) ran 1.12x / 1.24x faster aligned at batch 8 / 32, and
1.38x / 1.54x compiled without autotuning; on bert4rec:base, six loads of one
package in one process ran 9.6-10.0 ms at batch 32, except the one whose block
happened to fall on a cache line, 8.4. Float32 packages (MKL's packed GEMMs) do
not care.

:class:`AlignedPackage` loads the package's shared library itself (the
container runner the package loader would create) and moves every constant it
can name into memory torch allocates (64-byte aligned), swapping them in as
user-managed constants. The container's ``extract_constants_map`` keys constants
by their original FQN, which some constants share (a quantized model's many
``x_scale``); those few stay where AOTInductor put them (scalars and per-channel
zero points). The old copies of the moved ones are released page by page
(``madvise(MADV_DONTNEED)`` on the whole pages inside them), so the weights are
held once, not twice. The outputs are bit for bit those of the package as the
loader loads it (tests/runtimes/test_inductor_constants.py).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import mmap
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import first_line

__all__ = ["AlignedPackage", "ALIGNMENT", "load_aligned", "flat_outputs"]

#: where torch's CPU allocator puts every block, and what the moved constants get
ALIGNMENT = 64
_MADV_DONTNEED = 4


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``(address, bytes)`` of a constant's storage, packed (oneDNN) layout too."""
    if t.layout == torch.strided:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    return int(torch.ops.mkldnn.data_ptr(t)), int(torch.ops.mkldnn._nbytes(t))


def _copy(t: torch.Tensor) -> torch.Tensor:
    """The constant in new memory, exactly as the compiled code indexes it: the same bytes of
    storage viewed with the same sizes, strides and offset (a packed oneDNN tensor keeps its
    layout through ``clone``)."""
    if t.layout != torch.strided:
        return t.clone()
    return t.new_empty(0).set_(t.untyped_storage().clone(), t.storage_offset(), t.size(), t.stride())


def _release(ranges: list[tuple[int, int]]) -> int:
    """Give the whole pages inside ``ranges`` (address, end) back to the kernel; returns bytes.
    Neighbouring ranges closer than one constant slot (64 bytes: AOTInductor's padding) merge,
    so a page two moved constants share is released too; a kept constant (>= 64 bytes apart)
    keeps its page. The pages stay mapped (zero-filled if read again): nothing reads them."""
    page = mmap.PAGESIZE
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] < ALIGNMENT:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    released = 0
    for start, end in merged:
        first, last = -(-start // page) * page, end // page * page
        if last > first and _libc().madvise(first, last - first, _MADV_DONTNEED) == 0:
            released += last - first
    return released


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


class AlignedPackage:
    """A CPU AOTInductor package (``model.pt2``) run from its container runner, its constants
    64-byte aligned (``move=False``: left where AOTInductor put them, for comparison).
    ``placement`` says how many constants were off a cache line as loaded and what moved:
    constants moved (of them in oneDNN's packed layout) / kept, bytes moved, bytes of the old
    copies released."""

    def __init__(self, package: str | Path, move: bool = True):
        self._dir = tempfile.TemporaryDirectory(prefix="graphopt-aoti-")
        with zipfile.ZipFile(package) as z:
            libs = [n for n in z.namelist() if n.endswith(".so") and "/data/aotinductor/" in n]
            if len(libs) != 1:
                raise ValueError(f"{package}: expected one compiled model library in the package, found {len(libs)}")
            so = z.extract(libs[0], self._dir.name)
        if hasattr(torch._C, "_cpu") and hasattr(torch._C._cpu, "_init_amx"):
            torch._C._cpu._init_amx()  # AMX kernels need the tile state this process asks the kernel for
        self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(so, 1)
        self._moved: dict[str, torch.Tensor] = {}  # user-managed: the runner holds pointers into these
        self.placement = self._align(move)

    def _named(self) -> tuple[dict[str, torch.Tensor], int, int]:
        """The constants that can be told apart, by name (an FQN two constants share names neither),
        how many constants there are, and how many of them sit off a 64-byte boundary."""
        by_fqn = self._runner.extract_constants_map(False)
        names = self._runner.get_constant_names_to_original_fqns()
        shared = collections.Counter(names.values())
        named = {name: by_fqn[fqn] for name, fqn in names.items() if shared[fqn] == 1 and fqn in by_fqn}
        return named, len(names), sum(_byte_range(t)[0] % ALIGNMENT != 0 for t in by_fqn.values())

    def _align(self, move: bool) -> dict[str, int]:
        named, total, misaligned = self._named()
        old: list[tuple[int, int]] = []
        for name, t in named.items():
            address, size = _byte_range(t)
            if not move or size == 0 or address % ALIGNMENT == 0:
                continue
            self._moved[name] = _copy(t)
            old.append((address, address + size))
            # the old copy's own pages go at once, so loading holds the weights about once, not twice
            # (nothing runs the model before the swap below)
            _release(old[-1:])
        if self._moved:
            self._runner.update_constant_buffer(self._moved, False, False, True)
        packed = sum(t.layout != torch.strided for t in self._moved.values())
        return {"moved": len(self._moved), "moved_packed": packed, "kept": total - len(self._moved),
                "misaligned": misaligned,
                "moved_bytes": sum(e - s for s, e in old),
                "released_bytes": _release(old) if old else 0}  # again, with the pages moved neighbours share

    def misaligned(self) -> list[str]:
        """The constants the model reads now that do not start on a 64-byte boundary, by name
        (the ones sharing an FQN with another constant cannot be told apart and are left out)."""
        return sorted(name for name, t in self._named()[0].items() if _byte_range(t)[0] % ALIGNMENT != 0)

    def __call__(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._runner.run(flat)

    def get_call_spec(self) -> list[str]:
        return self._runner.get_call_spec()

    def close(self) -> None:
        self._runner = None
        self._moved = {}
        self._dir.cleanup()

    def __del__(self) -> None:
        if getattr(self, "_runner", None) is not None:
            self.close()


def load_aligned(package: str | Path, move: bool = True) -> tuple[AlignedPackage | None, dict[str, int] | str]:
    """``(package, its placement)``, or ``(None, why)`` where it cannot be loaded this way (the
    caller then uses the package loader: its placement is slower, not wrong)."""
    try:
        aligned = AlignedPackage(package, move=move)
    except Exception as e:  # noqa: BLE001 - any failure leaves the loader's way
        return None, f"left as loaded: aligning its constants failed ({first_line(e)})"
    if not flat_outputs(aligned):  # its runner returns the flat outputs: a nested spec needs the loader's
        aligned.close()
        return None, "left as loaded (nested outputs)"
    return aligned, aligned.placement


def flat_outputs(package: Any) -> bool:
    """Whether a package's outputs are a flat tuple/list of tensors (its call spec says)."""
    from torch.utils import _pytree as pytree

    try:
        out_spec = pytree.treespec_loads(package.get_call_spec()[1])
    except Exception:  # noqa: BLE001 - another torch's loader: keep its __call__
        return False
    return out_spec.type in (tuple, list) and all(c.is_leaf() for c in out_spec.children())
