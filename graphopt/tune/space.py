"""The search space of ``graphopt tune``: candidates and the knobs they turn.

A :class:`Candidate` is one deployable configuration: which O2 fusions run
(after the O1 cleanup), one precision step, optional embedding bits and
pruning, the runtime, its lowering and load options, and the thread count.
Its :attr:`Candidate.pipeline` is ordinary pipeline text.

The knobs are read from the registries when the space is built, never
hard-coded: the fusions are the passes ``O2`` adds to ``O1``; the bf16
policies are every non-default value of every ``cast`` option that has
choices (and the ``keep`` list with the scoring head added), so an option a
later change adds to ``cast`` shows up here; the int8 variants are the
``quantize-int8`` calibration methods and other choice/bool options; the
runtime options are the backends' lowering and load options of type bool or
with choices, minus those that do not change speed (:data:`NOT_TUNED`).
Keep-float sets are symbolic (``keep_float=k``: the first k layers of the
precision family's sensitivity ranking, int8's or bf16's) and resolved into a
``skip=`` list when built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache, cached_property
from typing import Any

import torch

from graphopt.bench.pipelines import NO_BF16_KERNELS, split_bf16
from graphopt.options import Option
from graphopt.runtime import get_runtime
from graphopt.transform.base import available_passes, get_preset

__all__ = [
    "Candidate",
    "Space",
    "build_space",
    "default_candidates",
    "reference_candidate",
    "precision_family",
    "NOT_TUNED",
    "EMBEDDING_BITS",
    "keeps_layers_float",
]

#: runtime options that select hardware, files or orchestration, not speed
NOT_TUNED = frozenset({
    "device", "providers", "use_optimized", "save_optimized", "optimized_model_path", "spin", "check",
    "keep_onnx", "timing_cache", "workspace_mb", "profile", "opset", "launch", "master_addr", "master_port",
    "timeout", "join_timeout", "microbatches", "stages", "fp16",
})
#: options of the precision passes the tuner leaves at their defaults (guards, bounds, layer lists)
_PASS_NOT_TUNED = frozenset({"max_drop", "metric", "skip", "reduce_range", "percentile", "bins", "dtype", "io"})
#: bits of quantize-embeddings the tuner tries
EMBEDDING_BITS = (8, 4)
#: runner options that set a thread count, by the name a runtime declares
_THREAD_OPTIONS = ("threads", "intra_op_threads", "num_threads")


@dataclass(frozen=True)
class Candidate:
    """One configuration to try.

    ``fusions`` None means the unoptimized Program (no pass at all); a tuple
    is O1 plus those of O2's fusions. ``precision`` is a pipeline step (""
    = fp32); ``keep_float`` keeps that many of the most sensitive linears in
    float (resolved to ``skip=`` by :meth:`resolved_pipeline`).
    """

    fusions: tuple[str, ...] | None = ()
    precision: str = ""
    keep_float: int = 0
    embeddings: str = ""
    prune: str = ""
    runtime: str = "eager"
    lower: tuple[tuple[str, str], ...] = ()
    load: tuple[tuple[str, str], ...] = ()
    threads: int | None = None
    tags: tuple[str, ...] = field(default=(), compare=False)

    # ------------------------------------------------------------ text
    @cached_property
    def key(self) -> str:
        """Stable identity: the pipeline (keep-float symbolic), runtime and options."""
        opts = " ".join(f"{k}={v}" for k, v in (*self.lower, *self.load))
        threads = f" threads={self.threads}" if self.threads else ""
        return f"{self.pipeline_template} @ {self.runtime}" + (f" [{opts}{threads}]" if opts or threads else "")

    @property
    def pipeline_template(self) -> str:
        """The pipeline with ``keep_float`` shown symbolically (``keep-float=2``)."""
        precision = self.precision
        if self.keep_float and precision:
            precision = f"{precision} (keep-float={self.keep_float})"
        return _join(self._front(), precision, self.embeddings) or "none"

    def resolved_pipeline(self, ranking: Sequence[str] = ()) -> str:
        """Pipeline text, with the ``keep_float`` most sensitive layers of ``ranking`` in ``skip=``."""
        return _join(self._front(), _with_skip(self.precision, list(ranking[: self.keep_float])), self.embeddings)

    @property
    def pipeline(self) -> str:
        """Pipeline text without keep-float layers (they need the sensitivity ranking)."""
        return self.resolved_pipeline(())

    def _front(self) -> str:
        if self.fusions is None:
            return ""
        fusions = list(self.fusions)
        all_fusions = o2_fusions()
        if set(fusions) == set(all_fusions):
            base = "O2"
        elif fusions:
            base = ",".join(["O1", *[f for f in all_fusions if f in fusions], "cse", "dce"])
        else:
            base = "O1"
        return _join(self.prune, base)

    @property
    def family(self) -> str:
        return precision_family(self.precision)

    @property
    def options(self) -> dict[str, Any]:
        return {"lower": dict(self.lower), "load": dict(self.load), "threads": self.threads}

    # ------------------------------------------------------------ moves
    def but(self, **changes: Any) -> Candidate:
        """A copy with fields replaced (tags are dropped unless given)."""
        changes.setdefault("tags", ())
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fusions"] = list(self.fusions) if self.fusions is not None else None
        d["lower"], d["load"] = dict(self.lower), dict(self.load)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Candidate:
        return cls(
            fusions=tuple(d["fusions"]) if d.get("fusions") is not None else None,
            precision=d.get("precision", ""), keep_float=int(d.get("keep_float", 0)),
            embeddings=d.get("embeddings", ""), prune=d.get("prune", ""), runtime=d["runtime"],
            lower=tuple(sorted((k, str(v)) for k, v in d.get("lower", {}).items())),
            load=tuple(sorted((k, str(v)) for k, v in d.get("load", {}).items())),
            threads=d.get("threads"), tags=tuple(d.get("tags", ())),
        )


def _join(*steps: str) -> str:
    return ",".join(s for s in steps if s)


def _with_skip(step: str, layers: list[str]) -> str:
    if not layers or not step:
        return step
    skip = "skip=" + ",".join(layers)
    if step.endswith("}"):
        return step[:-1] + " " + skip + "}"
    return step + "{" + skip + "}"


def precision_family(step: str) -> str:
    """``fp32``, ``bf16``/``fp16`` (cast), ``int8`` (static), ``int8-dynamic``."""
    if not step:
        return "fp32"
    name = step.split("{", 1)[0]
    if name == "cast":
        return "fp16" if "dtype=fp16" in step else "bf16"
    if name == "quantize-int8":
        return "int8"
    if name == "quantize-int8-dynamic":
        return "int8-dynamic"
    return name


def keeps_layers_float(step: str) -> bool:
    """Whether the precision step's pass takes a ``skip=`` list of layers (keep-float sets apply)."""
    cls = available_passes().get(step.split("{", 1)[0]) if step else None
    return cls is not None and any(o.name == "skip" for o in cls.options)


