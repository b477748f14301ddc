"""``--force`` per verb: a user's folder is refused (before any work) and keeps its files,
and a run that fails under ``--force`` leaves the previous graphopt output as it was.

``lower`` is ``graphopt optimize --runtime`` on the CLI and ``graphopt.lower`` in
Python; ``demo`` has no ``--force``: it replaces only its own earlier report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import graphopt
from graphopt.cli import main
from graphopt.errors import ArtifactError
from graphopt.outputs import atomic_directory

#: verb -> its arguments, with OUT for the output folder
VERBS = {
    "optimize": ["optimize", "dlrm:tiny", "-p", "dce", "-o", "OUT", "--force"],
    "lower": ["optimize", "dlrm:tiny", "-p", "dce", "--runtime", "eager", "-o", "OUT", "--force"],
    "bench": ["bench", "dlrm:tiny", "-p", "none", "--runtimes", "eager", "--batch-sizes", "2", "--quick",
              "--no-memory", "-o", "OUT", "--force"],
    "demo": ["demo", "--quick", "--data", "synthetic", "--runtimes", "eager", "-o", "OUT"],
    "finetune": ["finetune", "bert4rec:tiny", "--data", "synthetic", "--max-steps", "1", "-o", "OUT", "--fresh"],
}
#: verb -> arguments of a run that fails (after the output folder was accepted)
FAILING = {
    "optimize": ["optimize", "dlrm:tiny", "-p", "dce,test-raises", "-o", "OUT", "--force"],  # a pass that raises
    "lower": ["optimize", "dlrm:tiny", "-p", "cast{dtype=bf16}", "--runtime", "onnxruntime", "-o", "OUT", "--force"],
    "bench": ["bench", "CORRUPT", "--runtimes", "eager", "--quick", "--no-memory", "-o", "OUT", "--force"],
    "demo": ["demo", "--quick", "--data", "synthetic", "--model", "nosuch:tiny", "-o", "OUT"],
}


def _args(template: list[str], **paths: Path) -> list[str]:
    return [str(paths[a]) if a in paths else a for a in template]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("verb", list(VERBS))
def test_a_users_folder_is_refused_even_with_force(tmp_path, capsys, verb):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("do not lose me")
    cache = tmp_path / "cache"
    args = _args(VERBS[verb], OUT=user) + (["--cache-dir", str(cache)] if verb == "demo" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    even = {"demo": "", "finetune": " even with --fresh"}.get(verb, " even with --force")  # each verb's own flag
    assert err == (f"graphopt: error: {user} exists and was not written by graphopt (no .graphopt file); "
                   f"graphopt will not replace it{even}; pick another -o"), err
    assert _snapshot(user) == {"notes.txt": b"do not lose me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # refused before any work: no cache, no temp folder


def test_lower_refuses_a_users_folder_in_python(tmp_path, program):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("do not lose me")
    with pytest.raises(ArtifactError, match="was not written by graphopt .* even with --force"):
        graphopt.lower(program("dlrm:tiny"), "eager", user, force=True)
    assert _snapshot(user) == {"notes.txt": b"do not lose me"}
    assert not [p for p in tmp_path.iterdir() if p.name != "mine"]


@pytest.mark.parametrize("verb", list(FAILING))
def test_a_failing_run_under_force_keeps_the_previous_output(tmp_path, capsys, verb):
    import tests.transform.test_pass_manager  # noqa: F401  (registers test-raises)

    previous = tmp_path / "previous"
    with atomic_directory(previous, kind=verb) as tmp:  # graphopt's own earlier output, as each verb leaves it
        name = {"demo": "demo.json", "bench": "report.json"}.get(verb, "report.json")
        (tmp / name).write_text(json.dumps({"earlier": verb}))
    before = _snapshot(previous)
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 not a torch.export archive")
    args = _args(FAILING[verb], OUT=previous, CORRUPT=corrupt)
    if verb == "demo":
        args += ["--cache-dir", str(tmp_path / "cache")]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and err.startswith("graphopt: error: ") and "\n" not in err, err
    assert _snapshot(previous) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".previous.")]  # no temp folder left


@pytest.mark.parametrize("verb", ["optimize", "bench"])
def test_force_keeps_a_users_files_added_to_a_graphopt_folder(tmp_path, capsys, verb):
    """Was: --force replaced a graphopt folder whole, notes the user had put in it included. The marker
    lists what graphopt wrote; anything else makes --force refuse (in one line, before any work)."""
    out = tmp_path / "out"
    assert main(_args(VERBS[verb], OUT=out)) == 0
    capsys.readouterr()
    (out / "my_notes.txt").write_text("do not lose me")
    (out / "mine").mkdir()
    (out / "mine" / "r.csv").write_text("1,2\n")
    before = _snapshot(out)
    assert main(_args(VERBS[verb], OUT=out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"graphopt: error: {out} holds files graphopt did not write (mine/r.csv and 1 more); move them "
                   "out and run again (--force replaces only graphopt's own output), or pick another -o"), err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (out / "my_notes.txt").unlink()
    (out / "mine" / "r.csv").unlink()  # near miss: an empty folder of the user's is no file to lose
    assert main(_args(VERBS[verb], OUT=out)) == 0
    assert "my_notes.txt" not in _snapshot(out)
