"""One exception hierarchy for everything a user can trigger.

Every message says what failed, where, and what to do next, on one line, so the
CLI can print it without a traceback.
"""

from __future__ import annotations

import difflib
import re

__all__ = [
    "first_line",
    "closest",
    "GraphoptError",
    "PipelineParseError",
    "PassOptionError",
    "CaptureError",
    "PreconditionError",
    "PostconditionError",
    "PassFailedError",
    "ModelNotFoundError",
    "ArtifactError",
    "LoweringError",
    "RunnerError",
    "BackendUnavailableError",
    "Terminated",
]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


_TORCHSCRIPT_BANNER = "The following operation failed in the TorchScript interpreter."


def first_line(e: BaseException, *, with_type: bool | None = None, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, at most ``limit`` characters
    (of a TorchScript interpreter failure, whose first line is a banner, the last: its cause).

    Copes with empty messages and terminal colour codes. ``with_type`` prefixes
    the exception's class name; by default it does so for foreign exceptions
    (a backend's ``RuntimeError``) but not for graphopt's own, whose messages
    already say what failed.
    """
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if text.startswith(_TORCHSCRIPT_BANNER):  # the cause is the last line: "RuntimeError: index out of range"
        text = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if with_type is None:
        with_type = not isinstance(e, GraphoptError)
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if with_type else text


#: what users call the runtimes (ONNX Runtime is "ort" in its own docs)
_ABBREVIATIONS = {"ort": "onnxruntime", "trt": "tensorrt", "ts": "torchscript", "jit": "torchscript",
                  "aoti": "inductor", "compile": "inductor"}


def closest(word: str, candidates: list[str]) -> str:
    """' (did you mean 'x'?)' or '' — the suffix of an unknown-name error."""
    short = _ABBREVIATIONS.get(word.lower())
    if short in candidates:
        return f" (did you mean '{short}'?)"
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class PipelineParseError(GraphoptError):
    """Bad pipeline text: names the column and the closest valid name."""

    def __init__(self, message: str, text: str = "", column: int | None = None):
        self.text = text
        self.column = column
        self.reason = message
        if column is not None:
            message = f"pipeline column {column}: {message}"
        super().__init__(message)

    def pointer(self) -> str:
        """The pipeline text with a caret under the offending column."""
        if self.column is None or not self.text:
            return ""
        return f"  {self.text}\n  {' ' * (self.column - 1)}^"


class PassOptionError(PipelineParseError):
    """An option that a pass does not have, or a value it does not accept."""


class CaptureError(GraphoptError):
    """torch.export could not capture the model."""


class PreconditionError(GraphoptError):
    """A pass's requirement is not met by the Program it is given."""


class PostconditionError(GraphoptError):
    """A pass produced a Program that breaks its own contract."""


class PassFailedError(GraphoptError):
    """A pass raised; names the pass and the passes that ran before it."""


class ModelNotFoundError(GraphoptError):
    """A model name or path that graphopt cannot resolve."""


class ArtifactError(GraphoptError):
    """A saved Program or artifact that is missing, corrupted or mismatched."""


class LoweringError(GraphoptError):
    """A backend could not lower a Program."""


class RunnerError(GraphoptError):
    """A runner refused its inputs or failed to run."""


class BackendUnavailableError(GraphoptError):
    """An optional backend package or device is not present."""


class Terminated(BaseException):
    """SIGTERM, raised where the process is (the ``graphopt`` command installs the handler) so that
    context managers clean up and long runs (``graphopt tune``) write what they finished; not an
    Exception, like KeyboardInterrupt."""
