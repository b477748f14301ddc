"""The state an incremental artifact's ``prefill``/``step`` return (:class:`IncrementalState`).

``length`` (events seen per user) and each attention's keys/values of the last
``max_history`` events, batch-major: users can be stored apart and batched
again (:meth:`IncrementalState.select`, :meth:`IncrementalState.cat`), pickled,
deep-copied or ``torch.save``'d (a copy, or a state read back, is checked in
full by the next step, as any state the runner did not return is).

A runner trusts a state it returned itself only while its tensors are as it
returned them: it records each tensor's version counter and checks the state in
full again once any was written in place (``fill_``, ``+=``, ...), or when a
counter cannot be read (tensors made under ``torch.inference_mode()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.errors import RunnerError, first_line

__all__ = ["IncrementalState", "tensor_versions"]


def tensor_versions(tensors: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Each tensor's version counter (bumped by every in-place write), or None where one cannot
    be read (an inference tensor, made under ``torch.inference_mode()``, has none)."""
    try:
        return tuple(t._version for t in tensors.values())
    except (RuntimeError, AttributeError):
        return None


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


@dataclass(frozen=True)
class IncrementalState:
    """The state ``prefill``/``step`` return: named tensors, batch-major."""

    tensors: Mapping[str, torch.Tensor]
    max_history: int
    #: the runner that returned it (its own output is not checked tensor by tensor again while unwritten)
    origin: int | None = field(default=None, compare=False, repr=False)
    #: the most events any user has seen, when the runner that returned it knows (saves a reduction per step)
    events: int | None = field(default=None, compare=False, repr=False)
    #: the tensors' version counters when the runner returned them (see :func:`tensor_versions`)
    versions: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def length(self) -> torch.Tensor:
        """Events seen per user ``(batch,)``: the position of each user's next event."""
        return self.tensors["length"]

    @property
    def batch_size(self) -> int:
        return int(self.length.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def untouched(self) -> bool:
        """Whether no tensor was written in place since the runner returned this state."""
        return self.versions is not None and tensor_versions(self.tensors) == self.versions

    def __reduce__(self) -> tuple[Any, ...]:
        # a plain dict of tensors (a runner's state holds a read-only view, which pickle cannot copy) and the
        # window; what the runner recorded is dropped, so a copy or a state read back is checked in full
        return type(self), (dict(self.tensors), self.max_history)

    def select(self, index: Any) -> IncrementalState:
        """The state of some users (``index`` as in ``tensor[index]``, kept 1-d)."""
        try:
            return IncrementalState({k: t[index].reshape(-1, *t.shape[1:]) for k, t in self.tensors.items()},
                                    self.max_history)
        except (IndexError, TypeError, RuntimeError) as e:
            raise RunnerError(f"IncrementalState.select: index {index!r} does not pick users of this batch of "
                              f"{self.batch_size} ({first_line(e)}); pass user positions in [0, "
                              f"{self.batch_size})") from None

    @classmethod
    def cat(cls, states: Sequence[IncrementalState]) -> IncrementalState:
        """Users of several states in one batch (states of one artifact: the same tensors, dtypes and window)."""
        states = list(states)
        if not states:
            raise RunnerError("IncrementalState.cat: no states given; pass a list of one or more states")
        for i, s in enumerate(states):
            if not isinstance(s, IncrementalState):
                raise RunnerError(f"IncrementalState.cat: item {i} is a {type(s).__name__}, not an IncrementalState; "
                                  "pass the states prefill, step or select returned")
        first = states[0]
        for i, s in enumerate(states[1:], 1):
            why = _difference(first, s)
            if why:
                raise RunnerError(f"IncrementalState.cat: state {i} {why}; batch only states of one artifact "
                                  "(the same max_history and state_dtype)")
        return cls({k: torch.cat([s.tensors[k] for s in states]) for k in first.tensors}, first.max_history)


def _difference(first: IncrementalState, other: IncrementalState) -> str | None:
    """How ``other``'s layout differs from ``first``'s (None: it does not)."""
    if other.max_history != first.max_history:
        return f"has max_history {other.max_history}, state 0 has {first.max_history}"
    names, theirs = list(first.tensors), list(other.tensors)
    for name in (n for n in names if n in other.tensors):  # a codec's dtype first: it says the most
        a, b = first.tensors[name], other.tensors[name]
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return f"'{name}' is a {type(b).__name__} (state 0: a {type(a).__name__}), not a tensor of both"
        if a.dtype != b.dtype or a.dim() != b.dim() or a.shape[1:] != b.shape[1:] or a.device != b.device:
            return (f"'{name}' is {_dtype(b)} {list(b.shape[1:])} per user on {b.device}, state 0's is "
                    f"{_dtype(a)} {list(a.shape[1:])} on {a.device}")
    if set(names) != set(theirs):
        extra = [n for n in theirs if n not in names]
        return (f"holds '{extra[0]}', state 0 does not" if extra else
                f"lacks '{next(n for n in names if n not in theirs)}', which state 0 holds")
    return None
