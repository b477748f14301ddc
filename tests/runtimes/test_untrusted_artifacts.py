"""Artifacts that cannot be trusted are refused, on every runtime, in the same words.

runtime x corruption: each case damages a copy of a lowered bert4rec:tiny
artifact (a flipped byte, a truncated file, a link or a manifest path leading
out of the folder, a file added after lowering, a manifest that is not JSON,
of another format, missing a key or with a wrong type, an input contract
edited by hand) and requires
``graphopt.load`` to raise one :class:`ArtifactError` line that names the
runtime and says to re-lower, before any model file is deserialized. The
runtime-specific files get their own cases: ONNX Runtime's stored optimized
model (tests/runtimes/test_onnxruntime.py, on its artifact lowered with
``save_optimized``), the stage files of ``stages``. Artifacts come from the
conformance suite's, lowered once per session across the test workers (one
AOTInductor compile for the whole session: tests/_lowered_once.py).

Deserializing a damaged AOTInductor package segfaults the process (measured:
exit 139 with ``verify=False``), so the cases that would reach a native
loader if a check were missing also run in a subprocess, which must exit
normally with one ``graphopt: error:`` line per case.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.errors import ArtifactError
from graphopt.runtime import MANIFEST_FORMAT, lower
from tests.runtimes.test_conformance import _STATUS, _artifact, _marked

#: the conformance suite's order reversed: when the two files run at once on two test workers,
#: each lowers what the other will ask for last, and neither waits for the other's lowering
RUNTIMES = ["tensorrt", "stages", "inductor", "onnxruntime", "torchscript", "eager"]
_EXTRA: dict = {}


def _stages_artifact(tmp_path_factory, program):
    if "stages" not in _EXTRA:
        split, _ = graphopt.optimize(program("bert4rec:tiny"), "split-stages{n=2}", verify_each=False)
        _EXTRA["stages"] = lower(split, "stages", tmp_path_factory.mktemp("untrusted") / "stages")
    return _EXTRA["stages"]


def _source(tmp_path_factory, program, runtime: str):
    if runtime == "stages":
        return _stages_artifact(tmp_path_factory, program)
    return _artifact(tmp_path_factory, program, runtime, "bert4rec:tiny", "fp32")[1]


def _copy(artifact, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(artifact.path, copy)
    return copy


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m))


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


# --------------------------------------------------------------- corruptions
# each: (damage(copy, name) -> None, the message after "<runtime> | <copy>: " with {name} for the file)
_RELOWER = "re-lower the artifact"


def _link_out(d: Path, name: str) -> None:
    outside = d.parent / f"outside-{Path(name).name}"
    shutil.copy2(d / name, outside)  # the same bytes: only the path check can catch it
    (d / name).unlink()
    (d / name).symlink_to(outside)


def _entry_dotdot(d: Path, name: str) -> None:
    m = _manifest(d)
    m["files"]["../" + name] = m["files"].pop(name)
    m["backend"]["entry"] = "../" + name
    shutil.copy2(d / name, d.parent / name)
    _write_manifest(d, m)


def _entry_absolute(d: Path, name: str) -> None:
    m = _manifest(d)
    target = str((d.parent / name).resolve())
    shutil.copy2(d / name, target)
    m["files"][target] = m["files"].pop(name)
    _write_manifest(d, m)


def _entry_without_checksum(d: Path, name: str) -> None:
    m = _manifest(d)
    del m["files"][name]
    _write_manifest(d, m)


def _contract_deleted(d: Path, name: str) -> None:
    """A hand edit every other check accepts: without its id ranges the runner would not check ids
    (an out-of-range id aborted the Inductor runner's process before the manifest had a digest)."""
    m = _manifest(d)
    assert m["index_ranges"], "bert4rec:tiny's artifact should bound its item ids"
    _write_manifest(d, {**m, "index_ranges": {}})


def _file_added(d: Path, name: str) -> None:
    (d / "notes.txt").write_text("added after lowering")


CORRUPTIONS: dict[str, tuple[Callable[[Path, str], None], str]] = {
    "flipped byte": (lambda d, n: _flip(d / n),
                     r"checksum mismatch for {name} \(changed or corrupted since lowering\); " + _RELOWER),
    "truncated": (lambda d, n: _truncate(d / n),
                  r"{name} is \d+ bytes, the manifest says \d+ \(truncated or changed since lowering\); " + _RELOWER),
    "link out of the folder": (_link_out, r"file {name} links to \S+, outside the artifact folder; "
                                          r"refusing to read it; " + _RELOWER),
    "entry at ../": (_entry_dotdot, r"the manifest names file '\.\./{name}', which is not inside the artifact "
                                    r"folder; refusing to read it; " + _RELOWER),
    "absolute path": (_entry_absolute, r"the manifest names file '/\S+', which is not inside the artifact folder; "
                                       r"refusing to read it; " + _RELOWER),
    "no checksum": (_entry_without_checksum, r"{name} has no checksum in the manifest; " + _RELOWER),
    "contract edited": (_contract_deleted, r"manifest\.json was edited after lowering \(its digest does not match "
                                           r"its contents\); an edited input contract would switch the runner's "
                                           r"checks off; " + _RELOWER),
    "file added": (_file_added, r"file notes\.txt is not listed in the manifest \(added after lowering\); "
                                r"remove it or " + _RELOWER),
}
#: manifest damage, reported before the runtime is known: (damage(copy), whole message)
MANIFESTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "not JSON": (lambda d: (d / "manifest.json").write_text('{"format": "graphopt.artifact/1", "runt'),
                 r"{path}/manifest\.json is not valid JSON \(.+\); " + _RELOWER),
    "another format": (lambda d: _write_manifest(d, {**_manifest(d), "format": "graphopt.artifact/0"}),
                       r"{path} has manifest format 'graphopt\.artifact/0', this graphopt reads "
                       rf"'{re.escape(MANIFEST_FORMAT)}'; re-lower the Program with this graphopt"),
    "key missing": (lambda d: _write_manifest(d, {k: v for k, v in _manifest(d).items() if k != "files"}),
                    r"{path}/manifest\.json lacks 'files'; " + _RELOWER),
    "no digest": (lambda d: _write_manifest(d, {k: v for k, v in _manifest(d).items() if k != "digest"}),
                  r"{path}/manifest\.json lacks 'digest'; " + _RELOWER),
    "wrong type": (lambda d: _write_manifest(d, {**_manifest(d), "files": list(_manifest(d)["files"])}),
                   r"{path}/manifest\.json: 'files' must map each file name to its sha256 and bytes; " + _RELOWER),
    "bad checksum field": (lambda d: _write_manifest(d, {**_manifest(d), "files": {
                               k: {"sha256": "abc", "bytes": v["bytes"]} for k, v in _manifest(d)["files"].items()}}),
                           r"{path}/manifest\.json: file '[^']+' needs a sha256 \(64 hex digits\) and a byte count; "
                           + _RELOWER),
    "bad per-slot index range": (lambda d: _write_manifest(d, {**_manifest(d), "index_ranges": {
                                     "input_ids": {"dim": 1, "high": ["52"]}}}),
                                 r"{path}/manifest\.json: 'index_ranges' must map each input to \[low, high\) or "
                                 r"\{{\"dim\": d, \"high\": \[rows per slot\]\}}; " + _RELOWER),
}


