"""The input contract on the CTR path (embedding + MLP models): ids that reach a table through
prune-embeddings' remap or an integer cast, EmbeddingBag offsets, and zero-length bag ids.

Every case lowers a real Program on each CPU runtime and calls the artifact: a bad request is
refused in one line, in the same words on every runtime, before the backend runs (an id past
the table aborts the whole process on Inductor, and wraps to the last row on ONNX Runtime);
a good one matches eager within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import ArtifactError, RunnerError
from graphopt.models import load_model
from graphopt.runtime.artifact import write_manifest

RUNTIMES = ["eager", "torchscript", "onnxruntime", "inductor"]
TOL = 1e-5
_LOWERED: dict = {}


class CTR(nn.Module):
    """int32 user ids cast with ``.long()``; clicked items as 1-D ids + offsets with per-sample
    weights (sum); tags as a mean bag with include_last_offset (its own output: B + 1 offsets)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.user = nn.Embedding(20, 4)
        self.clicks = nn.EmbeddingBag(40, 4, mode="sum")
        self.tags = nn.EmbeddingBag(30, 4, mode="mean", include_last_offset=True)
        self.head = nn.Linear(8, 1)

    def forward(self, user, clicks, click_off, click_w, tags, tag_off):  # type: ignore[no-untyped-def]
        c = self.clicks(clicks, click_off, per_sample_weights=click_w)
        score = self.head(torch.cat([self.user(user.long()), c], 1)).squeeze(-1)
        return score, self.tags(tags, tag_off)


DYNAMIC = {"user": {0: "batch"}, "clicks": {0: "nc"}, "click_off": {0: "batch"}, "click_w": {0: "nc"},
           "tags": {0: "nt"}, "tag_off": {0: "tb"}}


def ctr_inputs(batch: int, seed: int, empty: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.zeros(batch, dtype=torch.long) if empty else torch.randint(0, 5, (batch,), generator=g)
    tag_lens = torch.randint(1, 4, (batch,), generator=g)
    n, nt = int(lens.sum()), int(tag_lens.sum())
    return {"user": torch.randint(0, 20, (batch,), generator=g, dtype=torch.int32),
            "clicks": torch.randint(0, 40, (n,), generator=g),
            "click_off": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]]),
            "click_w": torch.rand(n, generator=g),
            "tags": torch.randint(0, 30, (nt,), generator=g),
            "tag_off": torch.cat([torch.zeros(1, dtype=torch.long), tag_lens.cumsum(0)])}


def _lowered(tmp_path_factory, key: str, runtime: str):  # type: ignore[no-untyped-def]
    """(reference module or Program, artifact path), lowered once per model and runtime."""
    if (key, runtime) not in _LOWERED:
        if key == "ctr":
            ref = CTR().eval()
            prog = graphopt.capture(ref, tuple(ctr_inputs(6, 0).values()), dynamic=DYNAMIC)
            prog, _ = graphopt.optimize(prog, "O2")
        else:  # two-tower:tiny pruned as in the audit
            prog = load_model("two-tower:tiny").capture()
            prog, _ = graphopt.optimize(prog, "prune-embeddings{tables=model.item_emb,model.user_emb keep=1-50},O2")
            ref = prog
        path = tmp_path_factory.mktemp(f"{key}_{runtime}")
        graphopt.lower(prog, runtime, path, force=True)
        _LOWERED[key, runtime] = (ref, prog, path)
    return _LOWERED[key, runtime]


def _refused(runner, inputs, message: str) -> None:  # type: ignore[no-untyped-def]
    """Refused by the contract, in one line, without the backend running."""
    runner.run_checked = lambda bound: pytest.fail("the backend ran on a request the contract must refuse")
    try:
        with pytest.raises(RunnerError, match=rf"^{runner.name} \| {message}$") as info:
            runner(*inputs.values())
    finally:
        del runner.run_checked
    assert "\n" not in str(info.value)


