"""The IR: a captured model as a torch.fx GraphModule plus its input contract.

A :class:`Program` holds the *unlifted* GraphModule of a ``torch.export``
ExportedProgram (``ep.run_decompositions({}).module()``): parameters are
``get_attr`` nodes, so a pass can add, replace or drop weights with plain
attribute edits. Every node keeps ``meta["val"]`` (fake tensors with symbolic
sizes) and ``meta["nn_module_stack"]``. Saving re-exports the GraphModule with
``torch.export`` and writes one ``.pt2`` file with the input contract inside.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import threading
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.errors import ArtifactError, RunnerError, first_line
from graphopt.ir.fx import fetch_attr as _fetch_attr
from graphopt.ir.fx import target_name as _target_name
from graphopt.ir.integrity import is_aoti_package, weights_digest
from graphopt.outputs import usual_mode

__all__ = ["InputSpec", "Program", "bind_inputs", "check_inputs", "positional", "PROGRAM_FORMAT"]

log = logging.getLogger(__name__)

PROGRAM_FORMAT = "graphopt.program/1"
_META_FILE = "graphopt.json"


#: torch.export.load keeps its deserializer in a module global: two threads loading at once
#: (a serving process's first calls) fail with "_CURRENT_DESERIALIZER is already set"
_LOAD_LOCK = threading.Lock()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in saved Program metadata; re-save it")
    return dtype


@dataclass
class InputSpec:
    """Name, dtype, example shape and dynamic dims of one model input.

    ``dynamic`` maps a dim index to a label (``"batch"``, ``"seq"``); labels
    are shared across inputs, so ``sample(batch=1, seq=64)`` resizes every
    input consistently. ``low``/``high`` bound random integer inputs
    (``high`` exclusive); float inputs are drawn from a standard normal.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    dynamic: dict[int, str] = field(default_factory=dict)
    low: int | None = None
    high: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = _dtype_name(self.dtype)
        d["shape"] = list(self.shape)
        d["dynamic"] = {str(k): v for k, v in self.dynamic.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> InputSpec:
        return cls(
            name=d["name"],
            dtype=_dtype_from_name(d["dtype"]),
            shape=tuple(d["shape"]),
            dynamic={int(k): v for k, v in d.get("dynamic", {}).items()},
            low=d.get("low"),
            high=d.get("high"),
        )

    def sample(self, sizes: Mapping[str, int], generator: torch.Generator) -> torch.Tensor:
        shape = [sizes.get(self.dynamic.get(i, ""), s) for i, s in enumerate(self.shape)]
        if self.dtype.is_floating_point:
            return torch.randn(shape, generator=generator).to(self.dtype)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=generator).bool()
        low = 0 if self.low is None else self.low
        high = (low + 2) if self.high is None else self.high
        return torch.randint(low, high, shape, generator=generator, dtype=self.dtype)


def bind_inputs(
    specs: Sequence[InputSpec], args: Sequence[Any], kwargs: Mapping[str, Any], runtime: str
) -> list[Any]:
    """Positional + keyword inputs -> one positional list in ``specs`` order."""
    if not kwargs or len(args) > len(specs):
        return list(args)  # check_inputs reports a wrong count
    names = [s.name for s in specs]
    bound: list[Any] = list(args) + [None] * (len(specs) - len(args))
    for key, value in kwargs.items():
        if key not in names:
            raise RunnerError(f"{runtime} | unknown input '{key}'; inputs are {names}")
        index = names.index(key)
        if index < len(args):
            raise RunnerError(f"{runtime} | input '{key}' given both by position and by name")
        bound[index] = value
    for name, value in zip(names, bound):
        if value is None:
            raise RunnerError(f"{runtime} | missing input '{name}'; inputs are {names}")
    return bound


