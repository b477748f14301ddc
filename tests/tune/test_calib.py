"""``--calib`` files are checked against the model's inputs when read: one line per problem."""

from __future__ import annotations

import pytest
import torch

from graphopt.tune.data import DataSpecError, load_calibration_file, resolve_model, tune_data


@pytest.fixture(scope="module")
def tm():
    return resolve_model("bert4rec:tiny")


def _good(tm, seed: int = 0, batch: int = 8) -> dict[str, torch.Tensor]:
    return dict(zip(tm.program.input_names, tm.make_inputs(batch, 16, seed)))


def _bad(tm, case: str) -> list[dict[str, torch.Tensor]]:
    items = int(tm.config["items"])
    out = []
    for seed in range(4):
        b = _good(tm, seed)
        ids, mask = b["input_ids"], b["attention_mask"]
        b = {"float_ids": {"input_ids": ids.float(), "attention_mask": mask},
             "float_mask": {"input_ids": ids, "attention_mask": mask.float()},
             "high_ids": {"input_ids": ids * 0 + 1000 * items, "attention_mask": mask},
             "negative_ids": {"input_ids": ids * 0 - 3, "attention_mask": mask},
             "rank3": {"input_ids": ids[None], "attention_mask": mask[None]},
             "rank1": {"input_ids": ids[0], "attention_mask": mask[0]},
             "batch_mismatch": {"input_ids": ids, "attention_mask": mask[:4]},
             "zero_rows": {"input_ids": ids[:0], "attention_mask": mask[:0]}}[case]
        out.append(b)
    return out


@pytest.mark.parametrize("case, message", [
    ("float_ids", "batch 0: input 'input_ids': expected int64, got float32; convert it with .to(torch.int64)"),
    ("float_mask", "batch 0: input 'attention_mask': expected "),
    ("high_ids", "batch 0: input 'input_ids': values must be in [0, "),
    ("negative_ids", "batch 0: input 'input_ids': values must be in [0, "),
    ("rank3", "batch 0: input 'input_ids': expected rank 2"),
    ("rank1", "batch 0: input 'input_ids': expected rank 2"),
    ("batch_mismatch", "batch 0: input 'attention_mask': dim 0 (batch) is 4 but 'input_ids' has batch 8"),
    ("zero_rows", "batch 0: input 'input_ids' is empty (shape [0, 16]); save batches of at least one row each"),
])
def test_a_bad_calibration_file_is_one_line_naming_the_batch_and_input(tm, tmp_path, case, message):
    path = tmp_path / f"{case}.pt"
    torch.save(_bad(tm, case), path)
    with pytest.raises(DataSpecError) as e:
        tune_data(tm, calib=path, batch=8)
    text = str(e.value)
    assert text.startswith(f"--calib {path}: ") and message in text and "\n" not in text, text


def test_a_good_calibration_file_is_read_and_held_out(tm, tmp_path):
    path = tmp_path / "good.pt"
    torch.save([_good(tm, s) for s in range(8)], path)
    assert len(load_calibration_file(path, tm.program.input_names, tm.program)) == 8
    td = tune_data(tm, calib=path, batch=8)
    assert len(td.calibration) == 6 and len(td.screen) == 2


@pytest.mark.parametrize("content, message", [
    ([], "the list of batches is empty; save at least one input batch"),  # was: "expected a list ..., got list"
    (b"\x00garbage", "not a torch.save file of torch tensors (UnpicklingError); save a list of input batches"),
])
def test_an_empty_or_unreadable_calibration_file_says_what_to_save(tm, tmp_path, content, message):
    path = tmp_path / "calib.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)  # was: torch's advice to re-run torch.load with weights_only=False
    else:
        torch.save(content, path)
    with pytest.raises(DataSpecError) as e:
        tune_data(tm, calib=path, batch=8)
    assert str(e.value).startswith(f"--calib {path}: {message}") and "weights_only" not in str(e.value), str(e.value)
