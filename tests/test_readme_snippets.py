"""README.md's Python blocks run as written, in order, in one namespace (the Runtimes block lowers the
API block's ``fast``), in a temporary folder (they write ``bert4rec.pt2``, ``out/ort``, ``out/inc``).
What a block takes from the reader (``batches``, ``input_ids``, a causal ``program``...) is defined
before it, on zoo models; one edit: the incremental block lowers to eager instead of Inductor (its own
comment names eager; the Inductor artifact is tests/runtime/test_incremental.py's, tens of seconds to
compile). A README block added without its entry in ``GIVEN`` fails here, so every block stays run.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import graphopt
from graphopt.rec.zoo import load_model
from graphopt.transform import base

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _api(ns: dict) -> None:
    """The int8 lines' calibration batches and validation data (bert4rec:tiny, seeded)."""
    zm = load_model("bert4rec:tiny")
    ns["batches"] = [tuple(zm.make_inputs(batch=8, seq=16, seed=i).values()) for i in range(4)]
    ns["valid_batches"] = [tuple(zm.make_inputs(batch=8, seq=16, seed=10 + i).values()) for i in range(2)]
    with torch.no_grad():  # targets on eager's top-10 boundary: a ranking that moves shows
        order = torch.cat([zm.module(*b) for b in ns["valid_batches"]]).argsort(dim=1, descending=True)
    ns["valid_targets"] = order[:, 9]


def _runtimes(ns: dict) -> None:
    ns["input_ids"], ns["attention_mask"] = load_model("bert4rec:tiny").make_inputs(batch=2, seq=12, seed=3).values()


def _incremental(ns: dict) -> None:
    zm = load_model("gpt-rec:tiny")
    ns["program"] = zm.capture()
    ns["input_ids"], ns["attention_mask"] = zm.make_inputs(batch=2, seq=6, seed=4).values()
    ns["attention_mask"][1, :2] = 0  # the second user has 4 events: left padding
    ns["new_items"] = torch.tensor([[5], [7]])


#: per README block, in order: what the reader brings, and the edit (old, new) made to the block
GIVEN = [
    (_api, None),
    (_runtimes, None),
    (_incremental, ('"inductor", "out/inc"', '"eager", "out/inc"')),
    (lambda ns: None, None),
]


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    assert len(BLOCKS) == len(GIVEN), f"README.md has {len(BLOCKS)} Python blocks; GIVEN says how to run {len(GIVEN)}"
    monkeypatch.chdir(tmp_path)
    base.available_passes()  # builtins loaded into the real registry first: the copy below must not be where they land
    monkeypatch.setattr(base, "_PASSES", dict(base._PASSES))  # the pass the last block registers stays here
    ns: dict = {}
    for i, (block, (given, edit)) in enumerate(zip(BLOCKS, GIVEN)):
        given(ns)
        if edit is not None:
            assert edit[0] in block, f"block {i + 1} no longer contains {edit[0]!r}"
            block = block.replace(*edit)
        exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
        if i == 0:  # the API block: scores at a new shape, a saved program, an int8 Program held to the data
            assert ns["scores"].shape[0] == 1 and Path("bert4rec.pt2").is_file()
            assert isinstance(ns["q"], graphopt.Program)
            (want,) = ns["program"](*ns["zm"].make_inputs(batch=1, seq=64).values())
            torch.testing.assert_close(ns["scores"], want, atol=1e-5, rtol=1e-5)
        elif i == 1:  # the ONNX Runtime artifact scores as the Program does
            (want,) = ns["fast"](ns["input_ids"], ns["attention_mask"])
            torch.testing.assert_close(ns["scores"], want, atol=1e-4, rtol=1e-4)
        elif i == 2:  # a step's scores: one row per user
            assert ns["scores"].shape[0] == 2 and Path("out/inc/manifest.json").is_file()
        else:  # the example pass is registered and runs in a pipeline
            assert "scale-scores" in graphopt.available_passes()
            out, report = graphopt.optimize(ns["program"], "scale-scores{factor=2}")
            assert report.passes[0].modified is False
