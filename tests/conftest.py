"""Shared fixtures. verify-each is on for every test (lint + run + numerics
after every pass), as TVM's relax conftest does."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("GRAPHOPT_VERIFY_EACH", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

# Each test worker gets its share of the cores (pytest_configure: torch's threads), and so do
# Inductor's compile workers: by default each test worker, and each fresh interpreter a lowering
# starts (weight_prepack=false), starts a pool of one process per core, which costs more to start
# than it wins back on a share of two cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES_EACH = max(1, (os.cpu_count() or 1) // _WORKERS)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(_CORES_EACH))

_CAPTURED: dict = {}

#: the files that take a minute or more of test time (``--durations=0`` under ``-n 2``, AMD EPYC with AVX2,
#: 2026-12-06), slowest first. pytest-xdist's ``--dist loadfile`` hands files to the workers in collection
#: order, and the slowest sort last alphabetically (tests/runtimes/...): a worker that starts the 3.5-minute
#: conformance suite near the end leaves the other idle. Run first, the small files even the workers out.
_SLOW_FILES = (
    "runtimes/test_conformance.py",
    "runtimes/test_inductor_autotune.py",
    "bench/test_bench_run.py",
    "runtime/test_incremental.py",
    "passes/test_cast_beyond_zoo.py",
    "passes/test_quantize_int8.py",
    "passes/test_quantize_int8_models.py",
    "cli/test_cli.py",
    "runtimes/test_untrusted_artifacts.py",
    "runtimes/test_inductor.py",
)


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """The slow files first (a stable sort: each file's tests, and the other files, keep their order)."""
    rank = {f"tests/{name}": i for i, name in enumerate(_SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_configure(config):  # type: ignore[no-untyped-def]
    """Under pytest-xdist (the README's ``-n 2``) each worker gets its share of the cores, so
    two workers on two cores do not run four torch threads against each other."""
    if _WORKERS > 1:
        import torch

        torch.set_num_threads(_CORES_EACH)


@pytest.fixture(autouse=True)
def _verify_each(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_VERIFY_EACH", "1")


@pytest.fixture(scope="session")
def zoo():
    """``zoo("bert4rec:tiny")`` -> the ZooModel (built once per session)."""
    from graphopt.rec.zoo import load_model

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def program(zoo):
    """``program("bert4rec:tiny")`` -> a fresh copy of the captured Program
    (captured once per session; each call returns an independent copy)."""

    def get(name: str):
        if name not in _CAPTURED:
            _CAPTURED[name] = zoo(name).capture()
        return _CAPTURED[name].copy()

    return get
