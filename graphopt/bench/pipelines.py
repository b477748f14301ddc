"""Which pipelines the bench runs and what it calls them: ``label=pipeline text``
specs, the default pipelines (plus ``Os`` for embedding-dominated models), and
the rule that leaves the bf16 ones out where the CPU has no bf16 GEMM kernels
(shared with the peers and the tuner's search space)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.errors import PipelineParseError
from graphopt.ir.program import Program

__all__ = [
    "PipelineSpec",
    "parse_pipeline_spec",
    "check_unique_labels",
    "DEFAULT_PIPELINES",
    "SIZE_PIPELINE",
    "EMBEDDING_DOMINATED",
    "BF16_LABELS",
    "NO_BF16_KERNELS",
    "default_pipelines",
    "embedding_share",
    "split_bf16",
    "without_bf16",
]

#: label=pipeline text; the ones whose passes are not in this build are reported as skipped.
#: int8-bf16 is int8-mixed-bf16 (graphopt.passlib.int8_mixed): the fast int8 form for Inductor on
#: CPUs with bf16 (ONNX Runtime refuses it: no bf16 CPU kernels); int8 is the portable one
DEFAULT_PIPELINES = ("O2", "bf16=O2,cast{dtype=bf16}", "int8=O2,quantize-int8",
                     "int8-bf16=O2,quantize-int8{mixed=bf16}")
#: added to the defaults for embedding-dominated models: 8-bit tables + int8 weights
SIZE_PIPELINE = "Os=Os"
#: share of parameter bytes in embedding tables above which a model is embedding-dominated
EMBEDDING_DOMINATED = 0.5

_LOOKUPS = (torch.ops.aten.embedding.default, torch.ops.aten.embedding_bag.default,
            torch.ops.aten.embedding_bag.padding_idx)


def embedding_share(program: Program) -> float:
    """Bytes of the embedding tables / all parameter bytes (0 when none).

    A table counts when embedding lookups are its only readers: a table tied
    to an output head (BERT4Rec scores items with its item table) is a dense
    weight as well, and ``Os`` leaves it in fp32.
    """
    total = program.parameter_bytes()
    params = program.parameter_tensors()
    found: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "get_attr" and node.users and all(
                u.op == "call_function" and u.target in _LOOKUPS and u.args[0] is node for u in node.users):
            value = params.get(node.target)
            if value is not None:
                found[node.target] = value.numel() * value.element_size()
    return sum(found.values()) / total if total else 0.0


def default_pipelines(program: Program) -> tuple[str, ...]:
    """:data:`DEFAULT_PIPELINES`, plus :data:`SIZE_PIPELINE` when embedding tables
    hold more than half the parameter bytes (dlrm, two-tower: 99% and 91%)."""
    if embedding_share(program) > EMBEDDING_DOMINATED:
        return (*DEFAULT_PIPELINES, SIZE_PIPELINE)
    return DEFAULT_PIPELINES


#: labels of the default pipelines whose speed rests on bf16 GEMM kernels
BF16_LABELS = ("bf16", "int8-bf16")
#: why the bf16 defaults are left out, in the notes that say so
NO_BF16_KERNELS = "this CPU has no bf16 GEMM kernels (AVX2 only), so oneDNN runs bf16 as reference code"


def split_bf16(items: Sequence[Any], is_bf16: Callable[[Any], bool],
               bf16_kernels: bool | None = None) -> tuple[list[Any], list[Any]]:
    """``(kept, left out)``: the ``is_bf16`` items are left out where this CPU has no bf16 GEMM
    kernels (``graphopt.hardware.has_bf16_kernels``; ``bf16_kernels`` overrides it), else none."""
    if bf16_kernels is None:
        from graphopt.hardware import has_bf16_kernels

        bf16_kernels = has_bf16_kernels()
    left = [] if bf16_kernels else [i for i in items if is_bf16(i)]
    return [i for i in items if i not in left], left


def without_bf16(pipelines: Sequence[str], bf16_kernels: bool | None = None) -> tuple[list[str], str | None]:
    """``pipelines`` less the :data:`BF16_LABELS` ones where this CPU has no bf16 GEMM kernels
    (:func:`split_bf16`), and a note saying which and why (None when none was left out). Without
    them oneDNN runs bf16 as reference code: on an AMD EPYC with AVX2 only, bert4rec:base at batch
    32 ran bf16 @ inductor at 0.58x eager's speed and int8-bf16 @ inductor at 0.05x (132 s to
    compile), where int8 ran 2.18x; they cost a default bench or demo most of its time and are
    never the fastest variant there."""
    kept, left = split_bf16(list(pipelines), lambda p: parse_pipeline_spec(p).label in BF16_LABELS, bf16_kernels)
    if not left:
        return kept, None
    names = ", ".join(parse_pipeline_spec(p).label for p in left)
    return kept, (f"pipelines {names} left out: {NO_BF16_KERNELS} (bert4rec:base, batch 32, AMD EPYC: bf16 @ "
                  "inductor 0.58x eager, int8-bf16 0.05x); name them with -p to time them anyway")


@dataclass
class PipelineSpec:
    label: str
    text: str


def parse_pipeline_spec(spec: str) -> PipelineSpec:
    """``"bf16=O2,cast{dtype=bf16}"`` -> label ``bf16``; ``"O2"`` -> label ``O2``;
    ``""``/``"none"`` -> the unoptimized Program (label ``fp32``)."""
    head, sep, tail = spec.partition("=")
    if sep and "{" not in head and "," not in head and head.strip():
        label, text = head.strip(), tail.strip()
    else:
        label, text = spec.strip(), spec.strip()
    if text.lower() in ("", "none"):
        return PipelineSpec(label if label.lower() not in ("", "none") else "fp32", "")
    return PipelineSpec(label, text)


def check_unique_labels(specs: Sequence[PipelineSpec]) -> None:
    """Two pipelines under one label were merged into one row (the second's timing and top-10 beside
    the first's size): refused in one line."""
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.label in seen:
            raise PipelineParseError(f"-p: two pipelines are labelled '{spec.label}' ({seen[spec.label] or 'none'} "
                                     f"and {spec.text or 'none'}); give each its own LABEL=PIPELINE")
        seen[spec.label] = spec.text
