"""Program: run-time input checks, save/load round trip, corrupted files."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import ArtifactError, Program, RunnerError


def test_input_checks_name_runtime_input_and_fix(program):
    prog = program("bert4rec:tiny")
    ids, mask = prog.sample_inputs()
    with pytest.raises(RunnerError, match=r"^eager \| input 'input_ids': expected int64, got float32"):
        prog(ids.float(), mask)
    with pytest.raises(RunnerError, match="expected rank 2"):
        prog(ids[0], mask)
    with pytest.raises(RunnerError, match="expected 2 inputs"):
        prog(ids)


def test_keyword_inputs(program):
    prog = program("bert4rec:tiny")
    ids, mask = prog.sample_inputs()
    torch.testing.assert_close(prog(input_ids=ids, attention_mask=mask)[0], prog(ids, mask)[0])


def test_sample_inputs_resize_labelled_dims(program):
    prog = program("bert4rec:tiny")
    ids, mask = prog.sample_inputs(batch=2, seq=40, seed=1)
    assert ids.shape == (2, 40) and mask.shape == (2, 40)
    assert int(ids.min()) >= 1 and int(mask.min()) == 1


def test_save_load_roundtrip_matches_to_1e5(tmp_path, program, zoo):
    prog = program("bert-cls:tiny")
    path = prog.save(tmp_path / "p.pt2")
    loaded = Program.load(path)
    assert loaded.input_names == prog.input_names
    assert loaded.output_names == prog.output_names
    assert [s.dynamic for s in loaded.inputs] == [s.dynamic for s in prog.inputs]
    for batch, seq in [(4, 16), (2, 48)]:
        inputs = zoo("bert-cls:tiny").make_inputs(batch=batch, seq=seq, seed=2)
        ref = zoo("bert-cls:tiny").module(**inputs).logits
        torch.testing.assert_close(loaded(*inputs.values())[0], ref, atol=1e-5, rtol=1e-5)


def test_save_refuses_overwrite_without_force(tmp_path, program):
    prog = program("dlrm:tiny")
    path = prog.save(tmp_path / "p.pt2")
    before = path.read_bytes()
    with pytest.raises(ArtifactError, match="force"):
        prog.save(path)
    assert path.read_bytes() == before
    prog.save(path, force=True)
    assert Program.load(path).num_parameters() == prog.num_parameters()


def test_corrupted_or_foreign_files_give_clear_errors(tmp_path, program):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ArtifactError, match="not a readable torch.export archive"):
        Program.load(bad)
    with pytest.raises(ArtifactError, match="no saved Program"):
        Program.load(tmp_path / "missing.pt2")
    # a plain torch.export archive without graphopt's metadata
    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    foreign = tmp_path / "foreign.pt2"
    torch.export.save(ep, str(foreign))
    with pytest.raises(ArtifactError, match="not written by graphopt"):
        Program.load(foreign)


def test_truncated_file_is_detected(tmp_path, program):
    path = program("dlrm:tiny").save(tmp_path / "p.pt2")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError):
        Program.load(path)


def test_a_flipped_weight_byte_is_refused(tmp_path, program):
    """Was: a saved Program whose weight bytes changed on disk loaded and returned slightly different
    scores. Its metadata now carries a sha256 of the weights, checked on load."""
    import struct
    import zipfile

    path = program("dlrm:tiny").save(tmp_path / "p.pt2")
    Program.load(path)  # intact: loads
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/weights/weight_" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[at] ^= 0x01  # the lowest bit of one byte in the middle of the largest weight
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"is damaged: its weights do not match the checksum saved with them"):
        Program.load(path)


def test_a_lowered_package_is_named_as_such(tmp_path):
    """An AOTInductor package (OUT/inductor/model.pt2) given where a saved Program is expected: said so,
    not "re-create it". Built from a zip member name, not a compile: the check reads names only."""
    import zipfile

    fake = tmp_path / "model.pt2"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("model/data/aotinductor/model/x.wrapper.cpp", "// AOTI wrapper")
    with pytest.raises(ArtifactError, match=r"is an AOTInductor package \(a lowered artifact\), not a saved Program"):
        Program.load(fake)


def test_describe_counts_only_used_parameters(program):
    prog = program("dlrm:tiny")
    info = prog.describe()
    assert info["parameters"] == prog.num_parameters() > 0
    assert info["ops"]["aten.linear.default"] == 4


def test_fingerprint_covers_code_io_and_weights(program):
    p = program("bert4rec:tiny")
    twin = p.copy()
    assert p.fingerprint() == twin.fingerprint() == p.fingerprint()
    weight = next(iter(twin.parameter_tensors().values()))
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3  # one weight differs
    assert p.fingerprint() != twin.fingerprint()
    o2, _ = graphopt.optimize(p, "O2", verify_each=False)  # same weights, other code
    assert o2.gm.code != p.gm.code and p.fingerprint() != o2.fingerprint()
    half = p.copy()  # the same values in another dtype
    with torch.no_grad():
        for t in half.parameter_tensors().values():
            t.data = t.data.to(torch.bfloat16)
    assert p.fingerprint() != half.fingerprint()
