"""bf16 policies side by side with torch.autocast: how well each keeps eager fp32's
ranking, and (with --speed) how fast each runs on Inductor next to the
``torch.compile-bf16`` peer.

    python benchmarks/bench_bf16_policy.py [--models bert4rec:base,bert-cls:base]
        [--checkpoint ~/.cache/graphopt/demo/<key>] [--speed] [--threads 1] [-o bf16-policy.md]

Fidelity (eager numerics, no compile): top-10 overlap with eager fp32 of the
original module over ``--batches`` batches of 32 (seq 64, seeds 50+), for
``torch.autocast("cpu", bfloat16)`` on the module and each ``cast`` policy after
O2. With ``--checkpoint`` (a fine-tuned bert4rec folder, e.g. the one
``graphopt demo`` caches) also HR@10/NDCG@10 on its MovieLens test users, as
relative change vs eager fp32. With ``--speed``: one ``graphopt bench`` run per
model (policies on inductor, peer torch.compile-bf16, batch 1 and 32,
interleaved), speedups vs eager.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import graphopt
from graphopt.bench.timing import machine_info
from graphopt.metrics import topk_overlap
from graphopt.rec.zoo import load_model

_NORMS = "layer_norm,rms_norm,group_norm,batch_norm,softmax,log_softmax,reductions"
POLICIES = {
    "fast, old default keep": "O2,cast{policy=fast keep=layer_norm,softmax,log_softmax,reductions}",
    "fast": "O2,cast{policy=fast}",
    "mixed, no score/tail (= autocast)": f"O2,cast{{keep={_NORMS}}}",
    "mixed, no tail": f"O2,cast{{keep={_NORMS},score}}",
    "mixed (default)": "O2,cast",
}


def _scores(out: object) -> torch.Tensor:
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def fidelity(name: str, batches: int) -> dict[str, float]:
    zm = load_model(name)
    program = zm.capture()
    data = [tuple(zm.make_inputs(batch=32, seq=64, seed=50 + i).values()) for i in range(batches)]
    with torch.inference_mode():
        ref = torch.cat([_scores(zm.module(*x)) for x in data])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results = {"torch.autocast": torch.cat([_scores(zm.module(*x)) for x in data])}
    for label, pipe in POLICIES.items():
        q, _ = graphopt.optimize(program, pipe, verify_each=False)
        results[label] = torch.cat([_scores(q(*x)) for x in data])
    return {label: topk_overlap(s, ref, 10) for label, s in results.items()}


def finetuned(folder: str) -> dict[str, dict[str, float]]:
    from graphopt.cli.finetune import load_data
    from graphopt.rec.data import evaluate_ranking
    from graphopt.rec.finetune import load_checkpoint

    ckpt = load_checkpoint(folder)
    split = load_data("ml-100k").leave_one_out()
    seq = int(ckpt.model_config["seq"])
    zm = ckpt.zoo_model(batch=32)
    module, program = zm.module.eval(), zm.capture()

    def ev(fn):  # type: ignore[no-untyped-def]
        return evaluate_ranking(fn, split.test, split.num_items, seq_len=seq, append_mask=ckpt.append_mask, batch_size=64)

    def eager(ids, mask):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return module(ids, mask)

    def autocast(ids, mask):  # type: ignore[no-untyped-def]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(ids, mask).float()

    fns = {"torch.autocast": autocast}
    for label, pipe in POLICIES.items():
        q, _ = graphopt.optimize(program, pipe, verify_each=False)
        fns[label] = lambda ids, mask, q=q: q(ids, mask)[0]
    ref = ev(eager)
    out = {"eager fp32": {"hr@10": ref["hr@10"], "ndcg@10": ref["ndcg@10"], "users": ref["users"]}}
    for label, fn in fns.items():
        m = ev(fn)
        out[label] = {k: 100.0 * (m[k] / ref[k] - 1.0) for k in ("hr@10", "ndcg@10")}
    return out


def speed(name: str, threads: int | None) -> list[str]:
    report = graphopt.bench(name, [f"{k}={v}" for k, v in POLICIES.items() if "old" not in k], ["inductor"],
                            peers=["torch.compile-bf16"], batch_sizes=(1, 32), seq_lens=(64,), threads=threads,
                            memory=False)
    lines = []
    for shape in report.shapes:
        for r in report.rows(shape):
            if r.get("status") == "ok":
                lines.append(f"| {name} | {shape} | {r['variant']} | {r['speedup']['speedup']:.2f}x | "
                             f"{r.get('accuracy', {}).get('topk_overlap', float('nan')):.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert4rec:base,bert-cls:base")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--checkpoint", help="a fine-tuned bert4rec checkpoint folder (graphopt demo's cache)")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default="bf16-policy.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    m = machine_info()
    lines = [f"# bf16 policies vs torch.autocast\n\n`python benchmarks/bench_bf16_policy.py {' '.join(sys.argv[1:])}`, "
             f"{time.strftime('%Y-%m-%d')}; CPU {m['cpu']} ({', '.join(m['cpu_flags'])}), load average "
             f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}.\n",
             f"## Top-10 overlap with eager fp32 ({args.batches} x 32 rows, seq 64, eager numerics)\n"]
    table = {name: fidelity(name, args.batches) for name in args.models.split(",")}
    labels = list(next(iter(table.values())))
    lines += ["| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in labels) + " |" for name, row in table.items()]
    if args.checkpoint:
        ft = finetuned(args.checkpoint)
        ref = ft.pop("eager fp32")
        lines += ["", f"## Fine-tuned checkpoint {Path(args.checkpoint).name}: change vs eager fp32 "
                  f"(HR@10 {ref['hr@10']:.4f}, NDCG@10 {ref['ndcg@10']:.4f}, {ref['users']:.0f} test users)\n",
                  "| variant | HR@10 | NDCG@10 |", "|---|---|---|"]
        lines += [f"| {k} | {v['hr@10']:+.2f}% | {v['ndcg@10']:+.2f}% |" for k, v in ft.items()]
    if args.speed:
        lines += ["", "## Speed on inductor (one interleaved run per model)\n",
                  "| model | shape | variant | speedup vs eager | top-10 |", "|---|---|---|---|---|"]
        for name in args.models.split(","):
            lines += speed(name, args.threads)
    lines += ["", f"Wall time {time.time() - started:.0f} s."]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
