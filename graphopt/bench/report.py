"""The benchmark report: ``report.json`` (schema-versioned, every raw sample),
``report.md`` (a table per shape, best variant marked) and PNG plots; strict JSON (NaN, inf: null).

Schema ``graphopt.bench/1``::

    {format, model, created, duration_s, machine{cpu, cores, torch_threads,
     load_average, device, versions{}}, config{pipelines, runtimes, peers,
     shapes, threads, k, seed, timing, baseline}, warnings[], notes[],
     eval_reference{hr@10, ndcg@10},
     variants[{name, kind, pipeline, runtime, status, reason, timings{},
               first_call_s{shape: s}, compile_s, size_bytes, size_kind,
               memory{method, peak_mb, model_mb, load_mb, run_mb | run_mb (in-process),
                      predicted{weights_mb, activations_mb, inputs_mb, peak_at}, overhead_mb, why[]},
               eval{}, notes[]}],
     results[{shape, batch, seq, variant, status, reason,
              latency{p50_ms, p90_ms, p99_ms, mean_ms, min_ms, throughput, spread, calls},
              speedup{speedup, speedup_p10, speedup_p90, pairs},
              accuracy{max_abs, max_rel, cosine, ranked_over, topk_overlap, spearman, ndcg_vs_eager},
              samples_s[[seconds per call] per round]}],
     best{shape: variant}, pareto{shape: [variant]}}
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.bench.accuracy import quality_section
from graphopt.fidelity_bar import FIDELITY_BAR, relative_change, shown_against
from graphopt.outputs import atomic_directory

__all__ = ["BenchReport", "BENCH_FORMAT", "shape_key", "pareto_front", "accuracy_score"]

log = logging.getLogger(__name__)

BENCH_FORMAT = "graphopt.bench/1"
#: shapes whose outputs rank nothing (one score per row, e.g. CTR at batch 1) fall back to this
MIN_COSINE = FIDELITY_BAR.min_cosine


def shape_key(batch: int, seq: int | None) -> str:
    return f"b{batch}" + (f"_s{seq}" if seq is not None else "")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both x and y (higher is better),
    ordered by x descending."""
    front: list[str] = []
    best_y = -math.inf
    for name, _x, y in sorted(points, key=lambda p: (-p[1], -p[2])):
        if y > best_y:
            front.append(name)
            best_y = y
    return front


def accuracy_score(row: dict[str, Any], variant: dict[str, Any], eval_reference: dict[str, float]) -> tuple[float | None, str]:
    """The accuracy axis of the trade-off: NDCG@k (AUC for CTR models) on eval data
    relative to eager's (%) when given, else top-k overlap with eager, else cosine
    similarity with eager."""
    ndcg_key = next((key for key in eval_reference if key.startswith("ndcg@") or key == "auc"), None)
    if ndcg_key and _finite(variant.get("eval", {}).get(ndcg_key)):
        change = relative_change(float(variant["eval"][ndcg_key]), float(eval_reference[ndcg_key]), ndcg_key)
        return change, f"{ndcg_key.upper()} vs eager (%)"
    acc = row.get("accuracy", {})
    if _finite(acc.get("topk_overlap")):
        return float(acc["topk_overlap"]), "top-k overlap with eager"
    if _finite(acc.get("cosine")):
        return float(acc["cosine"]), "cosine with eager"
    return None, ""


