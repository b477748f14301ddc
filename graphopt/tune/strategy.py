"""Search strategies: which candidate to try next.

Every strategy starts the same way: the reference (the unoptimized Program on
eager, so ``OUT/best`` is loadable after the first trial) and the hand-written
defaults (``graphopt bench``'s O2, O2+bf16 and O2+int8 on every runtime), so
the winner is always compared with them. Then:

- ``greedy`` (the default): staged. (1) precision: the other int8 calibration
  methods, int8-dynamic and the bf16 policies, each family on the runtime
  where its default did best; where a family misses the bar, keep-float sets
  of growing size from the sensitivity ranking until it passes; (2) fusions
  off (O1) on each runtime's best; (3) runtime options on the two best
  runtimes (one at a time, then the thread count); (4) each O2 fusion off
  on the best, keeping a drop that is faster; (5) embedding bits; (6)
  pruning ratios, when given; (7) the best pipeline on every other runtime.
  A pipeline that leaves the same program as an earlier one (a fusion that
  does not fire) reuses that trial's results without a build.
- ``random``: uniform draws over the whole space (seeded).
- ``halving``: successive halving with fidelity screening as the cheap
  rung: draw a batch of candidates, screen them all (eager, no compile), then
  build and time the third that meets the bar and runs fastest in eager.

Why ``greedy`` is the default, measured with ``benchmarks/tune_strategies.py``
(every strategy replays the same table of real trials, each charged its
measured cost, so they differ only in what they try when; table in
``benchmarks/README.md``): on bert4rec:tiny (296 real candidates, eager,
TorchScript, ONNX Runtime, batch 1 and 32) greedy reached 0.917 / 0.956 of the
best known speedup within 60 / 180 simulated seconds, random 0.888 / 0.917,
halving 0.888 / 0.892 (median over 3 seeds; greedy uses no randomness), and
greedy reached 95% of it within 180 s where random and halving did on 1 seed
of 3. Compiles dominate the cost (an ONNX export or AOTInductor build is
seconds to minutes, a screen a fraction of that), and the structure of the
space is known: precision decides most of the speed and all of the fidelity,
the runtime most of the rest, fusions and options a few percent. Random spends
its budget compiling combinations that repeat what earlier trials already
showed; halving's eager screening speed does not predict compiled speed (bf16
is slower in eager and fastest under Inductor), so its cheap rung picks the
wrong third.

Every strategy is deterministic for a seed: proposals depend only on the seed,
the space and the results of earlier trials (which ``--resume`` replays
from the log). Timings are measurements, so two fresh runs can take
different branches where two candidates are within noise of each other.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Protocol

from graphopt.tune.space import (
    Candidate,
    Space,
    default_candidates,
    keeps_layers_float,
    reference_candidate,
    thread_option,
)
from graphopt.tune.trials import BELOW_BAR, FAILED, Trial

__all__ = ["SearchContext", "STRATEGIES", "greedy", "random_search", "halving", "prologue"]

log = logging.getLogger(__name__)

#: a candidate must be this much faster to replace the one it was derived from (timing noise)
MARGIN = 1.02


class SearchContext(Protocol):
    space: Space
    seed: int

    def evaluate(self, cand: Candidate, stage: str) -> Trial | None:
        """Run (or replay) a trial; None when the budget does not allow it."""

    def screen(self, cand: Candidate) -> dict | None:
        """Fidelity and eager speed of the candidate's pipeline, without compiling."""

    def ranking(self, family: str = "int8") -> list[str]:
        """Layers for ``family``'s keep-float sets, keep first (computed once; empty when the budget cannot pay)."""

    def exhausted(self) -> bool:
        """No time is left for another trial."""

    def trials(self) -> list[Trial]:
        """Every trial so far (replayed ones included)."""


Strategy = Callable[[SearchContext], None]


# ------------------------------------------------------------ helpers
def _best(trials: list[Trial], pred: Callable[[Trial], bool] = lambda t: True) -> Trial | None:
    ok = [t for t in trials if t.ok and pred(t)]
    return max(ok, key=lambda t: (t.objective, -t.n)) if ok else None


def _ranked_runtimes(ctx: SearchContext) -> list[str]:
    """Runtimes by the best speed seen on them (unseen last, in the space's order)."""
    space = ctx.space
    score = {rt: (_best(ctx.trials(), lambda t, rt=rt: t.candidate.runtime == rt) or None) for rt in space.runtimes}
    return sorted(space.runtimes, key=lambda rt: (-(score[rt].objective if score[rt] else 0.0), space.runtimes.index(rt)))


