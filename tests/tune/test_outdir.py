"""OUT of ``graphopt tune`` under --resume and --force, on real tune outputs of dlrm:tiny.

--resume continues only the run OUT holds (same model and Program, calibration file and its
contents, seed, threads, ...); --force replaces only an earlier tune output, never a user's file
in it (best/ and .work/ included), another kind of graphopt output, or the model being tuned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.bench.timing import TimingConfig
from graphopt.cli import main
from graphopt.errors import ArtifactError
from graphopt.tune.data import DataSpecError, resolve_model
from graphopt.tune.tuner import _prepare_out

QUICK = TimingConfig(warmup=1, rounds=2, round_time_s=0.0, max_calls=1)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tune(model, out, **kw):
    args = {"runtimes": "eager", "batch_sizes": 2, "seq_lens": 16, "threads": 1, "max_trials": 2, "budget": 120,
            "timing": QUICK, "confirm_timing": QUICK, "seed": 0, **kw}  # runtimes and sizes as one str / int
    return graphopt.tune(model, out, **args)


def _fresh(root: Path) -> tuple[Path, Path, Path]:
    """A saved Program (an `optimize` output), a calibration file, and a finished tune of them."""
    model = root / "model"
    assert main(["optimize", "dlrm:tiny", "-p", "dce", "-o", str(model)]) == 0
    tm = resolve_model(str(model))
    calib = root / "calib.pt"
    torch.save([dict(zip(tm.program.input_names, tm.make_inputs(4, 16, s))) for s in range(4)], calib)
    out = root / "tuned"
    result = _tune(str(model), out, calib=calib)
    assert result.best_trial is not None and (out / "best" / "manifest.json").is_file()
    return model, calib, out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _fresh(tmp_path_factory.mktemp("outdir"))


def _copy(base, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The shared model and calibration file (read only) and a copy of the tune output."""
    model, calib, out = base
    shutil.copytree(out, tmp_path / "tuned")
    return model, calib, tmp_path / "tuned"


# ------------------------------------------------------------------ --resume
def test_resume_with_the_same_settings_continues(base, tmp_path):
    model, calib, out = _copy(base, tmp_path)
    result = _tune(str(model), out, calib=calib, resume=True, max_trials=1)
    assert [t.resumed for t in result.trials][:2] == [True, True] and len(result.trials) == 3


@pytest.mark.parametrize("change, named", [
    ("seed", "--seed (0; this run: 1)"),
    ("threads", "--threads (1; this run: 2)"),
    ("calib contents", "--calib file contents (sha256)"),
    ("calib path", "--calib file ("),
    ("model", "model (its Program's graph and weights, sha256)"),
    ("runtimes", "--runtimes (['eager']; this run: ['torchscript'])"),  # was: a report naming another runtime's best
])
def test_resume_refuses_a_run_under_other_settings(base, tmp_path, change, named):
    model, calib, out = _fresh(tmp_path) if change in ("calib contents", "model") else _copy(base, tmp_path)
    kw: dict = {"calib": calib}
    if change == "seed":
        kw["seed"] = 1
    elif change == "threads":
        kw["threads"] = 2
    elif change == "calib contents":  # the same path, other batches
        batches = torch.load(calib, weights_only=True)
        torch.save(batches[::-1], calib)
    elif change == "runtimes":
        kw["runtimes"] = "torchscript"
    elif change == "calib path":
        kw["calib"] = shutil.copy(calib, tmp_path / "other.pt")
    else:  # another Program at the same path, with the same name (dce not applied: one more node)
        assert main(["optimize", "dlrm:tiny", "-p", "remove-dropout", "-o", str(model), "--force"]) == 0
    before = _snapshot(out)
    with pytest.raises(DataSpecError) as e:
        _tune(str(model), out, resume=True, **kw)
    text = str(e.value)
    assert text.startswith(f"--resume: {out} was tuned with another {named}") and "\n" not in text, text
    assert text.endswith("resume with the same settings or start over with --force")
    assert _snapshot(out) == before


