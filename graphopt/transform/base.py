"""The pass protocol: typed options, a declared contract, and the registry.

A pass is a small class registered under a kebab-case name that matches its
module (``passes/remove_dropout.py`` registers ``remove-dropout``)::

    @register_pass
    class RemoveDropout(Pass):
        \"\"\"Remove dropout (identity in eval mode).\"\"\"
        name = "remove-dropout"
        preserves = frozenset({"shapes"})

        def run(self, program, ctx):
            ...
            return PassResult(program, modified=count > 0, stats={"dropout": count})

Contract: ``requires`` names what the pass needs before it runs (``shapes``:
fresh ``meta["val"]`` on every node; ``calibration_data``; ``example_inputs``),
``preserves`` the analyses still valid after it, ``exact``/``tolerance`` the
numerics its tests and verify-each hold it to. The pass manager enforces the
contract on the *result* Program.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from graphopt.errors import GraphoptError, PassOptionError, closest
from graphopt.options import Option

if TYPE_CHECKING:
    from graphopt.ir.program import Program
    from graphopt.transform.manager import PassContext

__all__ = [
    "Option",
    "Pass",
    "PassResult",
    "register_pass",
    "register_preset",
    "get_pass",
    "get_preset",
    "available_passes",
    "available_presets",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_VALUE_RE = re.compile(r"^[^\s{}]+$")


@dataclass
class PassResult:
    """What a pass returns. ``modified`` must be False when nothing matched.

    ``stats`` maps a rule/kind to how many times it fired; ``declined`` lists
    ``"where: why"`` for candidates a check refused; ``details`` holds
    per-layer records (pruning); ``notes`` are one-line remarks for the report.
    """

    program: Program
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_printable(pass_name: str, opt: Option, value: Any) -> None:
    """Pipeline text is canonical: a value must print back without spaces or braces."""
    items = value if opt.type is list else [value] if opt.type is str else []
    for item in items:
        if not _VALUE_RE.match(item) or (opt.type is list and "," in item):
            raise PassOptionError(
                f"pass '{pass_name}' option '{opt.name}': value {item!r} may not contain spaces, braces or commas"
            )


class Pass:
    """Base class of every pass. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str]] = frozenset()
    exact: ClassVar[bool] = True
    tolerance: float = 1e-5
    #: a remark shown by ``graphopt passes`` (e.g. which backends honour it)
    backend_notes: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        known = {o.name: o for o in self.options}
        for key in options:
            if key not in known:
                names = ", ".join(known) or "none"
                raise PassOptionError(
                    f"pass '{self.name}' has no option '{key}'{closest(key, list(known))}; "
                    f"its options: {names}"
                )
        self.config: dict[str, Any] = {}
        for opt in self.options:
            value = options.get(opt.name, opt.default)
            if opt.name in options:
                value = opt.coerce(value, f"pass '{self.name}'")
                _check_printable(self.name, opt, value)
            self.config[opt.name] = value
        self.validate()

    def validate(self) -> None:
        """Cross-option checks; raise PassOptionError. Runs at construction."""

    def __getattr__(self, key: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and key in config:
            return config[key]
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def step_text(self) -> str:
        """Canonical text of this step: every option, defaults included, sorted."""
        if not self.options:
            return self.name
        opts = {o.name: o for o in self.options}
        body = " ".join(f"{k}={opts[k].format(self.config[k])}" for k in sorted(self.config))
        return f"{self.name}{{{body}}}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pass) and self.step_text() == other.step_text()

    def __hash__(self) -> int:
        return hash(self.step_text())

    def __repr__(self) -> str:
        return f"<pass {self.step_text()}>"


_PASSES: dict[str, type[Pass]] = {}
_PRESETS: dict[str, tuple[str, str]] = {}
_builtins_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add ``cls`` to the registry under ``cls.name``."""
    name = cls.name
    if not _NAME_RE.match(name or ""):
        raise GraphoptError(f"pass name {name!r} of {cls.__qualname__} is not kebab-case")
    if name in _PASSES and _PASSES[name] is not cls:
        raise GraphoptError(
            f"pass name '{name}' is registered twice ({_PASSES[name].__module__} and {cls.__module__})"
        )
    seen = set()
    for opt in cls.options:
        if opt.name in seen:
            raise GraphoptError(f"pass '{name}' declares option '{opt.name}' twice")
        seen.add(opt.name)
    _PASSES[name] = cls
    return cls


def register_preset(name: str, pipeline: str, summary: str) -> None:
    """A named pipeline (``O1``) that expands to text when parsed."""
    if name in _PRESETS and _PRESETS[name][0] != pipeline:
        raise GraphoptError(f"preset '{name}' is registered twice")
    _PRESETS[name] = (pipeline, summary)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("graphopt.passes")


def available_passes() -> dict[str, type[Pass]]:
    _load_builtins()
    return dict(sorted(_PASSES.items()))


def available_presets() -> dict[str, tuple[str, str]]:
    _load_builtins()
    return dict(sorted(_PRESETS.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        raise PassOptionError(
            f"unknown pass '{name}'{closest(name, list(passes) + list(_PRESETS))}; "
            "`graphopt passes` lists them"
        )
    return passes[name]


def get_preset(name: str) -> str | None:
    return available_presets().get(name, (None, ""))[0]


def make_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    return get_pass(name)(**dict(options or {}))