def positional(batch: Any, input_names: Sequence[str] | None, where: str) -> tuple[torch.Tensor, ...]:
    """One batch as a positional tuple: a dict in ``input_names`` order where given (an unknown or
    missing name is a one-line error naming ``where``, never a silent reorder), else in its own order."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if not isinstance(batch, Mapping):
        return tuple(batch)
    if input_names is None:
        return tuple(batch.values())
    unknown = [k for k in batch if k not in input_names]
    missing = [n for n in input_names if n not in batch]
    if unknown or missing:
        what = f"unknown input '{unknown[0]}'" if unknown else f"missing input '{missing[0]}'"
        raise RunnerError(f"{where}: {what}; the model's inputs are {list(input_names)}")
    return tuple(batch[n] for n in input_names)


def check_inputs(specs: Sequence[InputSpec], args: Sequence[Any], runtime: str) -> None:
    """Validate count, names' dtypes and ranks; raise ``RunnerError`` naming the runtime."""
    if len(args) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise RunnerError(f"{runtime} | expected {len(specs)} inputs ({names}), got {len(args)}")
    for spec, value in zip(specs, args):
        if not isinstance(value, torch.Tensor):
            how = "torch.from_numpy(x)" if type(value).__module__ == "numpy" else "torch.tensor(x)"
            raise RunnerError(
                f"{runtime} | input '{spec.name}': expected a tensor, got {type(value).__name__}; pass {how}"
            )
        if value.is_meta:
            raise RunnerError(f"{runtime} | input '{spec.name}': a meta tensor holds no values; pass real tensors")
        if value.dtype != spec.dtype:
            raise RunnerError(
                f"{runtime} | input '{spec.name}': expected {_dtype_name(spec.dtype)}, "
                f"got {_dtype_name(value.dtype)}; convert it with .to(torch.{_dtype_name(spec.dtype)})"
            )
        if value.dim() != len(spec.shape):
            raise RunnerError(
                f"{runtime} | input '{spec.name}': expected rank {len(spec.shape)} "
                f"(shape like {list(spec.shape)}), got shape {list(value.shape)}"
            )
        for dim, size in enumerate(spec.shape):
            if dim not in spec.dynamic and value.shape[dim] != size:
                fix = ("the example had that size, which torch.export captures as a constant: capture with an "
                       "example of size >= 2 in that dim to vary it") if size <= 1 else \
                    "capture with that dim dynamic to vary it"
                raise RunnerError(
                    f"{runtime} | input '{spec.name}': dim {dim} is static ({size}), "
                    f"got {value.shape[dim]}; {fix}"
                )