def _refused(d: Path) -> str:
    with pytest.raises(ArtifactError) as info:
        graphopt.load(d)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("runtime,case", [_marked(r, c) for r in RUNTIMES for c in CORRUPTIONS])
def test_damaged_file_is_refused_in_the_same_words(tmp_path_factory, program, tmp_path, runtime, case):
    artifact = _source(tmp_path_factory, program, runtime)
    d = _copy(artifact, tmp_path)
    name = artifact.manifest["backend"]["entry"]
    damage, words = CORRUPTIONS[case]
    damage(d, name)
    message = _refused(d)
    assert re.fullmatch(rf"{runtime} \| {re.escape(str(d))}: " + words.format(name=re.escape(name)), message), message


@pytest.mark.parametrize("runtime,case", [_marked(r, c) for r in RUNTIMES for c in MANIFESTS])
def test_untrusted_manifest_is_refused_in_the_same_words(tmp_path_factory, program, tmp_path, runtime, case):
    d = _copy(_source(tmp_path_factory, program, runtime), tmp_path)
    damage, words = MANIFESTS[case]
    damage(d)
    message = _refused(d)
    assert re.fullmatch(words.format(path=re.escape(str(d))), message), message


@pytest.mark.parametrize("runtime", [_marked(r) for r in RUNTIMES])
def test_intact_copy_loads_and_a_file_changed_after_load_is_refused(tmp_path_factory, program, tmp_path, runtime):
    """The near miss (an intact copy runs, also without the sha256 pass), then a file changed between
    load() and the first call: the runner re-checks what moved before its backend reads anything."""
    artifact = _source(tmp_path_factory, program, runtime)
    d = _copy(artifact, tmp_path)
    feeds = program("bert4rec:tiny").sample_inputs(batch=2, seq=8)
    serves = runtime != "stages"  # stages spawns a rank per activation (seconds): test_stages.py runs it
    if serves:
        with graphopt.load(d) as runner:
            expected = runner(*feeds)[0]
    graphopt.load(d, verify=False).close()
    runner = graphopt.load(d)
    name = artifact.manifest["backend"]["entry"]
    _flip(d / name)
    with pytest.raises(ArtifactError, match=rf"^{runtime} \| .*checksum mismatch for {re.escape(name)} "):
        runner(*feeds)
    assert not runner.is_active
    _flip(d / name)  # restored bytes: the same runner now loads and serves
    if serves:
        torch.testing.assert_close(runner(*feeds)[0], expected, atol=0, rtol=0)
        runner.close()
    _truncate(d / name)  # sizes are checked even when the sha256 pass is skipped
    with pytest.raises(ArtifactError, match=r"truncated or changed since lowering"):
        graphopt.load(d, verify=False)


