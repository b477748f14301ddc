"""Shared by the incremental-state tests: gpt-rec:tiny after O2, its derived
prefill/step (built once per session per state dtype), left-padded histories,
and an independent reference (transformers' GPT2Model under a hand-built
sliding-window mask, no cache, no graphopt code)."""

from __future__ import annotations

import torch

import graphopt
from graphopt.rec.zoo import load_model

#: the window the tests use: small, so a 100-step replay slides far past it
WINDOW = 6
ITEMS = 50  # gpt-rec:tiny item ids 1..50, 0 = padding

_CACHE: dict = {}


def zoo_model():
    if "zm" not in _CACHE:
        _CACHE["zm"] = load_model("gpt-rec:tiny")
    return _CACHE["zm"]


def use_capture(program) -> None:
    """Hand over the session's captured gpt-rec:tiny (conftest's ``program`` fixture) so it is
    captured once per session; :func:`optimized` captures it itself otherwise."""
    _CACHE.setdefault("captured", program)


def optimized():
    """gpt-rec:tiny captured and optimized with O2 (fuse-attention, prune-positions, ...)."""
    if "o2" not in _CACHE:
        program = _CACHE.get("captured") or zoo_model().capture()
        _CACHE["o2"], _ = graphopt.optimize(program, "O2", verify_each=False)
    return _CACHE["o2"]


def derived(state_dtype: str = "native"):
    from graphopt.passlib.incremental import derive_incremental

    key = ("inc", state_dtype)
    if key not in _CACHE:
        _CACHE[key] = derive_incremental(optimized(), WINDOW, state_dtype)
    return _CACHE[key]


def replay(state_dtype: str, lengths: list[int], steps: int, seed: int = 0, two_at: int = 40) -> list[tuple]:
    """Prefill ``lengths`` then ``steps`` steps of one new event (two at step ``two_at``) with the
    derived eager Programs; ``[(scores, ids, mask), ...]`` with the whole history so far
    (first entry: the prefill). Cached per arguments."""
    key = ("replay", state_dtype, tuple(lengths), steps, seed, two_at)
    if key in _CACHE:
        return _CACHE[key]
    inc = derived(state_dtype)
    ids, mask = histories(lengths, seed)
    n = len(inc.scores)
    out = inc.prefill(ids, mask)
    rows = [(out[0], ids, mask)]
    state = out[n:]
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        new = new_events(len(lengths), 2 if t == two_at else 1, gen)
        out = inc.step(new, *state)
        state = out[n:]
        ids = torch.cat([ids, new], 1)
        mask = torch.cat([mask, torch.ones_like(new)], 1)
        rows.append((out[0], ids, mask))
    _CACHE[key] = rows
    return rows


def histories(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(ids, mask)``, ``lengths[b]`` real events for user ``b``."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(1, ITEMS + 1, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, seq - n:] = 1
        ids[b, : seq - n] = 0
    return ids, mask


def new_events(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(1, ITEMS + 1, (batch, n), generator=gen)


def band_reference(ids: torch.Tensor, mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """Scores of the last event of each user: the zoo model over the whole history, each
    event reading itself and the ``window - 1`` real events before it (``None``: no window),
    positions counted from each user's first event."""
    model = zoo_model().module
    seq = ids.shape[1]
    i = torch.arange(seq)
    dist = i.unsqueeze(1) - i.unsqueeze(0)
    band = (dist >= 0) & (dist < (window or seq + 1))
    allowed = band[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(seq, dtype=torch.bool)[None, None]  # padded rows read themselves
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = model.gpt(input_ids=ids, attention_mask=allowed, position_ids=positions,
                           use_cache=False).last_hidden_state
        return model.score(hidden[:, -1])


def last_window(ids: torch.Tensor, mask: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive alternative's input: each user's last ``window`` events, re-encoded from scratch."""
    return ids[:, -window:], mask[:, -window:]