class Program:
    """A captured model: GraphModule + input/output contract + provenance.

    Call it like the model: ``program(input_ids, attention_mask)`` returns a
    tuple of tensors named by ``output_names``.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[InputSpec],
        output_names: Sequence[str],
        *,
        name: str = "model",
        example_inputs: Sequence[torch.Tensor] | None = None,
        pipeline: str = "",
        meta: Mapping[str, Any] | None = None,
    ):
        self.gm = gm
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        self.name = name
        self.example_inputs = tuple(example_inputs) if example_inputs is not None else None
        self.pipeline = pipeline
        self.meta: dict[str, Any] = dict(meta or {})

    # ---------------------------------------------------------------- running
    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        bound = bind_inputs(self.inputs, args, kwargs, "eager")
        check_inputs(self.inputs, bound, "eager")
        with torch.no_grad():
            out = self.gm(*bound)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    run = __call__

    def sample_inputs(
        self, batch: int | None = None, seq: int | None = None, seed: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """Seeded random inputs; ``batch``/``seq`` resize the dims labelled so."""
        if batch is None and seq is None and self.example_inputs is not None:
            return self.example_inputs
        sizes = {k: v for k, v in (("batch", batch), ("seq", seq)) if v is not None}
        gen = torch.Generator().manual_seed(seed)
        return tuple(spec.sample(sizes, gen) for spec in self.inputs)

    def dynamic_labels(self) -> set[str]:
        return {label for s in self.inputs for label in s.dynamic.values()}

    # ------------------------------------------------------------ inspection
    def op_histogram(self) -> Counter[str]:
        """Counts of call_function targets, e.g. ``{"aten.linear.default": 14}``."""
        return Counter(
            _target_name(n.target) for n in self.gm.graph.nodes if n.op == "call_function"
        )

    def fingerprint(self) -> str:
        """SHA-256 of the computation: the generated code, inputs, outputs and the bytes of every
        weight the graph reads. Equal fingerprints: the same Program (a caller can keep the digest
        instead of the Program; hashing reads the weights once, ~0.3 s per 400 MB)."""
        digest = hashlib.sha256(self.gm.code.encode())
        digest.update(json.dumps([[s.to_json() for s in self.inputs], list(self.output_names)],
                                 default=str).encode())
        for name, value in sorted(self.parameter_tensors().items()):
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def parameter_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the graph actually reads through ``get_attr`` (deduplicated)."""
        out: dict[str, torch.Tensor] = {}
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and n.users:  # a dead get_attr reads nothing
                value = _fetch_attr(self.gm, n.target)
                if isinstance(value, torch.Tensor):
                    out[n.target] = value
        return out

    def num_parameters(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self.parameter_tensors().values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        return total

    def parameter_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self.parameter_tensors().values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": list(self.output_names),
            "parameters": self.num_parameters(),
            "parameter_bytes": self.parameter_bytes(),
            "nodes": len(self.gm.graph.nodes),
            "pipeline": self.pipeline,
            "ops": dict(sorted(self.op_histogram().items())),
        }

    def copy(self) -> Program:
        """A deep copy: passes on the copy never touch this Program's weights."""
        return Program(
            copy.deepcopy(self.gm),
            copy.deepcopy(self.inputs),
            self.output_names,
            name=self.name,
            example_inputs=self.example_inputs,
            pipeline=self.pipeline,
            meta=copy.deepcopy(self.meta),
        )

    # ------------------------------------------------------------ persistence
    def export(self) -> torch.export.ExportedProgram:
        """Re-export the (possibly rewritten) GraphModule with torch.export."""
        args = self.sample_inputs()
        dims = tuple(
            {d: torch.export.Dim.AUTO for d in spec.dynamic} or None for spec in self.inputs
        )
        with torch.no_grad():  # as capture traced: kernels (SDPA's) pick the same output layouts
            return torch.export.export(self.gm, tuple(args), dynamic_shapes=dims, strict=False)

    def _meta_json(self) -> str:
        return json.dumps(
            {
                "format": PROGRAM_FORMAT,
                "name": self.name,
                "inputs": [s.to_json() for s in self.inputs],
                "outputs": self.output_names,
                "pipeline": self.pipeline,
                "meta": self.meta,
                "torch": torch.__version__,
                "weights_sha256": weights_digest(self.parameter_tensors().values()),
            }
        )

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write ``path`` (a ``.pt2`` file) atomically; refuse to overwrite unless ``force``."""
        path = Path(path)
        if path.exists() and not force:
            raise ArtifactError(f"{path} exists; pass force=True (--force) to overwrite it")
        ep = self.export()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            usual_mode(tmp)  # not mkstemp's 0600: a stage file copied to another host must be readable
            torch.export.save(ep, tmp, extra_files={_META_FILE: self._meta_json()})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Program:
        path = Path(path)
        if path.is_dir():
            path = path / "program.pt2"
        if not path.is_file():
            raise ArtifactError(f"no saved Program at {path}; write one with `graphopt optimize -o`")
        extra = {_META_FILE: ""}
        try:
            with _LOAD_LOCK:
                ep = torch.export.load(str(path), extra_files=extra)
        except (RuntimeError, zipfile.BadZipFile, KeyError, ValueError, EOFError) as e:
            if is_aoti_package(path):
                raise ArtifactError(f"{path} is an AOTInductor package (a lowered artifact), not a saved Program; "
                                    "run its folder with `graphopt run`, or inspect OUT/program.pt2") from None
            raise ArtifactError(
                f"{path} is not a readable torch.export archive ({first_line(e, with_type=False)}); re-create it"
            ) from None
        if not extra[_META_FILE]:
            raise ArtifactError(f"{path} was not written by graphopt (no {_META_FILE} inside)")
        meta = json.loads(extra[_META_FILE])
        if meta.get("format") != PROGRAM_FORMAT:
            raise ArtifactError(
                f"{path} has format {meta.get('format')!r}, this graphopt reads {PROGRAM_FORMAT!r}"
            )
        inputs = [InputSpec.from_json(d) for d in meta["inputs"]]
        example = None
        if ep.example_inputs is not None:
            args, _ = ep.example_inputs
            example = tuple(args)
        program = cls(
            ep.module(),
            inputs,
            meta["outputs"],
            name=meta["name"],
            example_inputs=example,
            pipeline=meta.get("pipeline", ""),
            meta=meta.get("meta", {}),
        )
        saved = meta.get("weights_sha256")  # absent in Programs saved before it was written
        if saved and weights_digest(program.parameter_tensors().values()) != saved:
            raise ArtifactError(f"{path} is damaged: its weights do not match the checksum saved with them; "
                                "re-create it")
        return program

    def __repr__(self) -> str:
        return (
            f"Program({self.name!r}, inputs={self.input_names}, outputs={self.output_names}, "
            f"nodes={len(self.gm.graph.nodes)}, params={self.num_parameters()})"
        )


