"""The heap policy a graphopt runner sets (graphopt/process.py): activating a runner has
glibc keep freed memory, so blocks freed by one call are reused by the next instead of being
handed back and page-faulted in again; GRAPHOPT_KEEP_HEAP=0 or the process's own malloc
settings leave glibc alone. Each case runs in a fresh interpreter (the policy is
process-wide and decided once). How many faults a real model saves depends on the
process's history under glibc's adaptive thresholds (bert4rec:base at batch 32: see
benchmarks/bench_heap.py), so the fault test uses a deterministic allocation pattern."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

SCRIPT = r"""
import json, resource, sys, tempfile
import torch, graphopt
from graphopt.process import heap_policy
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 1024),
                          torch.nn.LayerNorm(1024)).eval()
x = torch.randn(1024, 1024)  # 4-8 MiB activations: above glibc's default mmap threshold
program = graphopt.capture(mlp, (x,))
folder = tempfile.mkdtemp() + "/eager"
graphopt.lower(program, "eager", folder)
runner = graphopt.load(folder).activate()
for _ in range(3):
    out = runner(x)[0]
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    out = runner(x)[0]
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10
with torch.no_grad():
    err = float((out - mlp(x)).abs().max())
print(json.dumps({"faults": faults, "policy": heap_policy(), "err": err}))
"""


def _child(script: str, *args: str, **env: str) -> dict:
    """Run ``script`` in a fresh interpreter without this process's malloc settings; its last line as JSON."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GRAPHOPT_KEEP_HEAP"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env={**environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(**env: str) -> dict:
    return _child(SCRIPT, **env)


def test_an_active_runner_sets_the_policy_and_computes_the_same():
    kept, default = _run(), _run(GRAPHOPT_KEEP_HEAP="0")
    assert kept["policy"].startswith("freed memory kept (glibc mallopt")
    assert default["policy"] == "default (GRAPHOPT_KEEP_HEAP=0)"
    assert kept["err"] < 1e-5 and default["err"] < 1e-5  # the same outputs either way
    assert kept["faults"] <= default["faults"] * 1.5 + 64, (kept, default)  # never worse (the real figures vary)


GROWING = r"""
import ctypes, json, resource, sys
from graphopt.process import heap_policy, keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in range(1, 31):  # a call's buffers, a little larger each time (1 to 30 MiB)
    p = libc.malloc(mib << 20)
    ctypes.memset(p, 1, mib << 20)
    libc.free(p)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, "policy": heap_policy()}))
"""


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    # glibc's default maps each block above its adaptive threshold on its own and unmaps it on free
    # (465 MiB touched fresh here); kept, the heap grows once to the largest block (30 MiB)
    kept, default = _child(GROWING, "keep"), _child(GROWING, "default")
    assert kept["policy"].startswith("freed memory kept") and default["policy"] == "default (not set)"
    assert default["faults"] > 60_000, default  # ~119,000 pages: every block faulted in
    assert kept["faults"] < 20_000, kept  # ~7,700 pages: the heap's growth to 30 MiB
    assert kept["faults"] * 4 < default["faults"]


def test_the_process_own_malloc_settings_win():
    own = _child(GROWING, "keep", MALLOC_ARENA_MAX="2")  # keep_freed_memory: what activating a runner calls
    assert own["policy"] == "the process's own malloc settings (MALLOC_*, GLIBC_TUNABLES or LD_PRELOAD)"
