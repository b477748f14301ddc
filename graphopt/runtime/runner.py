"""The one Runner interface every runtime implements (Polygraphy's BaseRunner).

Public methods check the runner's state and validate inputs against the
artifact's input contract, then call the subclass's ``_activate_impl`` /
``_infer_impl`` / ``_deactivate_impl``. Every message starts with the runtime's name.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from graphopt.errors import GraphoptError, RunnerError, first_line
from graphopt.ir.program import InputSpec, bind_inputs, check_inputs
from graphopt.process import keep_freed_memory, quiet_backends
from graphopt.runtime.contract import check_contract

if TYPE_CHECKING:
    from graphopt.runtime.artifact import Artifact

__all__ = ["Runner"]


class Runner:
    """Runs one loaded artifact. Ready to call: the first call loads the backend;
    ``close()`` or a ``with`` block releases it (Polygraphy's BaseRunner)::

        with graphopt.load("out/ort") as runner:
            outputs = runner(input_ids, attention_mask)     # tuple, program order
            named = runner.infer({"input_ids": ids, ...})   # dict by output name

    Public methods check that the runner is active and validate input names,
    dtypes and ranks against the manifest, then call the subclass's
    ``_activate_impl`` / ``_infer_impl`` / ``_deactivate_impl``. Every
    message starts with the runtime's name.
    """

    #: runtime name, e.g. ``onnxruntime``
    name: ClassVar[str] = "runner"

    def __init__(self, artifact: Artifact | None, inputs: Sequence[InputSpec], output_names: Sequence[str],
                 **options: Any):
        self.artifact = artifact
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        self.options = dict(options)
        self.device = "cpu"
        self.is_active = False
        #: serving threads may make their first calls at once: the backend loads once
        self._lock = threading.RLock()
        #: check the manifest's contract (dim ranges and equalities, index ranges) on every call;
        #: callers that validate upstream may set it False
        self.check_contract = True
        manifest = artifact.manifest if artifact is not None else {}
        self._dims = dict(manifest.get("dims") or {})
        self._index_ranges = dict(manifest.get("index_ranges") or {})

    # ------------------------------------------------------------- lifecycle
    def activate(self) -> Runner:
        with self._lock:
            return self._activate()

    def ensure_active(self) -> None:
        """Load the backend unless it is loaded (once, whatever the number of threads asking)."""
        if not self.is_active:
            with self._lock:
                if not self.is_active:  # another thread's first call may have loaded it meanwhile
                    self._activate()

    def _activate(self) -> Runner:
        if self.is_active:
            raise RunnerError(f"{self.name} | runner is already active; deactivate() it first")
        if self.artifact is not None:
            self.artifact.check_unchanged()  # files changed since load() checked them are refused
        keep_freed_memory()  # a serving process: no page faults on each call's buffers (graphopt/process.py)
        try:
            with quiet_backends():
                self._activate_impl()
        except GraphoptError:
            raise
        except Exception as e:  # backend loaders raise many unrelated types
            where = self.artifact.path if self.artifact else "program"
            raise RunnerError(f"{self.name} | could not load {where}: {first_line(e, with_type=False)}; "
                              "re-lower it with this graphopt and torch") from e
        self.is_active = True
        return self

    def deactivate(self) -> None:
        with self._lock:
            if not self.is_active:
                raise RunnerError(f"{self.name} | runner is not active; nothing to deactivate")
            try:
                self._deactivate_impl()
            finally:
                self.is_active = False
                for entry in self.__dict__.pop("_entry_runners", {}).values():  # incremental step entry
                    entry.close()

    def close(self) -> None:
        """Release the backend (sessions, processes, memory) if it is loaded; safe to repeat."""
        with self._lock:
            if self.is_active:
                self.deactivate()

    def __enter__(self) -> Runner:
        return self if self.is_active else self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------- inference
    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """Run with inputs in Program order (or by name); outputs in Program order."""
        self.ensure_active()  # ready to call, like InferenceSession / torch.jit.load
        bound = bind_inputs(self.inputs, args, kwargs, self.name)
        check_inputs(self.inputs, bound, self.name)
        if self.artifact is not None and "incremental" in self.artifact.manifest:  # the prefill: its state
            from graphopt.runtime.incremental import check_history  # needs what prefill() checks

            check_history(self, bound)
        if self.check_contract:
            check_contract(self.inputs, bound, self._dims, self._index_ranges, self.name)
        return _not_aliasing(self.run_checked(bound), bound)

    def run_checked(self, bound: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run inputs already bound in Program order and checked (``__call__`` without its
        checks; the incremental ``step`` checks its state itself)."""
        self.ensure_active()
        try:
            outputs = tuple(self._infer_impl(bound))
        except GraphoptError:
            raise
        except Exception as e:
            raise RunnerError(f"{self.name} | inference failed: {first_line(e, with_type=False)}") from e
        if len(outputs) != len(self.output_names):
            raise RunnerError(
                f"{self.name} | backend returned {len(outputs)} outputs, manifest names "
                f"{len(self.output_names)} ({', '.join(self.output_names)}); re-lower the artifact"
            )
        return outputs

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Polygraphy-style: feed dict by input name -> dict by output name."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if extra:
            raise RunnerError(f"{self.name} | unknown input '{extra[0]}'; inputs are {self.input_names}")
        if missing:
            raise RunnerError(f"{self.name} | missing input '{missing[0]}'; inputs are {self.input_names}")
        outputs = self(*(feeds[n] for n in self.input_names))
        return dict(zip(self.output_names, outputs))

    # ----------------------------------------------------------- incremental
    def prefill(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Artifacts from ``graphopt.lower_incremental``: ``(scores, state)`` of left-padded
        histories (``input_ids, attention_mask``); see :mod:`graphopt.runtime.incremental`."""
        from graphopt.runtime.incremental import prefill

        return prefill(self, *args, **kwargs)

    def step(self, input_ids: torch.Tensor, state: Any) -> tuple[Any, Any]:
        """``(scores, next state)`` after the new events ``input_ids`` (batch, new) of the
        users in ``state``; the given state is refused with one line if it does not fit."""
        from graphopt.runtime.incremental import step

        return step(self, input_ids, state)

    def synchronize(self) -> None:
        """Wait for queued device work (call before reading a timer)."""
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()

    # ----------------------------------------------------------- subclasses
    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        pass

    def __repr__(self) -> str:
        where = self.artifact.path if self.artifact else "in-memory"
        state = "active" if self.is_active else "inactive"
        return f"<{type(self).__name__} {self.name} {where} on {self.device}, {state}>"


def _not_aliasing(outputs: tuple[Any, ...], inputs: Sequence[Any]) -> tuple[Any, ...]:
    """An output that is (a view of) an input comes back as a copy on every runtime: eager,
    TorchScript and Inductor returned the caller's own tensor (writing into the scores changed
    the request), ONNX Runtime a copy. In ``__call__`` only: the incremental ``step`` (which
    calls ``run_checked``) hands its state on as it is, at no cost."""
    held = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    if not held:
        return outputs
    return tuple(o.clone() if isinstance(o, torch.Tensor) and o.numel() and o.untyped_storage().data_ptr() in held
                 else o for o in outputs)