@dataclass
class BenchReport:
    model: str
    created: float
    duration_s: float
    machine: dict[str, Any]
    config: dict[str, Any]
    variants: list[dict[str, Any]]
    results: list[dict[str, Any]]
    eval_reference: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------- queries
    @property
    def shapes(self) -> list[str]:
        return list(dict.fromkeys(r["shape"] for r in self.results))

    def variant(self, name: str) -> dict[str, Any]:
        return next(v for v in self.variants if v["name"] == name)

    def rows(self, shape: str) -> list[dict[str, Any]]:
        return [r for r in self.results if r["shape"] == shape]

    def fidelity(self, row: dict[str, Any]) -> tuple[bool, str]:
        """(keeps the ranking, why not) by graphopt.fidelity_bar.FIDELITY_BAR: NDCG@10/HR@10
        on eval data within 0.5% relative of eager's, else top-10 overlap with
        eager >= 0.99; where the outputs rank nothing (no top-k overlap and no
        eval data), cosine with eager >= MIN_COSINE."""
        v = self.variant(row["variant"])
        acc = row.get("accuracy", {})
        topk = acc.get("topk_overlap")
        if not self.eval_reference and not _finite(topk):
            cos = acc.get("cosine")
            if _finite(cos):
                return (True, "") if cos >= MIN_COSINE else (False, f"cosine {shown_against(cos, MIN_COSINE, 4)} < {MIN_COSINE}")
        return FIDELITY_BAR.check(v.get("eval") or None, self.eval_reference or None,
                                  float(topk) if _finite(topk) else None)

    def acceptable(self, row: dict[str, Any]) -> bool:
        """Whether a variant keeps the ranking at this row (see :meth:`fidelity`)."""
        return self.fidelity(row)[0]

    def best(self, shape: str, kind: str = "graphopt") -> str | None:
        """Fastest ok variant of ``kind`` ("graphopt" or "peer") that keeps the ranking
        and beats eager; None if none does. Variants below the bar are never best."""
        rows = [
            r for r in self.rows(shape)
            if r.get("status") == "ok" and self.variant(r["variant"])["kind"] == kind
            and _finite(r.get("speedup", {}).get("speedup")) and self.acceptable(r)
        ]
        if not rows:
            return None
        top = max(rows, key=lambda r: r["speedup"]["speedup"])
        return top["variant"] if top["speedup"]["speedup"] > 1.0 else None

    def tradeoff(self, shape: str) -> tuple[list[tuple[str, float, float]], str]:
        """(name, speedup, accuracy) points of the ok variants and the accuracy label."""
        points, label = [], ""
        for r in self.rows(shape):
            if r.get("status") != "ok":
                continue
            y, lab = accuracy_score(r, self.variant(r["variant"]), self.eval_reference)
            x = r.get("speedup", {}).get("speedup")
            if y is not None and _finite(x):
                points.append((r["variant"], float(x), y))
                label = label or lab
        return points, label

    def pareto(self, shape: str) -> list[str]:
        return pareto_front(self.tradeoff(shape)[0])

    def quality_change(self, row: dict[str, Any], metric: str = "ndcg") -> float | None:
        """Relative change (%) of the variant's ``metric``@k vs eager's: on eval data
        when given (``metric`` = ndcg, hr, auc or logloss); else, for ndcg, the NDCG@k of its
        ranking against eager's top k, minus 1 (0% = same ranking). Negative = worse."""
        v = self.variant(row["variant"])
        key = next((k for k in self.eval_reference if k == metric or k.startswith(f"{metric}@")), None)
        if key and _finite(v.get("eval", {}).get(key)):
            return relative_change(float(v["eval"][key]), float(self.eval_reference[key]), key)
        value = row.get("accuracy", {}).get("ndcg_vs_eager") if metric == "ndcg" and not key else None
        return 100.0 * (value - 1.0) if _finite(value) else None

    # ------------------------------------------------------------- output
    def to_json(self) -> dict[str, Any]:
        return {
            "format": BENCH_FORMAT,
            "model": self.model,
            "created": _dt.datetime.fromtimestamp(self.created, _dt.UTC).isoformat(timespec="seconds"),
            "duration_s": self.duration_s,
            "machine": self.machine,
            "config": self.config,
            "warnings": self.warnings,
            "notes": self.notes,
            "eval_reference": self.eval_reference,
            "variants": self.variants,
            "results": self.results,
            "best": {s: self.best(s) for s in self.shapes},
            "pareto": {s: self.pareto(s) for s in self.shapes},
        }

    def table(self, shape: str) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the per-shape table (shared by report.md and the CLI)."""
        best = self.best(shape)
        k = self.config.get("k", 10)
        hr = any(key.startswith("hr@") for key in self.eval_reference)
        ctr = "auc" in self.eval_reference  # click models: AUC and logloss take the ranking columns
        quality = ("auc", "logloss") if ctr else ("ndcg", "hr")[: 1 + hr]
        hr = hr or ctr
        # the evaluation's own cut-off (NDCG@10/HR@10 with data, whatever -k sets for the top-k overlap)
        ek = next((key.split("@", 1)[1] for key in self.eval_reference if key.startswith("ndcg@")), k)
        header = ["variant", "p50 ms", "p99 ms", "speedup", f"top-{k}",
                  *(["AUC Δ%", "logloss Δ%"] if ctr else [f"NDCG@{ek} Δ%", *([f"HR@{ek} Δ%"] * hr)]), "size", "compile s"]
        rows = []
        for r in self.rows(shape):
            v = self.variant(r["variant"])
            name = r["variant"] + (" ★" if r["variant"] == best else "")
            if r.get("status") != "ok":
                rows.append([name, r.get("status", "?"), "", "", "", "", *([""] * hr), _size(v), ""])
                continue
            lat, sp, acc = r.get("latency", {}), r.get("speedup", {}), r.get("accuracy", {})
            speed = f"{sp['speedup']:.2f}x" if _finite(sp.get("speedup")) else "-"
            if _finite(sp.get("speedup_p10")) and v["kind"] != "baseline":
                speed += f" ({sp['speedup_p10']:.2f}-{sp['speedup_p90']:.2f})"
            changes = [self.quality_change(r, m) for m in quality]
            if v["kind"] != "baseline" and not self.acceptable(r):
                name += " ✗"  # below the fidelity bar: shown, never starred
            rows.append([
                name,
                f"{lat.get('p50_ms', math.nan):.2f}",
                f"{lat.get('p99_ms', math.nan):.2f}",
                speed,
                FIDELITY_BAR.show_overlap(acc["topk_overlap"]) if _finite(acc.get("topk_overlap")) else "-",
                *(f"{FIDELITY_BAR.show_change(c)}%" if c is not None else "-" for c in changes),
                _size(v),
                f"{v['compile_s']:.1f}" if _finite(v.get("compile_s")) and v["kind"] != "baseline" else "-",
            ])
        return header, rows

    def not_measured(self, shape: str) -> list[tuple[str, str, str]]:
        """(variant, status, reason) of the variants with no numbers at ``shape``."""
        return [(r["variant"], r.get("status", "?"), r.get("reason", "")) for r in self.rows(shape) if r.get("status") != "ok"]

    def render_markdown(self) -> str:
        m = self.machine
        when = _dt.datetime.fromtimestamp(self.created).strftime("%Y-%m-%d %H:%M")
        versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
        lines = [
            f"# graphopt bench: {self.model}",
            "",
            f"{when} · {m.get('cpu')} · {m.get('cores')} cores · {self.config.get('threads')} threads · "
            f"device {m.get('device')} · load {', '.join(f'{x:.1f}' for x in m.get('load_average', []))}",
            "",
            f"Versions: {versions}",
            "",
            f"CPU flags: {' '.join(m.get('cpu_flags', [])) or 'none of ' + 'avx2/avx512/bf16/vnni/amx'}"
            + ("" if m.get("int8_dot", True) else " (no int8 dot product: int8 weights are 7-bit)"),
            "",
            f"Baseline: eager fp32, {self.config.get('baseline')}. Timing: {self.config['timing']['warmup']} warm-up "
            f"calls, then {self.config['timing']['rounds']} interleaved rounds (every variant once per round, "
            "same order); speedup = median over rounds of eager's round median / the variant's, "
            "(10th-90th percentile of those ratios).",
            "",
        ]
        for w in self.warnings:
            lines += [f"> **Warning:** {w}", ""]
        for n in self.notes:
            lines += [f"> Note: {n}", ""]
        for shape in self.shapes:
            header, rows = self.table(shape)
            lines += [f"## {shape}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
            best = self.best(shape)
            missing = self.not_measured(shape)
            if missing:
                lines += ["", "Not measured:"] + [f"- {n}: {st}: {_reason(why, 240)}" for n, st, why in missing]
            lines += [
                "",
                f"★ best: {best}" if best else "★ best: no variant beats eager with its ranking intact",
                f"(fastest graphopt variant that keeps the ranking: {FIDELITY_BAR.describe()}; ✗ = below that bar, "
                f"shown, never starred; strongest peer at the same bar: {self.best(shape, 'peer') or '-'}). "
                f"Pareto front (speed vs accuracy): {', '.join(self.pareto(shape)) or '-'}.",
                "",
            ]
        lines += [self.ndcg_footnote(), ""]
        if self.eval_reference:
            lines += quality_section(self.variants, self.eval_reference, self.config.get("k", 10))
        lines += ["## Cost", "", "| variant | status | compile s | size | memory | notes |", "|---|---|---|---|---|---|"]
        for v in self.variants:
            compile_s = f"{v['compile_s']:.1f}" if _finite(v.get("compile_s")) else "-"
            why = _reason(v.get("reason") or "; ".join(v.get("notes", [])), 160).replace("|", "\\|")
            lines.append(
                f"| {v['name']} | {v['status']} | {compile_s} | {_size(v)} | {_memory(v.get('memory', {}))} | {why} |"
            )
        lines += self.memory_section()
        lines += ["", "![latency](latency.png)", "", "![speed vs accuracy](tradeoff.png)", ""]
        return "\n".join(lines)

    def memory_section(self) -> list[str]:
        """Markdown lines: measured peak RSS next to the memory analysis' prediction
        (weights + activation peak), their difference (the runtime's own memory),
        and why a variant needs more than eager."""
        measured = [v for v in self.variants if _finite(v.get("memory", {}).get("model_mb"))]
        if not measured:
            return []
        shape = measured[0]["memory"].get("shape", "")
        lines = [
            "", f"## Memory ({shape})", "",
            "Measured: peak RSS of the variant alone in a fresh process, over the RSS after imports, split into "
            "loading and running. Predicted: `graphopt inspect --memory` (weights + activation peak of an eager run "
            "of the variant's Program). Overhead = measured - predicted: what the runtime holds beyond the graph's "
            "tensors (allocator caches, prepacked weights, workspaces, compiled code). MB = 2^20 bytes.", "",
            "| variant | measured over imports | load | run | predicted weights | predicted activations "
            "| predicted total | overhead |",
            "|---|---|---|---|---|---|---|---|",
        ]
        why = []
        for v in measured:
            mem, pred = v["memory"], v["memory"].get("predicted", {})
            has = _finite(pred.get("weights_mb"))
            total = pred["weights_mb"] + pred["activations_mb"] if has else None
            cells = [
                f"{mem['model_mb']:.1f}", _mb(mem.get("load_mb")), _mb(mem.get("run_mb")),
                _mb(pred.get("weights_mb")), _mb(pred.get("activations_mb")), _mb(total), _mb(mem.get("overhead_mb")),
            ]
            lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
            why += [f"- {v['name']} needs more than eager: {reason}" for reason in mem.get("why", [])]
        return lines + ([""] + why if why else [])

    def ndcg_footnote(self) -> str:
        """What the NDCG Δ% column means in this report."""
        if self.eval_reference:
            ref = ", ".join(f"{key} {val:.4f}" for key, val in self.eval_reference.items())
            return f"Δ%: the metric on the evaluation data relative to eager's ({ref}); negative = worse."
        k = self.config.get("k", 10)
        return (
            f"NDCG@{k} Δ%: no evaluation data given, so NDCG@{k} of the variant's ranking taking eager's top {k} "
            "as the truth, minus 1, in percent (0% = same ranking). Ranked over items, or over the batch for "
            "one-score models."
        )

    def save(self, out_dir: str | Path, *, force: bool = False, artifacts: Path | None = None) -> Path:
        """Write report.json, report.md, latency.png, tradeoff.png (atomically)."""
        from graphopt.bench.plots import plot_latency, plot_tradeoff

        with atomic_directory(out_dir, force=force) as tmp:
            try:
                plot_latency(self, tmp / "latency.png")
                plot_tradeoff(self, tmp / "tradeoff.png")
            except ImportError as e:  # matplotlib is the optional 'plots' extra
                note = f"plots not written: {e}; pip install 'graphopt[plots]'"
                log.warning("%s", note)
                if note not in self.notes:
                    self.notes.append(note)
            strict = json.loads(json.dumps(self.to_json(), default=_json_default), parse_constant=lambda _: None)
            (tmp / "report.json").write_text(json.dumps(strict, indent=1, allow_nan=False) + "\n")  # NaN: null
            (tmp / "report.md").write_text(self.render_markdown() + "\n")
            if artifacts is not None and artifacts.exists():
                shutil.copytree(artifacts, tmp / "artifacts")
        return Path(out_dir)

    @classmethod
    def load(cls, path: str | Path) -> BenchReport:
        path = Path(path)
        data = json.loads((path / "report.json" if path.is_dir() else path).read_text(), object_hook=_nan_for_null)
        if data.get("format") != BENCH_FORMAT:
            from graphopt.errors import ArtifactError

            raise ArtifactError(f"{path} has format {data.get('format')!r}, this graphopt reads {BENCH_FORMAT!r}")
        created = _dt.datetime.fromisoformat(data["created"]).timestamp()
        return cls(
            data["model"], created, data["duration_s"], data["machine"], data["config"], data["variants"],
            data["results"], data.get("eval_reference", {}), data.get("warnings", []), data.get("notes", []),
        )


def _nan_for_null(d: dict[str, Any]) -> dict[str, Any]:  # loading: a null among numbers was saved for a NaN
    numbers = [v for v in d.values() if v is not None]  # a dict of numbers and nulls only (min_margin, latency)
    return {k: math.nan if v is None and all(map(_finite, numbers or [None])) else v for k, v in d.items()}


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _size(v: dict[str, Any]) -> str:
    size = v.get("size_bytes")
    if not _finite(size):
        return "-"
    mb = size / 2**20
    text = f"{mb:.1f} MB" if mb >= 1 else f"{size / 1024:.0f} KB"
    return text + ("" if v.get("size_kind") in ("artifact", "onnx") else " (mem)")


def _memory(mem: dict[str, Any]) -> str:
    if not mem:
        return "-"
    if "error" in mem:
        return f"failed: {_reason(mem['error'], 60)}"
    if "peak_mb" in mem:
        return f"peak {mem['peak_mb']:.0f} MB (+{mem['model_mb']:.0f} over imports), alone"
    if "run_mb" in mem:
        return f"+{mem['run_mb']:.0f} MB during run (in-process)"
    return mem.get("reason", "-")


def _mb(x: Any) -> str:
    return f"{x:.1f}" if _finite(x) else "-"


def _reason(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
