"""The wheel must contain every package: pyproject lists them explicitly
because passes/ and runtimes/ are mapped into graphopt.*."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"graphopt.passes", "graphopt.runtimes"}
    for init in (ROOT / "graphopt").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        found.add(".".join(rel.parts))
    for mapped in ("passes", "runtimes"):  # installed as graphopt.passes.*, graphopt.runtimes.*
        for init in (ROOT / mapped).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / mapped)
            found.add(".".join(("graphopt", mapped, *rel.parts)))
    missing = found - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"]["graphopt.passes"] == "passes"
    assert config["package-dir"]["graphopt.runtimes"] == "runtimes"
