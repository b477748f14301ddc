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
