"""Standalone reproducer for an upstream report: AOTInductor's CPU constants start off a cache line.

torch only (no graphopt import), for filing with PyTorch: AOTInductor copies a CPU
package's constants into one block from ``std::malloc`` (``RAII_cpuMalloc`` in
``torch/csrc/inductor/aoti_runtime/model_base.h``) and lays them out at 64-byte
offsets inside it; glibc returns 16-byte-aligned memory (a block of 32 MB or more
is its own mapping, 16 bytes past the page; a smaller one lands wherever the heap
puts it), so every weight starts 16 bytes off a cache line. This script compiles a bf16 MLP whose weights take 64 MB, loads the
package's model library with the container runner the package loader uses, prints
each constant's address modulo 64, then times the model as loaded and after
swapping in 64-byte-aligned copies of the same weights
(``update_constant_buffer(..., user_managed=True)``), interleaved, and checks the
outputs are bit-equal. graphopt's inductor runner does that swap
(``graphopt/runtimes/inductor_constants.py``); an ``aligned_alloc(64, ...)`` in
``RAII_cpuMalloc`` (and ``ConstantBufferSet::ensure_blob``) would make it
unnecessary.

    python benchmarks/aoti_alignment_repro.py [--width 4096] [--layers 2] [--batch 512] [--rounds 20]

Measured 2026-12-07 02:36-02:37, Intel Xeon (family 6 model 207, Emerald Rapids;
avx512_bf16, avx512_vnni, amx_bf16, amx_int8), 2 threads, alone, torch 2.13.0+cpu;
every constant at address % 64 == 16 as loaded, outputs bit-equal; p50 ms as loaded
-> aligned: width 4096 x 2 layers (64 MB) batch 8 1.16 -> 1.15 (1.01x), batch 64
2.18 -> 2.06 (1.06x), batch 512 23.68 -> 15.18 (**1.56x**), batch 2048 84.72 -> 49.78
(**1.70x**); width 768 x 12 layers (14 MB) batch 2048 17.06 -> 9.13 (**1.87x**).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import torch


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """The same bytes, sizes, strides and offset in torch-allocated (64-byte-aligned) memory."""
    if t.layout != torch.strided:  # oneDNN's packed weights
        return t.clone()
    return t.new_empty(0).set_(t.untyped_storage().clone(), t.storage_offset(), t.size(), t.stride())


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.layout == torch.strided else int(torch.ops.mkldnn.data_ptr(t))


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() if t.layout == torch.strided else int(torch.ops.mkldnn._nbytes(t))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    model = model.to(torch.bfloat16).eval()
    x = torch.randn(args.batch, args.width, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        package = torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)),
                                                           package_path=str(Path(tmp) / "model.pt2"),
                                                           inductor_configs={"freezing": True})
        with zipfile.ZipFile(package) as z:
            so = z.extract(next(n for n in z.namelist() if n.endswith(".so")), tmp)
        if hasattr(torch._C._cpu, "_init_amx"):
            torch._C._cpu._init_amx()  # as the package loader's process does before AMX kernels run
        loaded = torch._C._aoti.AOTIModelContainerRunnerCpu(so, 1)
        aligned = torch._C._aoti.AOTIModelContainerRunnerCpu(so, 1)
        constants = aligned.extract_constants_map(False)
        names = aligned.get_constant_names_to_original_fqns()
        print(f"torch {torch.__version__}; {len(constants)} constants, "
              f"{sum(_nbytes(t) for t in constants.values()) / 2**20:.0f} MB")
        for fqn, t in constants.items():
            print(f"  {fqn}: address % 64 = {_address(t) % 64}")
        copies = {name: _aligned_copy(constants[fqn]) for name, fqn in names.items() if fqn in constants}
        aligned.update_constant_buffer(copies, False, False, True)  # user-managed: `copies` stays alive
        same = all(torch.equal(a, b) for a, b in zip(loaded.run([x]), aligned.run([x])))
        times: dict[str, list[float]] = {"as loaded": [], "aligned": []}
        for _ in range(3):
            loaded.run([x]), aligned.run([x])
        for _ in range(args.rounds):
            for name, runner in (("as loaded", loaded), ("aligned", aligned)):
                start = time.perf_counter()
                runner.run([x])
                times[name].append(time.perf_counter() - start)
        p50 = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"outputs bit-equal: {same}; p50 ms: as loaded {p50['as loaded']:.2f}, aligned {p50['aligned']:.2f} "
              f"({p50['as loaded'] / p50['aligned']:.2f}x), {torch.get_num_threads()} threads, batch {args.batch}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
