"""The heap policy a graphopt runner sets (graphopt/process.py): once a runner activates,
glibc keeps freed memory, so a model's large per-call buffers stop page-faulting on every
call; GRAPHOPT_KEEP_HEAP=0 or the process's own malloc settings leave glibc alone.
Each case runs in a fresh interpreter (the policy is process-wide and decided once)."""

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


def _run(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GRAPHOPT_KEEP_HEAP"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_active_runner_keeps_freed_memory_and_its_calls_stop_page_faulting():
    kept, default = _run(), _run(GRAPHOPT_KEEP_HEAP="0")
    assert kept["policy"].startswith("freed memory kept (glibc mallopt")
    assert default["policy"] == "default (GRAPHOPT_KEEP_HEAP=0)"
    assert kept["err"] < 1e-5 and default["err"] < 1e-5  # the same outputs either way
    # glibc's default gives the buffers back each call (hundreds of 4 KiB faults per call here)
    assert default["faults"] >= 50, default
    assert kept["faults"] * 4 < default["faults"], (kept, default)


def test_the_process_own_malloc_settings_win():
    own = _run(MALLOC_ARENA_MAX="2")
    assert own["policy"] == "the process's own malloc settings (MALLOC_*, GLIBC_TUNABLES or LD_PRELOAD)"
