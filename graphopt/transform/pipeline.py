"""Pipeline text, MLIR-style: ``step(,step)*`` with ``step = name{key=value ...}``.

``parse_pipeline("remove-dropout,cast{dtype=bf16}")`` returns a
:class:`Pipeline` of constructed passes; every error (syntax, unknown pass or
option, bad value) is raised here, before anything runs, with the column.
``str(pipeline)`` is canonical (every option, defaults included, keys sorted)
and ``parse_pipeline(str(p)) == p``. Presets (``O1``) expand in place.

Names and option keys are ASCII (a pasted ``‐`` or ``，`` is named, with its
column); a value runs to the next space or brace, so there is no space after
``=`` and no quoting (``key=`` alone is an empty value: an empty list or word).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from graphopt.errors import PassOptionError, PipelineParseError, closest
from graphopt.transform.base import Pass, available_passes, available_presets

__all__ = ["Pipeline", "parse_pipeline"]

_WORD = re.compile(r"[A-Za-z0-9_\-.]+")
_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe63\uff0d"


@dataclass(frozen=True)
class Pipeline:
    """An ordered tuple of constructed passes."""

    passes: tuple[Pass, ...]

    def __str__(self) -> str:
        return ",".join(p.step_text() for p in self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.passes)

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline(self.passes + other.passes)

    @classmethod
    def of(cls, passes: Iterable[Pass]) -> Pipeline:
        return cls(tuple(passes))


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def error(self, message: str, at: int | None = None) -> PipelineParseError:
        return PipelineParseError(message, self.text, (self.i if at is None else at) + 1)

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def check_ascii(self) -> None:
        """A non-ASCII character here (a pasted dash or comma) is named, not taken as the end of a word."""
        ch = self.peek()
        if ch and not ch.isascii():
            ascii_twin = "-" if ch in _DASHES else unicodedata.normalize("NFKC", ch)
            hint = f"; type {ascii_twin!r}" if ascii_twin.isascii() and ascii_twin.isprintable() else ""
            raise self.error(
                f"character {ch!r} (U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}) is not ASCII{hint}"
            )

    def word(self, what: str) -> tuple[str, int]:
        self.skip_ws()
        self.check_ascii()
        m = _WORD.match(self.text, self.i)
        if not m:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {what}, found {found}")
        self.i = m.end()
        self.check_ascii()
        return m.group(0), m.start()

    def value(self, key: str) -> tuple[str, int]:
        """The characters up to whitespace or a brace; may be empty (an empty list or word)."""
        start = self.i
        if self.peek() in ("'", '"'):
            end = self.text.find(self.peek(), start + 1)
            inner = self.text[start + 1:end] if end > start else ""
            fix = f"write {key}={inner}" if inner and not any(c.isspace() or c in "{}" for c in inner) \
                else "a value cannot hold spaces or braces (a list is a,b,c)"
            raise self.error(f"quotes are not supported in pipeline text: {fix}")
        if self.peek().isspace():  # 'key= value' or 'key = value'; 'key= other=1' is an empty value
            m = _WORD.match(self.text, len(self.text) - len(self.text[self.i:].lstrip()))
            after = self.text[m.end():].lstrip()[:1] if m else ""
            if m and after != "=":
                raise self.error(f"no space after '=': write {key}={m.group(0)}")
        while self.i < len(self.text) and not self.text[self.i].isspace() and self.text[self.i] not in "{}":
            self.i += 1
        if self.peek() == "{":
            raise self.error("'{' is not allowed inside an option value")
        return self.text[start:self.i], start


def _parse_options(sc: _Scanner, pass_name: str) -> dict[str, tuple[str, int]]:
    opened = sc.i
    sc.i += 1  # '{'
    opts: dict[str, tuple[str, int]] = {}
    while True:
        sc.skip_ws()
        if sc.peek() == "}":
            sc.i += 1
            return opts
        if not sc.peek():
            raise sc.error(f"unclosed '{{' of '{pass_name}' opened at column {opened + 1}", opened)
        key, key_at = sc.word("an option name")
        sc.skip_ws()
        if sc.peek() != "=":
            raise sc.error(f"option '{key}' of '{pass_name}' needs a value: {key}=VALUE")
        sc.i += 1
        value, _ = sc.value(key)
        if key in opts:
            raise sc.error(f"option '{key}' given twice for '{pass_name}'", key_at)
        opts[key] = (value, key_at)


def _construct(cls: type[Pass], opts: dict[str, tuple[str, int]], sc: _Scanner, at: int) -> Pass:
    try:
        return cls(**{k: v for k, (v, _) in opts.items()})
    except PassOptionError as e:
        # point at the option the message names, else at the pass
        col = at
        for key, (_, key_at) in opts.items():
            if f"option '{key}'" in e.reason:
                col = key_at
        raise PassOptionError(e.reason, sc.text, col + 1) from None


def parse_pipeline(text: str | Pipeline | Sequence[Pass]) -> Pipeline:
    """Parse pipeline text (or pass through a Pipeline / list of passes)."""
    if isinstance(text, Pipeline):
        return text
    if not isinstance(text, str):
        return Pipeline.of(text)
    passes = available_passes()
    presets = available_presets()
    sc = _Scanner(text)
    steps: list[Pass] = []
    sc.skip_ws()
    if not sc.peek():
        return Pipeline(())
    while True:
        name, at = sc.word("a pass name")
        sc.skip_ws()
        opts = _parse_options(sc, name) if sc.peek() == "{" else {}
        if name in presets:
            if opts:
                raise sc.error(f"preset '{name}' takes no options; spell out its passes instead", at)
            steps.extend(parse_pipeline(presets[name][0]).passes)
        elif name in passes:
            steps.append(_construct(passes[name], opts, sc, at))
        else:
            raise PipelineParseError(
                f"unknown pass '{name}'{closest(name, list(passes) + list(presets))}; "
                "`graphopt passes` lists them",
                text,
                at + 1,
            )
        sc.skip_ws()
        if not sc.peek():
            return Pipeline(tuple(steps))
        if sc.peek() != ",":
            raise sc.error(f"expected ',' or end of pipeline, found {sc.peek()!r}")
        sc.i += 1
