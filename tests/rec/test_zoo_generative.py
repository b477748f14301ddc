"""The GPT- and T5-style zoo recommenders: what they score, padding, Hugging Face folders."""

from __future__ import annotations

import torch

from graphopt.rec.resolve import load_program


def test_gpt_rec_scores_every_item_id_and_ignores_left_padding(zoo):
    zm = zoo("gpt-rec:tiny")
    items = zm.config["items"]
    history = torch.tensor([[3, 7, 11, 5]])
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), history], dim=1)
    with torch.no_grad():
        short = zm.module(history, torch.ones_like(history))
        long = zm.module(padded, (padded > 0).long())
        other = zm.module(torch.tensor([[3, 7, 11, 6]]), torch.ones_like(history))
    assert short.shape == (1, items + 1)  # column i = item id i, 0 = padding
    torch.testing.assert_close(long, short, atol=1e-5, rtol=1e-5)  # positions count from the first item
    assert not torch.allclose(short, other)  # the last item matters


def test_gpt_rec_hugging_face_folder_works_as_model(zoo, tmp_path):
    zm = zoo("gpt-rec:tiny")
    zm.module.to_hf(tmp_path / "gpt")
    prog = load_program(str(tmp_path / "gpt"))  # GPT2LMHeadModel, tied head
    assert prog.output_names == ["logits"]
    ids = torch.randint(1, zm.config["items"] + 1, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    (logits,) = prog(ids, mask)
    with torch.no_grad():
        ref = zm.module(ids, mask)
    torch.testing.assert_close(logits[:, -1], ref, atol=1e-5, rtol=1e-5)


def test_t5_rec_scores_after_one_decoder_step_and_ignores_left_padding(zoo):
    zm = zoo("t5-rec:tiny")
    history = torch.tensor([[3, 7, 11, 5]])
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), history], dim=1)
    with torch.no_grad():
        short = zm.module(history, torch.ones_like(history))
        long = zm.module(padded, (padded > 0).long())
        step = zm.module.logits(history, torch.ones_like(history), torch.zeros(1, 1, dtype=torch.long))
    assert short.shape == (1, zm.config["items"] + 1)
    torch.testing.assert_close(short, step[:, 0])  # the score is the first decoder step's logits
    torch.testing.assert_close(long, short, atol=1e-5, rtol=1e-5)  # relative positions: padding is masked out


def test_t5_rec_hugging_face_folder_works_as_model(zoo, tmp_path):
    zm = zoo("t5-rec:tiny")
    zm.module.to_hf(tmp_path / "t5")
    prog = load_program(str(tmp_path / "t5"))  # T5ForConditionalGeneration: the decoder start is an input
    assert prog.input_names == ["input_ids", "attention_mask", "decoder_input_ids"]
    assert prog.output_names[0] == "logits"
    ids = torch.randint(1, zm.config["items"] + 1, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    logits = prog(ids, mask, torch.zeros(3, 1, dtype=torch.long))[0]
    with torch.no_grad():
        ref = zm.module(ids, mask)
    torch.testing.assert_close(logits[:, -1], ref, atol=1e-5, rtol=1e-5)