def _failed_family(ctx: SearchContext, family: str, runtime: str) -> bool:
    """The runtime refused this precision family (a failed build, not a fidelity miss)."""
    return any(t.status == FAILED and t.candidate.family == family and t.candidate.runtime == runtime
               and not t.reason.startswith("pipeline") for t in ctx.trials())


def _try(ctx: SearchContext, cand: Candidate, stage: str) -> Trial | None:
    if ctx.exhausted():
        return None
    return ctx.evaluate(cand, stage)


def prologue(ctx: SearchContext) -> None:
    """The reference, then the defaults (cheap runtimes first, as the space lists them)."""
    _try(ctx, reference_candidate(), "reference")
    for cand in default_candidates(ctx.space):
        _try(ctx, cand, "defaults")


# ------------------------------------------------------------ greedy
def _family_targets(ctx: SearchContext, family: str, default_step: str) -> list[str]:
    """Runtimes to refine ``family`` on: where its default ran fastest, else the fastest
    runtimes that did not refuse it."""
    trials = ctx.trials()
    ok = [t for t in trials if t.ok and t.candidate.family == family and t.candidate.precision == default_step]
    if ok:
        return [t.candidate.runtime for t in sorted(ok, key=lambda t: -t.objective)]
    return [rt for rt in _ranked_runtimes(ctx) if not _failed_family(ctx, family, rt)]


def _refine_precision(ctx: SearchContext, family: str, steps: list[str], all_fusions: tuple[str, ...]) -> None:
    if not steps:
        return
    targets = _family_targets(ctx, family, steps[0])[:2]
    if not targets:
        return
    rt = targets[0]
    results = [_try(ctx, Candidate(fusions=all_fusions, precision=s, runtime=rt), f"precision:{family}") for s in steps]
    done = [t for t in results if t is not None]
    below = [t for t in done if t.status == BELOW_BAR and t.fidelity and keeps_layers_float(t.candidate.precision)]
    if below and not any(t.ok for t in done) and ctx.space.keep_float and not ctx.exhausted() and ctx.ranking(family):
        # every variant missed the bar: keep the most sensitive layers in float, fewest first
        base = max(below, key=lambda t: t.fidelity.get("change_pct", -1e9))
        step = base.candidate.precision
        for k in ctx.space.keep_float:
            t = _try(ctx, Candidate(fusions=all_fusions, precision=step, keep_float=k, runtime=rt),
                     f"keep-float:{family}")
            if t is not None and t.ok:
                break
    best = _best(ctx.trials(), lambda t: t.candidate.family == family and t.candidate.runtime == rt)
    if best is not None:
        for other in targets[1:]:
            _try(ctx, best.candidate.but(runtime=other), f"precision:{family}")


def _ablate_fusions(ctx: SearchContext, start: Candidate, stage: str) -> None:
    current = _best(ctx.trials(), lambda t: t.candidate == start)
    if current is None or start.fusions is None:
        return
    for fusion in ctx.space.fusions:
        if fusion not in (current.candidate.fusions or ()):
            continue
        fewer = tuple(f for f in current.candidate.fusions if f != fusion)
        t = _try(ctx, current.candidate.but(fusions=fewer), stage)
        if t is not None and t.ok and t.objective > current.objective * MARGIN:
            current = t


def _top_per_runtime(ctx: SearchContext, n: int) -> list[Trial]:
    out: list[Trial] = []
    for rt in _ranked_runtimes(ctx):
        best = _best(ctx.trials(), lambda t, rt=rt: t.candidate.runtime == rt and t.candidate.fusions is not None)
        if best is not None:
            out.append(best)
    return out[:n]


def _fusions_off(ctx: SearchContext) -> None:
    """Each runtime's best so far with every fusion off (O1): fusions on/off per backend."""
    for rt in _ranked_runtimes(ctx):
        best = _best(ctx.trials(), lambda t, rt=rt: t.candidate.runtime == rt and bool(t.candidate.fusions))
        if best is not None:
            _try(ctx, best.candidate.but(fusions=()), "fusions")


def _runtime_options(ctx: SearchContext, start: Trial) -> None:
    current = start
    for where, move in ctx.space.runtime_options.get(start.candidate.runtime, []):
        merged = dict(getattr(current.candidate, where))
        merged.update(dict(move))
        trial = _try(ctx, current.candidate.but(**{where: tuple(sorted(merged.items()))}), "runtime-options")
        if trial is not None and trial.ok and trial.objective > current.objective * MARGIN:
            current = trial
    if thread_option(start.candidate.runtime):
        for threads in ctx.space.threads[1:]:
            _try(ctx, current.candidate.but(threads=threads), "threads")