def test_a_folder_moved_after_load_says_load_it_again(tmp_path_factory, program, tmp_path):
    """Was: "file program.pt2 was removed after the artifact was checked; re-lower the artifact" for an
    intact folder that was only moved (re-lowering is the wrong, expensive advice)."""
    d = _copy(_source(tmp_path_factory, program, "eager"), tmp_path)
    runner = graphopt.load(d)
    d.rename(tmp_path / "moved")
    with pytest.raises(ArtifactError, match=rf"^eager \| {re.escape(str(d))}: the folder is gone since load\(\) "
                                            r"read it \(moved or deleted\); load it again from where it is now$"):
        runner(*program("bert4rec:tiny").sample_inputs(batch=2, seq=8))
    with graphopt.load(tmp_path / "moved") as moved:
        moved(*program("bert4rec:tiny").sample_inputs(batch=2, seq=8))


def test_stage_files_are_covered(tmp_path_factory, program, tmp_path):
    artifact = _stages_artifact(tmp_path_factory, program)
    assert [s["file"] for s in artifact.backend["stages"]] == ["stage0.pt2", "stage1.pt2"]
    for damage, words in ((_flip, r"checksum mismatch for stage1\.pt2"), (_truncate, r"stage1\.pt2 is \d+ bytes")):
        d = _copy(artifact, tmp_path / damage.__name__)
        damage(d / "stage1.pt2")
        assert re.match(rf"stages \| {re.escape(str(d))}: {words}", _refused(d))
    d = _copy(artifact, tmp_path / "dotdot")
    m = _manifest(d)
    m["backend"]["stages"][1]["file"] = "../stage1.pt2"
    _write_manifest(d, m)
    assert "names file '../stage1.pt2', which is not inside the artifact folder" in _refused(d)
    m["backend"]["stages"] = m["backend"]["stages"][:1]  # fewer stage files than num_stages
    _write_manifest(d, m)
    assert "the manifest's backend section is malformed" in _refused(d)


_SURVIVE = r"""
import json, sys
from pathlib import Path
import torch
import graphopt
from graphopt.cli import main
cases = json.loads(sys.argv[1])
for d, kind in cases:
    if kind == "changed after load":  # the runner passed load(); its file changes before the first call
        runner = graphopt.load(d)
        f = Path(d) / runner.artifact.manifest["backend"]["entry"]
        data = bytearray(f.read_bytes()); data[len(data) // 2] ^= 0xFF; f.write_bytes(bytes(data))
        try:
            runner(*[s.sample({}, torch.Generator()) for s in runner.inputs])
            print("RAN", d, flush=True)
        except graphopt.GraphoptError as e:
            print("REFUSED", str(e).replace(chr(10), " "), flush=True)
    else:
        print("EXIT", main(["run", d, "--random-inputs", "--repeat", "1"]), flush=True)
print("SURVIVED", flush=True)
"""


def test_damaged_native_artifacts_do_not_kill_the_process(tmp_path_factory, program, tmp_path):
    """The cases that reach a native loader if a check is missing (AOTInductor's package segfaults on a
    flipped byte, TorchScript's and ONNX Runtime's readers), run by `graphopt run` in one subprocess."""
    cases = []
    for runtime in ("inductor", "torchscript", "onnxruntime"):
        if not _STATUS[runtime].available:
            continue
        artifact = _source(tmp_path_factory, program, runtime)
        name = artifact.manifest["backend"]["entry"]
        for kind, damage in (("flipped byte", _flip), ("truncated", _truncate), ("changed after load", None)):
            d = tmp_path / f"{runtime}-{kind.replace(' ', '-')}"
            shutil.copytree(artifact.path, d)
            if damage is not None:
                damage(d / name)
            cases.append((str(d), kind))
    if not cases:
        pytest.skip("no native runtime available")
    proc = subprocess.run([sys.executable, "-c", _SURVIVE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "SURVIVED"
    verdicts = lines[:-1]
    assert len(verdicts) == len(cases), proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("graphopt: error:")]
    assert sum(v == "EXIT 2" for v in verdicts) == len(errors) == sum(k != "changed after load" for _, k in cases)
    assert all(v == "EXIT 2" or v.startswith("REFUSED ") for v in verdicts), verdicts
    assert all("re-lower the artifact" in e for e in errors) and all("checksum mismatch" in v for v in verdicts
                                                                       if v.startswith("REFUSED"))
