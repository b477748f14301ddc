"""One exception hierarchy for everything a user can trigger.

Every message says what failed, where, and what to do next, on one line, so the
CLI can print it without a traceback.
"""

from __future__ import annotations

__all__ = [
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
]


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