def o2_fusions() -> list[str]:
    """The passes O2 adds to O1, in O2's order, without its trailing cse/dce."""
    return list(_fusions_of(get_preset("O1") or "", get_preset("O2") or ""))


@cache
def _fusions_of(o1_text: str, o2_text: str) -> tuple[str, ...]:
    o1 = set(o1_text.split(","))
    seen: list[str] = []
    for name in o2_text.split(","):
        if name and name not in o1 and name not in ("cse", "dce") and name not in seen:
            seen.append(name)
    return tuple(seen)


# ------------------------------------------------------------------ the space
def _step(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return name + "{" + " ".join(f"{k}={v}" for k, v in options.items()) + "}"


def _option_variants(name: str, options: Iterable[Option], base: dict[str, Any]) -> list[str]:
    """``name{base}`` then one step per non-default value of each tunable option (one at a time)."""
    steps = [_step(name, base)]
    for opt in options:
        if opt.name in _PASS_NOT_TUNED or opt.name in base:
            continue
        values: list[Any] = []
        if opt.choices:
            values = [c for c in opt.choices if c != opt.default]
        elif opt.type is bool:
            values = [not opt.default]
        elif opt.type is list and opt.name == "keep" and (opt.check is None or opt.check(("score",)) is None):
            values = [",".join((*opt.default, "score"))] if "score" not in opt.default else []
        for v in values:
            steps.append(_step(name, {**base, opt.name: opt.format(v) if not isinstance(v, str) else v}))
    return steps


@dataclass
class Space:
    """Everything the strategies may combine. Built by :func:`build_space`."""

    runtimes: list[str]
    fusions: list[str]
    bf16: list[str]
    int8: list[str]
    int8_dynamic: list[str]
    embeddings: list[str]
    keep_float: list[int]
    prune: list[str]
    runtime_options: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]]
    threads: list[int | None]
    #: what was left out of the space and why (the report and the progress say it)
    notes: list[str] = field(default_factory=list)

    def precisions(self) -> list[str]:
        return ["", *self.bf16, *self.int8, *self.int8_dynamic]

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _runtime_option_moves(runtime: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """("lower"|"load", ((name, value),)) for each non-default value of each tunable option."""
    backend = get_runtime(runtime)
    moves: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for where, options in (("lower", backend.lower_options), ("load", backend.runner_options)):
        for opt in options:
            if opt.name in NOT_TUNED or opt.name in _THREAD_OPTIONS or opt.name.endswith("_threads"):
                continue
            if opt.choices:
                values = [c for c in opt.choices if c != opt.default]
            elif opt.type is bool:
                values = [True, False] if opt.default is None else [not opt.default]  # None: decided per Program
            else:
                continue
            moves += [(where, ((opt.name, opt.format(v)),)) for v in values]
    return moves


def thread_option(runtime: str) -> str | None:
    """The runner option of ``runtime`` that sets its thread count, if it has one."""
    declared = {o.name for o in get_runtime(runtime).runner_options}
    return next((n for n in _THREAD_OPTIONS if n in declared), None)


def build_space(
    runtimes: Sequence[str],
    *,
    prune_ratios: Sequence[float] = (),
    max_keep_float: int = 8,
    cores: int | None = None,
    bf16_kernels: bool | None = None,
) -> Space:
    """The space for these runtimes, read from the pass and runtime registries. On a CPU without
    bf16 GEMM kernels (and no GPU) the bf16 casts and int8-mixed-bf16 are left out, with a note
    (``bf16_kernels`` overrides the CPU's answer): oneDNN runs them as reference code there
    (t5-rec:base, batch 32, AMD EPYC with AVX2 only: cast{dtype=bf16} @ inductor 0.48x eager, 69 s
    of a 12-minute budget), as ``graphopt bench`` leaves them out of its defaults."""
    passes = available_passes()
    fusions = [f for f in o2_fusions() if f in passes]
    cast = passes.get("cast")
    bf16: list[str] = []
    if cast is not None:
        dtypes = ["bf16"] + (["fp16"] if torch.cuda.is_available() else [])
        for dtype in dtypes:
            bf16 += _option_variants("cast", cast.options, {"dtype": dtype})
        bf16[0] = "cast{dtype=bf16}"
    int8: list[str] = []
    if "quantize-int8" in passes:
        options = passes["quantize-int8"].options
        calibration = next((o for o in options if o.name == "calibration"), None)
        methods = (calibration.choices or (calibration.default,)) if calibration else ("minmax",)
        default = calibration.default if calibration else "minmax"
        int8 = [_step("quantize-int8", {} if m == default else {"calibration": m}) for m in methods]
        int8 += [s for s in _option_variants("quantize-int8", options, {})[1:] if "calibration=" not in s]
    int8_dynamic = _option_variants("quantize-int8-dynamic", passes["quantize-int8-dynamic"].options, {}) \
        if "quantize-int8-dynamic" in passes else []
    embeddings = [f"quantize-embeddings{{bits={b}}}" for b in EMBEDDING_BITS] if "quantize-embeddings" in passes else []
    prune = [f"{p}{{ratio={r:g}}}" for r in prune_ratios for p in ("prune-ffn", "prune-heads") if p in passes]
    keep = [k for k in (1, 2, 4, 8, 16) if k <= max_keep_float]
    cores = cores or os.cpu_count() or 1
    threads: list[int | None] = [None] + ([1] if cores > 1 else [])
    notes: list[str] = []
    if not torch.cuda.is_available():
        bf16, cast_left = split_bf16(bf16, lambda step: "dtype=bf16" in step, bf16_kernels)
        int8, mixed_left = split_bf16(int8, lambda step: "mixed=bf16" in step, bf16_kernels)
        if cast_left or mixed_left:
            notes.append(f"{len(cast_left)} bf16 cast(s) and {len(mixed_left)} int8-mixed-bf16 setting(s) not "
                         f"tried: {NO_BF16_KERNELS}")
    return Space(
        runtimes=list(runtimes), fusions=fusions, bf16=bf16, int8=int8, int8_dynamic=int8_dynamic,
        embeddings=embeddings, keep_float=keep, prune=prune,
        runtime_options={rt: _runtime_option_moves(rt) for rt in runtimes}, threads=threads, notes=notes,
    )


# ------------------------------------------------------------------ fixed points
def reference_candidate() -> Candidate:
    """The unoptimized Program on eager: the first trial, the floor of keep-best."""
    return Candidate(fusions=None, runtime="eager", tags=("reference",))


def default_candidates(space: Space) -> list[Candidate]:
    """The hand-written defaults (``graphopt bench``'s pipelines: O2, O2+bf16, O2+int8, O2+int8-mixed-bf16)
    on every runtime, precision-major (each runtime's O2 first), so a tight budget still sees every runtime."""
    all_fusions = tuple(space.fusions)
    precisions = ["", "cast{dtype=bf16}" if "cast{dtype=bf16}" in space.bf16 else None,
                  "quantize-int8" if "quantize-int8" in space.int8 else None,
                  "quantize-int8{mixed=bf16}" if "quantize-int8{mixed=bf16}" in space.int8 else None]
    return [Candidate(fusions=all_fusions, precision=p, runtime=rt, tags=("default",))
            for p in precisions if p is not None for rt in space.runtimes]
