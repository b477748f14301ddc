"""``OUT/report.md`` and ``OUT/pareto.png``: the winner, the runner-up per runtime,
the best default next to it, the Pareto front (speed vs ranking change), the
per-layer sensitivity table and every trial."""

from __future__ import annotations

import datetime as _dt
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.bench.report import MIN_COSINE, pareto_front
from graphopt.fidelity_bar import shown_against
from graphopt.tune.sensitivity import ranking

if TYPE_CHECKING:
    from graphopt.tune.trials import Trial
    from graphopt.tune.tuner import TuneResult

__all__ = ["write_report", "plot_pareto", "render_report", "fidelity_y", "users_text"]

log = logging.getLogger(__name__)


def fidelity_y(trial: Trial) -> tuple[float | None, str]:
    """The y of the Pareto plot: relative change of the metric in % on eval data, else top-10 overlap."""
    fid = trial.runtime_fidelity or trial.fidelity
    if not fid:
        return None, ""
    if fid.get("metric") in ("topk_overlap", "cosine"):
        return fid.get("value"), "top-10 overlap with eager" if fid["metric"] == "topk_overlap" else "cosine with eager"
    return fid.get("change_pct"), f"{fid.get('metric', 'metric').upper()} vs eager (%)"


def _points(trials: list[Trial], confirmed: dict[int, float]) -> tuple[list[tuple[str, float, float]], str]:
    """(trial, speed, fidelity) of every timed trial; a finalist's speed is its confirmation-run one."""
    points, label = [], ""
    for t in trials:
        if t.ok and t.twin_of is None:
            y, lab = fidelity_y(t)
            if y is not None and math.isfinite(y):
                points.append((str(t.n), float(confirmed.get(t.n) or t.objective), float(y)))
                label = label or lab
    return points, label


