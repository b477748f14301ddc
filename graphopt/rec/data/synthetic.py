"""A synthetic MovieLens-shaped dataset with learnable structure (the fallback
when real MovieLens-100K is not installed; always announced)."""

from __future__ import annotations

import random

import torch

from graphopt.rec.data.movielens import (
    ML100K_INTERACTIONS,
    ML100K_ITEMS,
    ML100K_USERS,
    REQUESTED_SYNTHETIC_NOTICE,
    MovieLens,
)

__all__ = ["synthetic_movielens"]


def synthetic_movielens(
    users: int = ML100K_USERS,
    items: int = ML100K_ITEMS,
    interactions: int = ML100K_INTERACTIONS,
    *,
    genres: int = 18,
    min_len: int = 20,
    seed: int = 0,
) -> MovieLens:
    """A MovieLens-shaped dataset with learnable structure.

    Item popularity is Zipf-like (exponent 0.9 over a random permutation);
    each item has a genre and each user prefers two or three genres; a third
    of the steps continue from the previous item to one of its genre
    neighbours (sequential signal). Users never repeat an item, like ratings.
    Sequence lengths are log-normal, at least ``min_len`` (scaled down when
    ``items`` is small), summing to about ``interactions``.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    min_len = max(3, min(min_len, items // 4))
    max_len = max(min_len, items // 2)
    popularity = 1.0 / torch.arange(1, items + 1, dtype=torch.float64) ** 0.9
    popularity = popularity[torch.randperm(items, generator=gen)]
    genre = torch.randint(0, genres, (items,), generator=gen)
    members = [torch.nonzero(genre == g).flatten().tolist() for g in range(genres)]
    position = {item: (g, k) for g, group in enumerate(members) for k, item in enumerate(group)}
    raw = torch.exp(0.9 * torch.randn(users, generator=gen, dtype=torch.float64))  # log-normal lengths
    lengths = (raw / raw.sum() * max(interactions - users * min_len, 0)).round().long() + min_len
    lengths = lengths.clamp(min_len, max_len).tolist()
    sequences = []
    for user in range(users):
        liked = rng.sample(range(genres), k=min(genres, rng.choice((2, 3))))
        weights = popularity.clone()
        boost = torch.zeros(items, dtype=torch.bool)
        for g in liked:
            boost |= genre == g
        weights[boost] *= 8.0
        weights /= weights.sum()
        draws = torch.multinomial(weights, lengths[user] * 3, replacement=True, generator=gen).tolist()
        seq: list[int] = []
        used: set[int] = set()
        for draw in draws:
            if len(seq) == lengths[user]:
                break
            item = draw
            if seq and rng.random() < 0.35:
                g, k = position[seq[-1]]
                group = members[g]
                item = group[(k + rng.randint(1, 3)) % len(group)]
            if item not in used:
                used.add(item)
                seq.append(item)
        sequences.append([i + 1 for i in seq])
    titles = ["[pad]"] + [f"Synthetic movie {i} (genre {int(genre[i - 1])})" for i in range(1, items + 1)]
    return MovieLens(
        name="synthetic-ml-100k" if (users, items) == (ML100K_USERS, ML100K_ITEMS) else f"synthetic-{users}x{items}",
        source=f"synthetic (seed {seed})",
        sequences=sequences,
        num_items=items,
        titles=titles,
        synthetic=True,
        notice=REQUESTED_SYNTHETIC_NOTICE,  # load_movielens's fallback replaces it with why
    )


