"""graphopt.errors: one-line messages, whatever the exception."""

from __future__ import annotations

import pytest
import torch

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
    # what users call the runtimes (was: 'ort' suggested 'tensorrt')
    assert closest("ort", ["eager", "onnxruntime", "tensorrt"]) == " (did you mean 'onnxruntime'?)"
    assert closest("trt", ["eager", "onnxruntime"]) == ""


class _Lookup(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.e = torch.nn.Embedding(10, 4)

    def forward(self, x):
        return self.e(x)


def test_a_torchscript_failure_gives_its_cause_not_the_interpreters_banner():
    """Was: 'RuntimeError: The following operation failed in the TorchScript interpreter.'"""
    scripted = torch.jit.script(_Lookup().eval())
    with pytest.raises(RuntimeError) as info:
        scripted(torch.tensor([12]))
    assert str(info.value).startswith("The following operation failed in the TorchScript interpreter.")
    assert first_line(info.value) == "RuntimeError: index out of range in self"
    assert first_line(info.value, with_type=False) == "index out of range in self"
