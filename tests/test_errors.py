"""graphopt.errors: one-line messages, whatever the exception."""

from __future__ import annotations

from graphopt.errors import RunnerError, closest, first_line


def test_first_line_copes_with_empty_multiline_and_ansi_messages():
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(RuntimeError("\n\n  \n")) == "RuntimeError"
    assert first_line(ValueError("\n  bad value\nsecond line")) == "ValueError: bad value"
    assert first_line(RuntimeError("\x1b[0;93mcoloured\x1b[m")) == "RuntimeError: coloured"
    assert first_line(RunnerError("eager | input 'x': expected int64")) == "eager | input 'x': expected int64"
    assert first_line(RuntimeError("x" * 500), with_type=False).endswith("...")
    assert len(first_line(RuntimeError("x" * 500), with_type=False)) == 300


def test_closest_suggests_only_near_names():
    assert closest("remove-dropuot", ["remove-dropout", "dce"]) == " (did you mean 'remove-dropout'?)"
    assert closest("zzz", ["remove-dropout", "dce"]) == ""
