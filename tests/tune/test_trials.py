"""trials.jsonl: one fsynced line per trial; a torn last line is dropped and cut off."""

from __future__ import annotations

import json

from graphopt.tune.space import Candidate
from graphopt.tune.trials import OK, Trial, TrialLog


def _trial(n: int) -> Trial:
    return Trial(n=n, candidate=Candidate(fusions=("fuse-qkv",), precision="cast{dtype=bf16}", runtime="eager"),
                 stage="defaults", status=OK, pipeline="O1,fuse-qkv,cse,dce,cast{dtype=bf16}",
                 fidelity={"metric": "topk_overlap", "value": 1.0, "meets": True}, objective=1.5,
                 latency={"b1": {"p50_ms": 1.0, "speedup": 1.5}}, compile_s=2.0)


def test_round_trip_and_torn_tail(tmp_path):
    log = TrialLog(tmp_path / "trials.jsonl")
    log.append(_trial(1))
    log.append(_trial(2))
    with open(log.path, "ab") as f:  # the process died while writing trial 3
        f.write(json.dumps(_trial(3).to_json()).encode()[:40])
    read = TrialLog(log.path).read()
    assert [t.n for t in read] == [1, 2] and all(t.resumed for t in read)
    assert read[0].candidate == _trial(1).candidate and read[0].objective == 1.5 and read[0].ok
    again = TrialLog(log.path)
    again.append(_trial(3))  # the torn bytes are cut before the next line
    lines = log.path.read_text().splitlines()
    assert len(lines) == 3 and [json.loads(x)["n"] for x in lines] == [1, 2, 3]
    line = json.loads(lines[0])
    for key in ("key", "pipeline", "runtime", "options", "fidelity", "latency", "compile_s", "status", "reason"):
        assert key in line