@pytest.mark.parametrize("damage", ["garbage", "gone"])
def test_resume_refuses_a_damaged_log_beside_a_best(base, tmp_path, damage):
    """Was: with trials.jsonl unreadable or gone, --resume replaced OUT/best (the run's winner) with
    the eager reference, saying only that a last line was torn."""
    model, calib, out = _copy(base, tmp_path)
    if damage == "garbage":
        (out / "trials.jsonl").write_text("garbage\n")
    else:
        (out / "trials.jsonl").unlink()
    before = _snapshot(out)
    with pytest.raises(DataSpecError, match=r"^--resume: .*trials\.jsonl holds no readable trial, yet .*best holds .*: "
                       r"the log is damaged or gone; restore it, or start over with --force$"):
        _tune(str(model), out, calib=calib, resume=True, max_trials=1)
    assert _snapshot(out) == before


def test_force_takes_the_leftover_of_an_interrupted_best_exchange(base, tmp_path):
    model, calib, out = _copy(base, tmp_path)
    shutil.copytree(out / "best", out / ".best.tmp-abc123")  # what a SIGKILL mid-exchange leaves
    result = _tune(str(model), out, calib=calib, force=True, max_trials=1)
    assert result.best_trial is not None and not (out / ".best.tmp-abc123").exists()


def test_resume_refuses_a_users_file_in_best_before_running(base, tmp_path):
    model, calib, out = _copy(base, tmp_path)
    (out / "best" / "deploy.yaml").write_text("replicas: 3\n")
    before = _snapshot(out)
    with pytest.raises(ArtifactError, match=r"holds files graphopt did not write \(best/deploy.yaml\); the run "
                                            r"replaces best/ and removes .work/: move them out"):
        _tune(str(model), out, calib=calib, resume=True, max_trials=1)
    assert _snapshot(out) == before


# ------------------------------------------------------------------ --force
@pytest.mark.parametrize("where", ["best/deploy.yaml", "best/mine/keep.txt", ".work/mine.txt"])
def test_force_keeps_a_users_file_inside_best_and_work(base, tmp_path, where):
    _, _, out = _copy(base, tmp_path)
    (out / where).parent.mkdir(parents=True, exist_ok=True)
    (out / where).write_text("mine")
    before = _snapshot(out)
    with pytest.raises(ArtifactError, match=f"holds files graphopt did not write \\({where}\\)"):
        _prepare_out(out, {"model": "x"}, resume=False, force=True)
    assert _snapshot(out) == before


def test_force_replaces_an_earlier_tune_output_with_best_and_work(base, tmp_path):
    _, _, out = _copy(base, tmp_path)
    shutil.copytree(out / "best", out / ".work" / "t0003")  # a work artifact left by a killed run
    _prepare_out(out, {"model": "x"}, resume=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == [".graphopt", "tune.json"]


def test_force_never_replaces_the_model_or_another_kind_of_output(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["optimize", "dlrm:tiny", "-p", "dce", "-o", str(model)]) == 0
    before = _snapshot(model)
    for target, message in [(model, f"-o {model} is the model being tuned ({model}); pick an -o outside it"),
                            (model / "sub", f"-o {model / 'sub'} lies inside the model being tuned"),
                            (tmp_path, f"-o {tmp_path} holds the model being tuned")]:
        with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _tune(str(model), target, force=True)
    # another model tuned into an `optimize` output: refused on the CLI in one line, before any work
    code = main(["tune", "dlrm:tiny", "--runtimes", "eager", "--budget", "5", "--force", "-o", str(model)])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"graphopt: error: {model} is a saved Program (an `optimize` output), not a "
                                 "`graphopt tune` output; --force replaces only an earlier tune output: pick another -o\n"), err
    assert _snapshot(model) == before


def test_force_refuses_a_fine_tuned_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["finetune", "bert4rec:tiny", "--data", "synthetic", "--max-steps", "1", "-o", str(ckpt)]) == 0
    capsys.readouterr()
    before = _snapshot(ckpt)
    code = main(["tune", "dlrm:tiny", "--runtimes", "eager", "--budget", "5", "--force", "-o", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and "is a fine-tuned checkpoint, not a `graphopt tune` output" in err and err.count("\n") == 1
    assert _snapshot(ckpt) == before
    json.loads((ckpt / ".graphopt").read_text())  # its marker untouched too
