"""A hand-edited ``graphopt-checkpoint.json`` is refused in one line that says to re-run
``graphopt finetune --fresh``, by ``load_checkpoint`` and by the CLI verbs that read it."""

from __future__ import annotations

import json
import shutil

import pytest

from graphopt.cli import main
from graphopt.errors import ArtifactError
from graphopt.rec.data import synthetic_movielens
from graphopt.rec.finetune import FinetuneConfig, finetune, load_checkpoint, save_checkpoint

EDITS = {
    "a JSON list": lambda m: [1, 2],
    "items a string": lambda m: {**m, "config": {**m["config"], "items": "abc"}},
    "negative hidden": lambda m: {**m, "config": {**m["config"], "hidden": -4}},
    "empty config": lambda m: {**m, "config": {}},
    "data a string": lambda m: {**m, "data": "x"},
    "metrics a string": lambda m: {**m, "metrics": "x", "eval": []},
    "unknown kind": lambda m: {**m, "kind": "foo"},
    "another model's kind": lambda m: {**m, "kind": "gpt-rec"},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    data = synthetic_movielens(users=20, items=30, interactions=300, seed=1)
    result = finetune("bert4rec:tiny", data, FinetuneConfig(max_steps=1, epochs=1, precision="fp32", max_minutes=None))
    return save_checkpoint(result, tmp_path_factory.mktemp("ck") / "ckpt")


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_checkpoint_is_refused_in_one_line(checkpoint, tmp_path, capsys, edit):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    marker = ckpt / "graphopt-checkpoint.json"
    marker.write_text(json.dumps(EDITS[edit](json.loads(marker.read_text()))))
    with pytest.raises(ArtifactError, match="--fresh") as info:
        load_checkpoint(ckpt)
    assert "\n" not in str(info.value)
    assert main(["finetune", "bert4rec:tiny", "--data", "synthetic", "-o", str(ckpt), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fresh" in err[0] and "unexpected" not in err[0], err
