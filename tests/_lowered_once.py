"""One lowering of a Program per test session, shared by the pytest-xdist workers.

The README's test command runs two workers with ``--dist loadfile``, so two test
files that lower the same Program the same way (the conformance suite and the
untrusted-artifact cases, both on bert4rec:tiny) each paid for it when they
landed on different workers: an AOTInductor compile is tens of seconds here.
:func:`lowered_once` lowers into a folder every worker of the session sees, under
a file lock, named by the runtime, the options and the Program's fingerprint (a
Program built differently in another worker gets its own folder, never a stale
artifact); without xdist the folder is the session's own temporary directory.
Callers treat the artifact as read-only (a test that damages one copies it first).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from graphopt.ir.program import Program
from graphopt.runtime import lower
from graphopt.runtime.artifact import Artifact, read_artifact


def _shared_root(tmp_path_factory: Any) -> Path:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/: this session's, shared by its workers (popen-gw0, popen-gw1)
    root = base / "lowered-once"
    root.mkdir(exist_ok=True)
    return root


def lowered_once(tmp_path_factory: Any, program: Program, runtime: str, **options: Any) -> Artifact:
    """``lower(program, runtime, folder, **options)`` unless a worker of this session already
    did; the artifact is read back (checksums verified) either way."""
    key = json.dumps([runtime, program.fingerprint(), options], sort_keys=True, default=str)
    name = f"{runtime}-{program.name.replace(':', '-')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    root = _shared_root(tmp_path_factory)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / name).is_dir():  # lower() writes atomically: a folder here is complete
            lower(program, runtime, root / name, **options)
        return read_artifact(root / name)
