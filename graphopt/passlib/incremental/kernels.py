"""The plain torch functions the incremental derivation puts into a Program.

Each is called from a ``call_function`` node of the rewritten graph and
traced by ``torch.export`` when the prefill/step Programs are captured, so
they hold only tensor ops every runtime lowers (arange, compare, where,
cat, slice, SDPA, round/clamp/cast).

Semantics (the window): an event attends to itself and the ``window - 1``
events before it (sliding-window attention, as Mistral defines it), never to
padding. Keys and queries are indexed along one axis; the queries are the last
``n_query`` of the ``K`` keys (a step's new events follow the cached ones;
``prune-positions`` may keep only the last query rows).

State codecs store each layer's keys/values in the cache: ``native`` (the
graph's dtype), ``bf16`` (cast), ``int8`` (symmetric per event and head over
the head dim, with a float32 scale per event and head).
"""

from __future__ import annotations

import torch

__all__ = [
    "CODECS",
    "window_mask",
    "window_of",
    "encode",
    "decode",
    "prefill_attention",
    "step_attention",
    "step_key_valid",
    "offset_positions",
    "advance",
]

#: state codecs: how a layer's keys/values are stored between calls
CODECS = ("native", "bf16", "int8")


def window_mask(key_valid: torch.Tensor, n_query: int, window: int) -> torch.Tensor:
    """``(batch, 1, n_query, K)`` bool: query ``r`` (key index ``K - n_query + r``)
    may read key ``c`` when ``0 <= q - c < window`` and ``c`` is a real event.
    Every query also reads itself, so a padded query is never fully masked
    (no NaN rows on any backend; padded rows are never read by real ones)."""
    k = key_valid.shape[1]
    keys = torch.arange(k, device=key_valid.device)
    queries = keys[k - n_query:]
    dist = queries.unsqueeze(1) - keys.unsqueeze(0)
    band = (dist >= 0) & (dist < window)
    allowed = key_valid.unsqueeze(1).unsqueeze(1) | (dist == 0).unsqueeze(0).unsqueeze(0)
    return band.unsqueeze(0).unsqueeze(0) & allowed


def window_of(x: torch.Tensor, key_valid: torch.Tensor, window: int) -> torch.Tensor:
    """The last ``window`` events of ``x`` ``(batch, heads, seq, dim)`` along seq,
    padding zeroed; left-filled with zeros when ``seq < window``."""
    x = torch.where(key_valid.unsqueeze(1).unsqueeze(-1), x, torch.zeros_like(x))
    zeros = x.new_zeros(x.shape[0], x.shape[1], window, x.shape[3])
    full = torch.cat([zeros, x], dim=2)
    return full[:, :, x.shape[2]:].contiguous()


def encode(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, ...]:
    """A cache block as stored: ``(x,)``, ``(x.bf16,)`` or ``(int8 values, float32 scales)``."""
    if codec == "native":
        return (x,)
    if codec == "bf16":
        return (x.to(torch.bfloat16),)
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(xf / scale).clamp(-127.0, 127.0).to(torch.int8)
    return q, scale


def decode(parts: tuple[torch.Tensor, ...], codec: str, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`encode`, in the graph's ``dtype``."""
    if codec == "int8":
        q, scale = parts
        return (q.float() * scale).to(dtype)
    return parts[0].to(dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return torch.ops.aten.scaled_dot_product_attention.default(q, k, v, mask, **kwargs)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                      window: int, codec: str, sdpa_kwargs: dict) -> tuple[torch.Tensor, ...]:
    """Windowed attention over the whole history, and this layer's state:
    ``(out, *encode(keys of the last window events), *encode(values ...))``."""
    mask = window_mask(key_valid, q.shape[2], window)
    out = _sdpa(q, k, v, mask, sdpa_kwargs)
    return (out, *encode(window_of(k, key_valid, window), codec), *encode(window_of(v, key_valid, window), codec))


def step_key_valid(past_length: torch.Tensor, ids: torch.Tensor, window: int) -> torch.Tensor:
    """``(batch, window + new)`` bool: which cached slots hold events (the last
    ``min(past_length, window)``), then the ``ids.shape[1]`` new events (all real)."""
    n_new = ids.shape[1]
    slots = torch.arange(window, device=past_length.device)
    cached = (slots.unsqueeze(0) + past_length.unsqueeze(1)) >= window
    new = torch.ones(past_length.shape[0], n_new, dtype=torch.bool, device=past_length.device)
    return torch.cat([cached, new], dim=1)


def step_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                   cached_k: tuple[torch.Tensor, ...], cached_v: tuple[torch.Tensor, ...],
                   window: int, codec: str, sdpa_kwargs: dict) -> tuple[torch.Tensor, ...]:
    """Attention of the new events over the cached window plus themselves, and
    the next state: the last ``window`` events of cache + new, stored with
    ``codec`` (cached blocks are not re-encoded; only the new events are).
    Needs ``new <= window`` (the runner checks)."""
    keys = torch.cat([decode(cached_k, codec, k.dtype), k], dim=2)
    values = torch.cat([decode(cached_v, codec, v.dtype), v], dim=2)
    out = _sdpa(q, keys, values, window_mask(key_valid, q.shape[2], window), sdpa_kwargs)
    next_k = tuple(_slide(c, n, window) for c, n in zip(cached_k, encode(k, codec)))
    next_v = tuple(_slide(c, n, window) for c, n in zip(cached_v, encode(v, codec)))
    return (out, *next_k, *next_v)


def _slide(cached: torch.Tensor, new: torch.Tensor, window: int) -> torch.Tensor:
    """The last ``window`` events of ``cached`` then ``new`` (narrow, not ``cached[:, :, new:]``:
    that would compare the new-event count with the window and specialize the graph on it)."""
    both = torch.cat([cached, new], dim=2)
    return both.narrow(2, new.shape[2], window).contiguous()


def advance(past_length: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Events seen after a step: ``past_length`` plus the new events."""
    return past_length + ids.shape[1]


def offset_positions(counts: torch.Tensor, past_length: torch.Tensor) -> torch.Tensor:
    """Running event counts of the new events continue from ``past_length``."""
    return counts + past_length.unsqueeze(1).to(counts.dtype)