def _close(out, ref) -> None:  # type: ignore[no-untyped-def]
    for o, r in zip(out, ref if isinstance(ref, (tuple, list)) else (ref,)):
        torch.testing.assert_close(o, r, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_pruned_two_tower_ids_are_range_checked(tmp_path_factory, runtime):
    """prune-embeddings reads ids through ``index(remap, [ids])``: still a lookup into the
    original table's rows (was: no range at all; -1 scored as the last id, Inductor aborted)."""
    _, prog, path = _lowered(tmp_path_factory, "tt", runtime)
    x = load_model("two-tower:tiny").make_inputs(batch=4, seed=3)
    x = {k: (v % 50) + 1 for k, v in x.items()}  # kept ids: scores as the pruned Program's
    with graphopt.load(path) as runner:
        assert runner.artifact.manifest["index_ranges"] == {
            "user_ids": [0, 100], "history": [0, 200], "candidate_ids": [0, 200]}
        _close(runner(*x.values()), prog(*x.values()))
        for name, bad, high in (("candidate_ids", -1, 200), ("candidate_ids", 200, 200), ("user_ids", -1, 100),
                                ("user_ids", 100, 100)):
            y = {k: v.clone() for k, v in x.items()}
            y[name].view(-1)[0] = bad
            at = "[0]" if y[name].dim() == 1 else "[0, 0]"
            _refused(runner, y, rf"input '{name}': values must be in \[0, {high}\), got {bad} at \{at[:-1]}\]")
        _close(runner(*x.values()), prog(*x.values()))  # still serving


OFFSETS = ("EmbeddingBag offsets must start at 0, never decrease and end at most at len\\('clicks'\\) = {n}; "
           "got {got} at \\[{i}\\]{after}; pass the start of each bag in 'clicks'")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bag_offsets_and_cast_ids_are_checked(tmp_path_factory, runtime):
    """Offsets eager EmbeddingBag refuses (or mis-reads) are refused on every runtime (the gather
    form scored them silently), and int32 ids cast with .long() keep their range check."""
    ref, _, path = _lowered(tmp_path_factory, "ctr", runtime)
    with graphopt.load(path) as runner:
        manifest = runner.artifact.manifest
        assert manifest["index_ranges"] == {
            "user": [0, 20], "clicks": [0, 40], "tags": [0, 30],
            "click_off": {"offsets_of": "clicks", "include_last_offset": False},
            "tag_off": {"offsets_of": "tags", "include_last_offset": True}}
        x = ctr_inputs(5, seed=1)
        with torch.no_grad():
            _close(runner(*x.values()), ref(*x.values()))
        n = len(x["clicks"])
        cases = {
            "start 1": (lambda o: o.__setitem__(0, 1), OFFSETS.format(n=n, got=1, i=0, after="")),
            "negative": (lambda o: o.__setitem__(2, -3), OFFSETS.format(n=n, got=-3, i=2, after=f" after {int(x['click_off'][1])}")),
            "past the end": (lambda o: o.__setitem__(-1, n + 5), OFFSETS.format(n=n, got=n + 5, i=4, after="")),
        }
        for case, (edit, message) in cases.items():
            y = {k: v.clone() for k, v in x.items()}
            edit(y["click_off"])
            if case == "past the end":
                assert int(y["click_off"][-2]) <= n + 5
            _refused(runner, y, rf"input 'click_off': {message}")
        y = {k: v.clone() for k, v in x.items()}
        y["click_off"][3], y["click_off"][4] = n, int(x["click_off"][3])
        if int(x["click_off"][3]) < n:
            _refused(runner, y, rf"input 'click_off': {OFFSETS.format(n=n, got=int(x['click_off'][3]), i=4, after=f' after {n}')}")
        y = {k: v.clone() for k, v in x.items()}
        y["tag_off"][-1] -= 1  # include_last_offset: the last offset must be len(tags)
        nt = len(x["tags"])
        _refused(runner, y, rf"input 'tag_off': EmbeddingBag offsets must start at 0, never decrease and end at "
                            rf"len\('tags'\) = {nt}; got {nt - 1} at \[5\]; pass the start of each bag in 'tags' "
                            r"and its length last")
        for bad in (-1, 20):
            y = {k: v.clone() for k, v in x.items()}
            y["user"][0] = bad
            _refused(runner, y, rf"input 'user': values must be in \[0, 20\), got {bad} at \[0\]")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_zero_length_bag_ids_run_exactly(tmp_path_factory, runtime):
    """No row has a clicked item: every bag is empty (zeros), as eager computes it (was refused:
    ``dim 0 (nc) must be >= 1, got 0``); the contract proves it from the graph (the bag is the
    only reader of those ids and weights), so the dim's minimum is 0 there and 1 elsewhere."""
    ref, _, path = _lowered(tmp_path_factory, "ctr", runtime)
    with graphopt.load(path) as runner:
        dims = runner.artifact.manifest["dims"]
        assert dims["nc"]["min"] == 0 and dims["nt"]["min"] == 0 and dims["batch"]["min"] == 1
        for batch in (2, 4):
            x = ctr_inputs(batch, seed=batch, empty=True)
            assert x["clicks"].numel() == 0
            with torch.no_grad():
                _close(runner(*x.values()), ref(*x.values()))
        x = ctr_inputs(3, seed=7)
        _refused(runner, {**x, "user": x["user"][:0], "click_off": x["click_off"][:0]},
                 r"input 'user': dim 0 \(batch\) must be >= 1, got 0; an empty batch has nothing to score: "
                 r"skip the call")


def test_zero_length_needs_the_bag_to_be_the_only_reader():
    """Near miss: ids that something else reads too (a mean over them) keep the minimum of 1."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 3, mode="sum")

        def forward(self, ids, off):  # type: ignore[no-untyped-def]
            return self.bag(ids, off) + ids.float().mean()

    from graphopt.runtime.contract import dim_ranges

    prog = graphopt.capture(Mixed().eval(), (torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])),
                            dynamic={"ids": {0: "n"}, "off": {0: "b"}})
    assert dim_ranges(prog)["n"]["min"] == 1


def test_an_id_input_edited_to_float_in_the_manifest_gets_one_line_not_an_index_error(tmp_path):
    """Was: the range check truncated float values with int(), found no element equal to the truncated
    'bad' value and raised 'IndexError ... (unexpected)' on every runtime."""
    import json

    zm = load_model("bert4rec:tiny")
    art = graphopt.lower(zm.capture(), "eager", tmp_path / "art")
    manifest = json.loads((art.path / "manifest.json").read_text())
    manifest["inputs"][0]["dtype"] = "float32"  # a hand edit the schema accepts
    (art.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest\.json was edited after lowering"):
        graphopt.load(art.path)  # its digest catches it now; re-stamped, the runner's own check must hold too
    write_manifest(art.path, manifest)
    ids, mask = zm.make_inputs(batch=2, seq=8, seed=1).values()
    with graphopt.load(art.path) as runner:
        bad = ids.float()
        bad[1, 3] = 1e6 + 0.5
        with pytest.raises(RunnerError, match=r"input 'input_ids': values must be in \[0, \d+\), got 1000000.5 at "):
            runner(bad, mask)
