"""The commands README.md and benchmarks/README.md show parse: each ``graphopt SUBCOMMAND ...`` with
graphopt's own argparse parser, each ``python benchmarks/SCRIPT.py ...`` with the parser that script
builds (run as ``__main__`` up to its ``parse_args``, which is stopped there: nothing is timed). A flag
renamed or made required in the code, and not in the docs, fails here instead of in a user's shell.

What is checked: every such line of a fenced code block, and every inline code span that is a whole
command (a ``graphopt`` span with a positional argument, a script span with an argument); a span that
only names a command or one of its options (``graphopt bench``, ``graphopt run --no-verify``) is prose.
``<placeholder>`` stands for one argument, ``[--opt X]`` is checked as written without the brackets, and a
command elided with ``...`` is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
_ENV = r"(?:[A-Z_][A-Z0-9_]*=\S+\s+)*"
_COMMAND = re.compile(rf"^{_ENV}(?:python3?\s+)?(graphopt\s+[a-z][a-z-]*|benchmarks/[a-z_0-9]+\.py)(?:\s|$)")


def _commands(doc: Path) -> list[tuple[str, bool]]:
    """``(command, fenced)`` for each command-looking line or span of ``doc``."""
    text = doc.read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#\s.*$", "", line.strip().removeprefix("$ ")).strip()
            if _COMMAND.match(line):
                found.append((line, True))
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        span = " ".join(span.split())
        if _COMMAND.match(span):
            found.append((span, False))
    return found


def _words(command: str) -> list[str]:
    command = re.sub(rf"^{_ENV}", "", command)
    command = re.split(r"\s(?:\||&&|>|2>)\s?", command)[0]
    command = re.sub(r"<[^<>]+>", "PLACEHOLDER", command)
    command = re.sub(r"\[([^\[\]]*)\]", r"\1", command)
    words = shlex.split(command)
    return words[1:] if words[0].startswith("python") else words


def _is_whole(words: list[str], fenced: bool) -> bool:
    if fenced:
        return True
    if words[0] == "graphopt":
        return len(words) > 2 and not words[2].startswith("-")
    return len(words) > 1


class _Parsed(Exception):
    pass


def parse_error(words: list[str]) -> str | None:
    """None when ``words`` parse with the parser of the command they name, else argparse's message."""

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        raise _Parsed(ns)

    err, argv = io.StringIO(), sys.argv
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            mp.setattr(argparse.ArgumentParser, "parse_args", parse_args)
            if words[0] == "graphopt":
                from graphopt.cli import build_parser

                build_parser().parse_args(words[1:])
            else:
                sys.argv = list(words)
                runpy.run_path(str(ROOT / words[0]), run_name="__main__")
    except _Parsed:
        return None
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        return lines[-1] if lines else "exited while parsing"
    finally:
        sys.argv = argv
    return "ran without parsing its arguments"


def _cases() -> list:
    cases = {}
    for doc in DOCS:
        for command, fenced in _commands(doc):
            if "..." in command:
                continue
            words = _words(command)
            if _is_whole(words, fenced):
                cases.setdefault(command, pytest.param(words, id=f"{doc.relative_to(ROOT)}: {command[:60]}"))
    return list(cases.values())


CASES = _cases()


def test_the_docs_show_commands():
    # the extraction finds them (an empty list would pass the test below whatever the docs say)
    assert len(CASES) >= 40, len(CASES)
    assert {c.values[0][0] for c in CASES} >= {"graphopt", "benchmarks/bench_incremental.py"}


@pytest.mark.parametrize("words", CASES)
def test_documented_command_parses(words):
    assert parse_error(words) is None, f"{shlex.join(words)}: {parse_error(words)}"


def test_a_wrong_flag_or_a_missing_required_option_is_caught():
    """Near misses: the check fails where a user's shell would."""
    assert "unrecognized arguments: --no-such-flag" in parse_error(["graphopt", "bench", "bert4rec:tiny", "--no-such-flag"])
    assert "required: -o/--output" in parse_error(["graphopt", "tune", "t5-rec:base", "--budget", "12m"])
    assert "invalid int value" in parse_error(["benchmarks/bench_incremental.py", "--rounds", "many"])
    assert parse_error(["benchmarks/bench_incremental.py", "--rounds", "3"]) is None