def _overall_best(ctx: SearchContext) -> Trial | None:
    return _best(ctx.trials(), lambda t: t.candidate.fusions is not None)


def greedy(ctx: SearchContext) -> None:
    space = ctx.space
    prologue(ctx)
    all_fusions = tuple(space.fusions)
    _refine_precision(ctx, "int8", space.int8, all_fusions)
    _refine_precision(ctx, "int8-dynamic", space.int8_dynamic, all_fusions)
    _refine_precision(ctx, "bf16", space.bf16, all_fusions)
    _fusions_off(ctx)
    for t in _top_per_runtime(ctx, 2):
        _runtime_options(ctx, t)
    best = _overall_best(ctx)
    if best is not None:
        _ablate_fusions(ctx, best.candidate, "fusions")
    best = _overall_best(ctx)
    if best is not None:
        for emb in space.embeddings:
            _try(ctx, best.candidate.but(embeddings=emb), "embeddings")
        for p in space.prune:
            _try(ctx, _overall_best(ctx).candidate.but(prune=p), "prune")  # type: ignore[union-attr]
        best = _overall_best(ctx)
        for rt in space.runtimes:
            if best is not None and rt != best.candidate.runtime:
                _try(ctx, best.candidate.but(runtime=rt, lower=(), load=(), threads=None), "transfer")


# ------------------------------------------------------------ random
def _draws(space: Space, rng: random.Random) -> Iterator[Candidate]:
    fusion_sets: list[tuple[str, ...]] = [tuple(space.fusions), ()]
    fusion_sets += [tuple(f for f in space.fusions if f != x) for x in space.fusions]
    precisions = [(p, 0) for p in space.precisions()]
    precisions += [(p, k) for p in [*space.int8[:1], *space.int8_dynamic[:1]] for k in space.keep_float]
    embeddings = ["", *space.embeddings]
    prune = ["", *space.prune]
    for _ in range(20000):
        rt = rng.choice(space.runtimes)
        moves = [((), ())] + [(m, ()) if w == "lower" else ((), m) for w, m in space.runtime_options.get(rt, [])]
        precision, keep = rng.choice(precisions)
        lower, load = rng.choice(moves)
        yield Candidate(fusions=rng.choice(fusion_sets), precision=precision, keep_float=keep,
                        embeddings=rng.choice(embeddings), prune=rng.choice(prune) if space.prune else "",
                        runtime=rt, lower=tuple(lower), load=tuple(load))


#: proposals in a row that the budget refused before a random search gives up
_PATIENCE = 200


def random_search(ctx: SearchContext) -> None:
    prologue(ctx)
    rng = random.Random(ctx.seed)
    seen = {t.key for t in ctx.trials()}
    refused = 0
    for cand in _draws(ctx.space, rng):
        if ctx.exhausted() or refused >= _PATIENCE:
            return
        if cand.key in seen:
            continue
        seen.add(cand.key)
        if cand.keep_float and not ctx.ranking(cand.family):
            continue
        refused = refused + 1 if _try(ctx, cand, "random") is None else 0


# ------------------------------------------------------------ halving
def halving(ctx: SearchContext, batch: int = 9, eta: int = 3) -> None:
    prologue(ctx)
    rng = random.Random(ctx.seed)
    seen = {t.key for t in ctx.trials()}
    draws = _draws(ctx.space, rng)
    while not ctx.exhausted():
        rung: list[tuple[float, Candidate]] = []
        drawn = 0
        for cand in draws:
            if cand.key in seen:
                continue
            seen.add(cand.key)
            if cand.keep_float and not ctx.ranking(cand.family):
                continue
            screened = ctx.screen(cand)
            if ctx.exhausted():
                return
            if screened is not None and screened.get("meets"):
                rung.append((screened.get("eager_ms", float("inf")), cand))
            drawn += 1
            if drawn == batch:
                break
        if not drawn:
            return
        rung.sort(key=lambda x: x[0])
        started = [_try(ctx, cand, "halving") for _, cand in rung[: max(1, len(rung) // eta)]]
        if rung and all(t is None for t in started):
            return  # the budget refuses this rung's builds: the next one would fare no better


STRATEGIES: dict[str, Strategy] = {"greedy": greedy, "random": random_search, "halving": halving}
