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
_VALUE_RE = re.compile(r"^[^\s{}]*$")  # empty: an empty str (``label=``)


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
    items = value if opt.type is list else [value] if opt.type is str and value is not None else []
    for item in items:
        if not _VALUE_RE.match(item) or (opt.type is list and "," in item):
            raise PassOptionError(
                f"pass '{pass_name}' option '{opt.name}': value {item!r} may not contain spaces, braces or commas"
            )


_TYPES = (bool, int, float, str, list)


def _check_declaration(pass_name: str, opt: Option) -> None:
    """At registration: a supported type, and a default that prints as pipeline text
    and parses back to itself (so ``parse_pipeline(str(p)) == p`` holds for defaults)."""
    at = f"pass '{pass_name}' option '{opt.name}'"
    if opt.type not in _TYPES:
        raise GraphoptError(
            f"{at}: type {getattr(opt.type, '__name__', opt.type)} is not supported; "
            "declare it as bool, int, float, str or list and convert the value in run()"
        )
    if opt.default is None:  # would print as 'None', which parses as a word or not at all
        raise GraphoptError(
            f"{at}: default None cannot be written in pipeline text; "
            "declare a value that means 'not set' (0, '' or an empty list)"
        )
    try:
        typed = opt.coerce(opt.default, at)
        text = opt.format(opt.default)
        _check_printable(pass_name, opt, typed)
        back = opt.coerce(text, at)
    except PassOptionError as e:
        detail = e.reason.removeprefix(f"{at} option '{opt.name}': ").removeprefix(f"{at}: ")
        raise GraphoptError(f"{at}: default {opt.default!r} is invalid: {detail}") from None
    if opt.format(back) != text or back != typed:
        raise GraphoptError(
            f"{at}: default {opt.default!r} prints as '{opt.name}={text}' which parses back as {back!r}; "
            f"declare the default as {back!r}"
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
_builtins_loading = False
_BUILTINS = "graphopt.passes"


def is_builtin(cls: type) -> bool:
    """True for the passes graphopt ships (``graphopt.passes``)."""
    return cls.__module__ == _BUILTINS or cls.__module__.startswith(_BUILTINS + ".")


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add ``cls`` to the registry under ``cls.name``.

    The built-in passes are registered first, so a name they use is refused.
    Registering a class again from the same module under the same class name
    (re-running a notebook cell, reloading the module) replaces the earlier one;
    any other second class under a name already taken is refused. Each Option
    is checked here: a supported type, and a default that prints as pipeline
    text and parses back to itself.
    """
    name = cls.name
    if not _NAME_RE.match(name or ""):
        raise GraphoptError(f"pass name {name!r} of {cls.__qualname__} is not kebab-case")
    if not is_builtin(cls):
        _load_builtins()
    old = _PASSES.get(name)
    if old is not None and old is not cls:
        if is_builtin(old) and not is_builtin(cls):
            raise GraphoptError(
                f"pass name '{name}' of {_where(cls)} is taken by the built-in pass {_where(old)}; "
                "choose another name"
            )
        if _where(old) != _where(cls):
            raise GraphoptError(
                f"pass name '{name}' is registered twice ({_where(old)} and {_where(cls)}); "
                "rename one of them"
            )
    seen = set()
    for opt in cls.options:
        if opt.name in seen:
            raise GraphoptError(f"pass '{name}' declares option '{opt.name}' twice")
        seen.add(opt.name)
        _check_declaration(name, opt)
    _PASSES[name] = cls  # the same module and class name again (a re-run cell): replaces
    return cls


def register_preset(name: str, pipeline: str, summary: str) -> None:
    """A named pipeline (``O1``) that expands to text when parsed."""
    if name in _PRESETS and _PRESETS[name][0] != pipeline:
        raise GraphoptError(f"preset '{name}' is registered twice")
    _PRESETS[name] = (pipeline, summary)


def _load_builtins() -> None:
    """Import the built-in passes once; the flag is set only when the import succeeded."""
    global _builtins_loaded, _builtins_loading
    if _builtins_loaded or _builtins_loading:
        return
    _builtins_loading = True
    try:
        importlib.import_module(_BUILTINS)
        _builtins_loaded = True
    finally:
        _builtins_loading = False


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