def plot_pareto(result: TuneResult, path: Path) -> Path | None:
    """Speedup (objective) vs fidelity of every timed trial; front ringed, winner and defaults marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log.warning("pareto.png not written: %s; pip install 'graphopt[plots]'", e)
        return None
    trials = result.trials
    confirmed = {r["n"]: r["objective"] for r in (result.confirmation or {}).get("finalists", [])}
    points, label = _points(trials, confirmed)
    front = set(pareto_front(points))
    by_n = {str(t.n): t for t in trials}
    winner = str(result.best_trial.n) if result.best_trial else None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, x, y in points:
        t = by_n[name]
        default = t.stage in ("defaults", "reference")
        colour = "#d62728" if name == winner else ("#ff7f0e" if default else "#1f77b4")
        ax.scatter([x], [y], color=colour, s=40 if name == winner else 26, zorder=3, marker="s" if default else "o",
                   edgecolors="black" if name in front else "none", linewidths=1.0)
        ax.annotate(name + ("*" if int(name) in confirmed else ""), (x, y), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    fp = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    if fp:
        ax.plot([p[1] for p in fp], [p[2] for p in fp], "--", color="#2ca02c", lw=0.9, zorder=2)
    drop = result.settings.get("max_drop", 0.005)
    bar = -100.0 * drop if "%" in label else (1.0 - drop if label.startswith("top") else None)
    if bar is not None:
        ax.axhline(bar, color="#d62728", lw=0.8, ls=":")
    ax.axvline(1.0, color="#888888", lw=0.6)
    for colour, marker, text in (("#d62728", "o", "winner"), ("#ff7f0e", "s", "default / reference"),
                                 ("#1f77b4", "o", "searched")):
        ax.scatter([], [], color=colour, marker=marker, s=26, label=text)
    ax.plot([], [], "--", color="#2ca02c", label="Pareto front (ringed)")
    if bar is not None:
        ax.plot([], [], ":", color="#d62728", label="fidelity bar")
    ax.legend(fontsize=7, loc="lower left")
    if points:
        ys = [p[2] for p in points] + ([bar] if bar is not None else [])
        lo, hi = min(ys), max(ys)
        pad = max((hi - lo) * 0.15, 0.05 if "%" in label else 0.002)
        ax.set_ylim(lo - pad, hi + pad)
        xs = [p[1] for p in points]
        if max(xs) / max(min(xs), 1e-9) > 20:  # orders of magnitude apart: a log axis keeps both readable
            ax.set_xscale("log")
        else:
            ax.set_xlim(0, max(xs) * 1.12)
    ax.set_xlabel(f"speedup vs eager ({result.settings.get('objective')}, paired interleaved rounds)")
    ax.set_ylabel(label or "fidelity")
    ax.set_title(f"graphopt tune: {result.settings.get('model_name')} (numbers = trial; * = speed from the "
                 "confirmation run; timed trials only)", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_of(fid: dict[str, Any], drop: float) -> tuple[float, float]:
    """The tuner's bar for ``fid``'s metric: (on its value, on its change in %)."""
    floor = {"topk_overlap": 1.0 - drop, "cosine": MIN_COSINE}.get(fid.get("metric", ""))
    return (floor, 100.0 * (floor - 1.0)) if floor is not None else (math.nan, -100.0 * drop)


def _change_text(fid: dict[str, Any], drop: float) -> str:
    """The relative change in %, never rounded onto the bar (:func:`graphopt.fidelity_bar.shown_against`)."""
    change = fid.get("change_pct", math.nan) if fid else math.nan
    return shown_against(change, _bar_of(fid, drop)[1], 2, sign=True) + "%" if math.isfinite(change) else "-"


def _fid_text(fid: dict[str, Any], drop: float) -> str:
    if not fid:
        return "-"
    if fid.get("metric") in ("topk_overlap", "cosine"):
        value = fid.get("value", math.nan)
        shown = shown_against(value, _bar_of(fid, drop)[0], 4) if math.isfinite(value) else "nan"
        return f"{fid['metric'].replace('_', '-')} {shown}"
    vals = fid.get("values", {})
    refs = fid.get("reference_values", {})
    parts = [f"{k.upper()} {v:.4f} (eager {refs.get(k, math.nan):.4f})" for k, v in vals.items()]
    text = "; ".join(parts) + f"; {fid.get('metric', '').upper()} {_change_text(fid, drop)}"
    return text + users_text(fid.get("users"))


def users_text(users: dict[str, float] | None) -> str:
    """``; users +1/-2 (closest eager margin 2.5e-05, McNemar p 1.00)`` (see :mod:`graphopt.hits`)."""
    if not users:
        return ""
    text = f"; users +{users['gained']:.0f}/-{users['lost']:.0f}"
    if users["gained"] or users["lost"]:
        text += f" (closest eager margin {users['min_margin']:.2g}, McNemar p {users['p_value']:.2f})"
    return text


def _speeds(latency: dict[str, Any]) -> str:
    return ", ".join(f"{shape}: {r['speedup']:.2f}x ({r['p50_ms']:.2f} ms vs {r.get('eager_p50_ms', math.nan):.2f})"
                     for shape, r in latency.items()) or "-"


def render_report(result: TuneResult, summary: dict[str, Any]) -> str:
    s = result.settings
    drop = s.get("max_drop", 0.005)
    m = summary.get("machine", {})
    trials = result.trials
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"# graphopt tune: {s.get('model_name')}",
        "",
        f"{when} · {m.get('cpu')} ({' '.join(m.get('cpu_flags', []))}) · {m.get('cores')} cores · "
        f"load {', '.join(f'{x:.1f}' for x in m.get('load_average', []))} · torch threads {summary.get('torch_threads')}",
        "",
        f"Model `{s.get('model')}`; bar: {s.get('bar')}; objective {s.get('objective')}; shapes "
        f"{', '.join(f'b{b}' + (f's{q}' if q else '') for b, q in s.get('shapes', []))}; runtimes "
        f"{', '.join(s.get('runtimes', []))}; strategy {s.get('strategy')}, seed {s.get('seed')}; budget "
        f"{s.get('budget_s'):.0f}s, wall {result.wall_s:.0f}s; {len(trials)} trials "
        f"({summary.get('replayed', 0)} replayed from the log, {summary.get('not_started_budget', 0)} not started: "
        "predicted past the budget).",
        "",
    ]
    for w in summary.get("warnings", []):
        lines += [f"> **Warning:** {w}", ""]
    for n in summary.get("space_notes", []):
        lines += [f"> Note: {n}", ""]
    if s.get("data_notice"):
        lines += [f"> **Notice:** {s['data_notice']}", ""]
    best = result.best_trial
    conf = result.confirmation or {}
    rows = {r["n"]: r for r in conf.get("finalists", [])}
    lines += ["## Winner", ""]
    if best is None:
        lines += ["No candidate met the bar and ran (see the trials below).", ""]
    else:
        lat = rows.get(best.n, {}).get("latency") or best.latency
        lines += [
            f"**{best.key}** (trial {best.n}, stage {best.stage})",
            "",
            f"- pipeline: `{best.pipeline or 'none'}`",
            f"- runtime: {best.candidate.runtime}, options {best.candidate.options}",
            f"- speed: {_speeds(lat)}" + (" (confirmation run)" if best.n in rows else " (search run)"),
            f"- fidelity on {best.candidate.runtime}: {_fid_text(best.runtime_fidelity or best.fidelity, drop)}",
            f"- artifact: `{result.out_dir / 'best'}` (`graphopt.load` it; its manifest.json `tune` section says all this)",
            "",
        ]
    defaults = [r for r in conf.get("finalists", []) if r["default"]]
    if conf.get("done"):
        lines += ["## Confirmation (finalists re-timed together, interleaved, one run)", "",
                  "| trial | candidate | default? | " + " | ".join(
                      k for k in (conf["finalists"][0]["latency"] if conf["finalists"] else {})) + " | objective |",
                  "|---|---|---|" + "---|" * (len(conf["finalists"][0]["latency"]) if conf["finalists"] else 0) + "---|"]
        for r in conf["finalists"]:
            cells = [f"{v['speedup']:.2f}x" for v in r["latency"].values()]
            star = " ★" if best is not None and r["n"] == best.n else ""
            lines.append(f"| {r['n']}{star} | {r['key']} | {'yes' if r['default'] else ''} | " + " | ".join(cells)
                         + f" | {r['objective']:.2f}x |")
        if defaults and best is not None:
            top_default = max(defaults, key=lambda r: r["objective"] or 0)
            w = rows.get(best.n, {}).get("objective")
            if w and top_default["objective"]:
                lines += ["", f"Winner vs the best hand-written default meeting the same bar ({top_default['key']}): "
                              f"{w / top_default['objective']:.2f}x, measured in this confirmation run."]
        lines.append("")
    else:
        lines += [f"Confirmation run: not done ({conf.get('why', '-')}); speeds are from the search.", ""]
    lines += ["## Best per runtime", "", "| runtime | candidate | trial | speed | fidelity |", "|---|---|---|---|---|"]
    for rt in s.get("runtimes", []):
        ok = [t for t in trials if t.ok and t.candidate.runtime == rt]
        if not ok:
            tried = [t for t in trials if t.candidate.runtime == rt]
            why = next((t.reason for t in tried if t.reason), "no trial met the bar") if tried \
                else "not tried within the budget"
            lines.append(f"| {rt} | - | - | - | {_cell(why, 90)} |")
            continue
        t = max(ok, key=lambda t: t.objective)
        confirmed = rows.get(t.n, {}).get("latency")
        speed = _speeds(confirmed) + " (confirmation run)" if confirmed else _speeds(t.latency) + " (search)"
        lines.append(f"| {rt} | {_cell(t.key, 90)} | {t.n} | {speed} | {_cell(_fid_text(t.runtime_fidelity, drop), 90)} |")
    lines += ["", "![speed vs fidelity](pareto.png)", ""]
    lines += _sensitivity_lines(result.sensitivity)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    lines += ["## Trials", "", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), "",
              "| # | stage | candidate | status | fidelity Δ | objective | compile s | why |", "|---|---|---|---|---|---|---|---|"]
    for t in sorted(trials, key=lambda t: t.n):
        fid = t.runtime_fidelity or t.fidelity
        delta = _change_text(fid, drop)
        obj = f"{t.objective:.2f}x" if t.objective else "-"
        comp = f"{t.compile_s:.1f}" if t.compile_s else "-"
        lines.append(f"| {t.n}{' ★' if best is not None and t.n == best.n else ''} | {t.stage} | {_cell(t.key, 110)} | "
                     f"{t.status} | {delta} | {obj} | {comp} | {_cell(t.reason, 120)} |")
    lines.append("")
    return "\n".join(lines)


def _sensitivity_lines(sens: dict[str, Any] | None) -> list[str]:
    if not sens:
        return ["## Per-layer sensitivity", "", "Not computed (no keep-float set was needed in this run).", ""]
    lines = ["## Per-layer sensitivity", "",
             f"Drop of {sens.get('metric')} (fraction; relative for eval metrics) when the layer alone is int8, on the "
             f"screening subset, base pipeline `{sens.get('base')}` ({sens.get('seconds', 0):.0f}s). Most sensitive first.",
             "Score error = relative L2 error of the scores vs eager on the screening batches (orders ties).",
             "", "| layer | int8 drop | score error |", "|---|---|---|"]
    by_name = {r["layer"]: r for r in sens.get("int8", [])}
    for name in ranking(sens, "int8"):
        lines.append(_sens_row(by_name[name]))
    if sens.get("bf16_layers"):
        lines += ["", "bf16: drop of the default `cast{dtype=bf16}` policy with the layer alone kept fp32 "
                  "(`skip=`). Kept first = recovers most.", "", "| layer kept fp32 | bf16 drop | score error |",
                  "|---|---|---|"]
        by_name = {r["layer"]: r for r in sens["bf16_layers"]}
        for name in ranking(sens, "bf16"):
            lines.append(_sens_row(by_name[name]))
    if sens.get("bf16"):
        lines += ["", "bf16 per op family: drop of the default policy, and with each family it keeps fp32 "
                  "cast as well.", "", "| cast to bf16 | drop |", "|---|---|"]
        for r in sens["bf16"]:
            lines.append(f"| {r['family']} | {r['drop'] + 0.0:.5f} |")
    lines.append("")
    return lines


def _sens_row(r: dict[str, Any]) -> str:
    error = r.get("error", math.nan)
    return f"| {r['layer']} | {r['drop'] + 0.0:.5f} | {error:.2e} |" if math.isfinite(error) else \
        f"| {r['layer']} | {r['drop'] + 0.0:.5f} | - |"


def _cell(text: str, width: int) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def write_report(result: TuneResult, summary: dict[str, Any]) -> Path:
    """Write report.md and pareto.png into the tune folder (each replaced atomically)."""
    import os

    out = result.out_dir
    plot_pareto(result, out / ".pareto.tmp.png")
    if (out / ".pareto.tmp.png").exists():
        os.replace(out / ".pareto.tmp.png", out / "pareto.png")
    tmp = out / ".report.md.tmp"
    tmp.write_text(render_report(result, summary) + "\n")
    os.replace(tmp, out / "report.md")
    return out / "report.md"
