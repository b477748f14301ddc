"""Fine-tuning from a co-occurrence item table vs a random one, at the same time budget.

    .venv/bin/python benchmarks/bench_item_init.py [--models bert4rec:base,gpt-rec:base,t5-rec:base]
        [--inits cooccurrence,random] [--minutes 5] [--threads N] [--seed 0] [--json FILE]

Each (model, init) is ``graphopt.rec.finetune.finetune`` on MovieLens-100K (recbole's copy) with
the demo's settings (``FinetuneConfig`` defaults: batch 64, lr 1e-3, the time budget as the stop,
best validation weights kept), one run after the other on an otherwise idle machine. Per run:
steps and epochs done in the budget, the first evaluation's and the best validation NDCG@10, and
test HR@10/NDCG@10 beside the popularity baseline's. A budget counts steps, so results depend on
the machine's speed: the report records the CPU, its flags and the precision trained in.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from graphopt.bench.timing import machine_info
from graphopt.rec.data import load_movielens
from graphopt.rec.finetune import FinetuneConfig, finetune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert4rec:base,gpt-rec:base,t5-rec:base")
    ap.add_argument("--inits", default="cooccurrence,random")
    ap.add_argument("--minutes", type=float, default=5.0, help="time budget per run (the demo's: 5)")
    ap.add_argument("--threads", type=int, help="torch threads while training (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows and the machine here")
    args = ap.parse_args()
    data = load_movielens(allow_synthetic=False)
    rows = []
    for model in args.models.split(","):
        for init in args.inits.split(","):
            cfg = FinetuneConfig(max_minutes=args.minutes, threads=args.threads, seed=args.seed, item_init=init)
            start = time.perf_counter()
            r = finetune(model, data, cfg, progress=False)
            first = next(h for h in r.history if "valid_ndcg@10" in h)
            pop = r.popularity["test"]
            row = {"model": model, "init": init, "precision": r.precision, "steps": r.steps, "epochs": r.epochs,
                   "wall_s": round(time.perf_counter() - start, 1),
                   "first_valid_ndcg@10": first["valid_ndcg@10"], "first_eval_step": int(first["step"]),
                   "valid_ndcg@10": r.valid["ndcg@10"], "test_hr@10": r.test["hr@10"],
                   "test_ndcg@10": r.test["ndcg@10"], "popularity_test_hr@10": pop["hr@10"],
                   "popularity_test_ndcg@10": pop["ndcg@10"]}
            rows.append(row)
            print(f"{model:14s} {init:12s} {r.precision} {r.steps:5d} steps {r.epochs:3d} epochs  "
                  f"valid NDCG@10 first {row['first_valid_ndcg@10']:.4f} (step {row['first_eval_step']}) "
                  f"best {row['valid_ndcg@10']:.4f}  test HR@10 {row['test_hr@10']:.4f} NDCG@10 "
                  f"{row['test_ndcg@10']:.4f}  (popularity {pop['hr@10']:.4f} / {pop['ndcg@10']:.4f})", flush=True)
    info = machine_info()
    print(f"cpu {info['cpu']} {info['cpu_flags']}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps({"rows": rows, "machine": info, "minutes": args.minutes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
