"""Per-layer sensitivity, computed once per run and reused (``OUT/sensitivity.json``).

int8: for every linear ``quantize-int8`` would take in the ``O2`` Program,
the drop of the tuner's metric when that layer *alone* is quantized
(``quantize-int8{skip=<every other layer>}``), measured in eager on the
cheap screening subset. The ranking (most sensitive first) gives the
keep-float sets: ``keep_float=k`` keeps the first k layers in float.

bf16, per layer: the drop of the default ``cast{dtype=bf16}`` policy when
that layer *alone* is kept fp32 (``cast{dtype=bf16 skip=<layer>}``); the
layer whose fp32 copy leaves the smallest drop ranks first, so bf16
keep-float sets are the layers that recover the most (on the fine-tuned
gpt-rec:base the default policy loses one test user's hit; with the first
two, layer 0's QKV and FFN-down projections, kept fp32 it loses none).
Measuring with the layer kept, rather than with it alone cast, is what a
keep-float set does, and it counts the rounding the other layers still add.

Both tables also record each layer's relative score error against eager on the
screening batches: on a few hundred users the metric moves in steps of one
hit, so many layers tie on the drop, and the error orders them within a tie.

bf16, per op family: ``cast`` keeps op families in fp32 (layer norms,
softmax, ...); for each the drop when that family is cast as well, next to
the drop of the default policy itself.

Layers are named by module path (``model.bert.encoder.layer.0.output.dense``),
or by node name where two linears share a path, so a ``skip=`` list carries
over to pipelines with other fusions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphopt.errors import first_line
from graphopt.passlib.qdq import find_linears
from graphopt.transform.base import available_passes
from graphopt.tune.space import Candidate

__all__ = ["compute_sensitivity", "load_sensitivity", "save_sensitivity", "ranking", "SENSITIVITY_FILE"]

log = logging.getLogger(__name__)

SENSITIVITY_FILE = "sensitivity.json"
#: calibration batches used per layer (the ranking, not the final ranges)
_CALIB_BATCHES = 4


def _labels(layers: list[Any]) -> list[str]:
    counts = Counter(layer.path for layer in layers if layer.path)
    return [layer.path if layer.path and counts[layer.path] == 1 else layer.node.name for layer in layers]


def compute_sensitivity(evaluator: Any, fusions: tuple[str, ...],
                        on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Both tables for the Program optimized with O1 + ``fusions`` (see the module doc)."""
    from graphopt.transform.optimize import optimize
    from graphopt.tune.evaluate import _eager

    start = time.perf_counter()
    judge = evaluator.judge
    base = Candidate(fusions=fusions)
    program = evaluator.program_for(base, base.pipeline)
    layers, _ = find_linears(program.gm)
    labels = _labels(layers)
    calib = evaluator.data.calibration[:_CALIB_BATCHES]
    result: dict[str, Any] = {"base": base.pipeline, "metric": judge.metric.name, "int8": [], "bf16": [], "bf16_layers": []}

    def measure(what: str, step: str, *, error: bool = True, **kwargs: Any) -> tuple[float, float]:
        """(drop, score error) of O1 + fusions + ``step``; NaN when it cannot be measured (ranks last, logged why)."""
        if on_step:
            on_step(f"sensitivity: {what}")
        try:
            out, _ = optimize(program, step, **kwargs)
            fn = _eager(out)
            return judge.sensitivity_drop(fn), judge.score_error(fn) if error else math.nan
        except Exception as e:  # noqa: BLE001 - passes and backends raise many unrelated types
            log.info("sensitivity (%s) not measured: %s", what, first_line(e))
            return math.nan, math.nan

    if "quantize-int8" in available_passes():
        for label, layer in zip(labels, layers):
            others = [x for x in labels if x != label]
            step = "quantize-int8" + ("{skip=" + ",".join(others) + "}" if others else "")
            drop, err = measure(f"int8 {label}", step, calibration_data=calib)
            result["int8"].append({"layer": label, "node": layer.node.name, "drop": drop, "error": err})
    cast = available_passes().get("cast")
    if cast is not None:
        keep_opt = next((o for o in cast.options if o.name == "keep"), None)
        default_keep = tuple(keep_opt.default) if keep_opt is not None else ()
        policies = [("(default policy)", default_keep)] + [
            (family, tuple(k for k in default_keep if k != family)) for family in default_keep
        ]
        for label in labels:
            drop, err = measure(f"bf16 without {label}", "cast{dtype=bf16 skip=" + label + "}")
            result["bf16_layers"].append({"layer": label, "drop": drop, "error": err})
        for family, keep in policies:
            drop, _ = measure(f"bf16 {family}", "cast{dtype=bf16 keep=" + ",".join(keep) + "}", error=False)
            result["bf16"].append({"family": family, "drop": drop})
    result["seconds"] = time.perf_counter() - start
    return result


def _key(row: dict[str, Any], sign: float) -> tuple[float, float]:
    """Sort key: ``sign`` * (drop, error), unmeasured last (rows of older tables have no error)."""
    drop, error = row["drop"], row.get("error", 0.0)
    if not math.isfinite(drop):
        return (math.inf, math.inf)
    return (sign * drop, sign * error if math.isfinite(error) else math.inf)


def ranking(sensitivity: dict[str, Any], family: str = "int8") -> list[str]:
    """Layer labels for ``family``'s keep-float sets, first = keep first (unmeasured last);
    equal drops are ordered by the score error (``Judge.score_error``).

    ``bf16``/``fp16``: by the per-layer bf16 table (smallest drop with the layer
    kept fp32 first); when it is missing (a table from an older run), and for
    every other family: the int8 table, most sensitive first.
    """
    if family in ("bf16", "fp16") and sensitivity.get("bf16_layers"):
        return [r["layer"] for r in sorted(sensitivity["bf16_layers"], key=lambda r: _key(r, 1.0))]
    return [r["layer"] for r in sorted(sensitivity.get("int8", []), key=lambda r: _key(r, -1.0))]


def save_sensitivity(out_dir: Path, sensitivity: dict[str, Any]) -> None:
    path = Path(out_dir) / SENSITIVITY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sensitivity, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)


def load_sensitivity(out_dir: Path, base: str, metric: str) -> dict[str, Any] | None:
    path = Path(out_dir) / SENSITIVITY_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("base") == base and data.get("metric") == metric else None
