"""The measured ``graphopt tune`` runs of issue 14, in one command.

    python benchmarks/tune_headline.py -o tune-headline            # about 35 minutes

1. the demo's fine-tuned bert4rec:base (``graphopt demo``'s own checkpoint: the same
   cache key, fine-tuned first if it is not cached) with ``--data ml-100k --max-drop 0.5%``;
2. ``dlrm:base`` and 3. ``bert-cls:base`` with ``--metric topk-overlap``;

each ``--budget 10m`` over every available runtime, batch 1 and 32 (seq 64). Writes
``OUT/<model>/`` (the tune folders: best/, trials.jsonl, report.md, pareto.png) and
``OUT/tune-headline.md``: per model the trials, the winner, its speedup at batch 1
and 32 and its fidelity next to eager's, and the best hand-written default variant
(O2, O2+bf16, O2+int8 on each runtime) at the same bar, re-timed in the same run.
Equivalent CLI, per model::

    graphopt tune <checkpoint> --data ml-100k --max-drop 0.5% --budget 10m -o OUT/bert4rec-base
    graphopt tune dlrm:base --metric topk-overlap --budget 10m -o OUT/dlrm-base
    graphopt tune bert-cls:base --metric topk-overlap --budget 10m -o OUT/bert-cls-base
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from graphopt.bench.timing import machine_info


def demo_checkpoint() -> Path:
    """The checkpoint ``graphopt demo`` fine-tunes and caches (fine-tuned now if missing)."""
    from graphopt.cli.demo import _model, _Steps
    from graphopt.cli.finetune import load_data, loaded_machine

    args = argparse.Namespace(model=None, quick=False, max_minutes=None, cache_dir=None, fresh=False)
    data = load_data("ml-100k")
    return Path(_model(args, data, _Steps(1), 1 if loaded_machine() else None).path)


def _row(name: str, result) -> str:  # type: ignore[no-untyped-def]
    best = result.best_trial
    conf = {r["n"]: r for r in result.confirmation.get("finalists", [])}
    if best is None:
        return f"| {name} | {len(result.trials)} | - | - | - | - | - |"
    lat = conf.get(best.n, {}).get("latency") or best.latency
    speeds = " / ".join(f"{v['speedup']:.2f}x" for v in lat.values())
    fid = best.runtime_fidelity or best.fidelity
    if fid.get("metric") in ("topk_overlap", "cosine"):
        quality = f"{fid['metric'].replace('_', '-')} {fid['value']:.4f}"
    else:
        refs = fid.get("reference_values", {})
        quality = ", ".join(f"{k.upper()} {v:.4f} (eager {refs.get(k, math.nan):.4f})" for k, v in fid["values"].items())
    defaults = [r for r in conf.values() if r["default"]]
    if defaults and best.n in conf:
        top = max(defaults, key=lambda r: r["objective"] or 0)
        default_speeds = " / ".join(f"{v['speedup']:.2f}x" for v in top["latency"].values())
        vs = f"{top['key']}: {default_speeds} (winner {conf[best.n]['objective'] / top['objective']:.2f}x it)"
    else:
        vs = "not re-timed together (see report.md)"
    return f"| {name} | {len(result.trials)} | {best.key} | {speeds} | {quality} | {vs} | {result.wall_s:.0f} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="graphopt tune on the demo's bert4rec:base, dlrm:base, bert-cls:base")
    p.add_argument("-o", "--output", default="tune-headline")
    p.add_argument("--budget", default="10m")
    p.add_argument("--models", default="bert4rec,dlrm,bert-cls", help="which of bert4rec,dlrm,bert-cls")
    p.add_argument("--runtimes", help="comma-separated (default: every available)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import graphopt

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    runtimes = args.runtimes.split(",") if args.runtimes else None
    rows = []
    for which in args.models.split(","):
        if which == "bert4rec":
            spec, name, kw = str(demo_checkpoint()), "bert4rec:base (demo, ML-100K)", {"data": "ml-100k", "max_drop": "0.5%"}
        else:
            spec, name, kw = f"{which}:base", f"{which}:base", {"metric": "topk-overlap"}
        print(f"tuning {name} ...", file=sys.stderr, flush=True)
        result = graphopt.tune(spec, out / name.split(" ")[0].replace(":", "-"), budget=args.budget,
                               batch_sizes=(1, 32), seq_lens=(64,), runtimes=runtimes, force=args.force, **kw)
        rows.append(_row(name, result))
    m = machine_info()
    text = "\n".join([
        "# graphopt tune: measured runs", "",
        f"`python benchmarks/tune_headline.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{m['cpu']} ({' '.join(m['cpu_flags'])}), {m['cores']} cores, load at the end "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'])}; torch {m['versions'].get('torch')}, "
        f"onnxruntime {m['versions'].get('onnxruntime')}", "",
        "| model | trials | winner | speedup b1 / b32 | fidelity vs eager | best default at the same bar | wall s |",
        "|---|---|---|---|---|---|---|", *rows, "",
    ])
    (out / "tune-headline.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
