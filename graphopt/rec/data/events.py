"""A user's own interaction files -> clean events: text decoding, raw id normalisation,
duplicate rows, time order and the raw id of every dense row.

Rules (each change to the data is said in one line, :attr:`Events.notes`):

- text: a UTF-8 byte-order mark is dropped and CRLF line ends are read as LF; a RecBole file
  that is not UTF-8 is refused naming the line, except item titles (replaced characters);
- ids: surrounding spaces are dropped and integer-looking ids are integers (``"050"`` is
  ``"50"``); dense ids ``1..N`` follow the raw ids' sorted order (integers first, numerically),
  and the raw id of each row is kept (``item_ids[i - 1]`` is item ``i``'s raw id);
- duplicates: a (user, item) pair keeps its first event; later ones are dropped (a repeated
  item as a user's held-out target is scored against a history that already holds it);
- time order: a user's events are sorted by timestamp; equal timestamps keep the file's order
  when the file lists its events in time order (an event log), and otherwise (a file in no time
  order, as MovieLens's ``u.data``, whose row order says nothing) follow the raw item id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Events", "read_lines", "normal_id", "id_key", "order_events", "is_identity", "rating_notes"]

BOM = b"\xef\xbb\xbf"


def read_lines(path: Path, *, utf8: bool = False, titles: bool = False) -> list[str]:
    """The file's lines without a byte-order mark: latin-1 (MovieLens's own files) or UTF-8 (RecBole's);
    a UTF-8 file with a byte that is not UTF-8 is refused naming the line, unless it holds only
    ``titles`` (the byte is replaced)."""
    from graphopt.rec.data.movielens import DataError

    data = path.read_bytes()
    data = data[len(BOM):] if data.startswith(BOM) else data
    if not utf8:
        return data.decode("latin-1").splitlines()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        if titles:
            return data.decode("utf-8", errors="replace").splitlines()
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8 "
                        "(RecBole atomic files are UTF-8)") from None


def normal_id(raw: str) -> str:
    """``" 050 "`` -> ``"50"``; other ids only lose surrounding spaces."""
    raw = raw.strip()
    return str(int(raw)) if raw.isascii() and raw.isdigit() else raw


def id_key(raw: str) -> tuple[int, int | str]:
    return (0, int(raw)) if raw.isascii() and raw.isdigit() else (1, raw)


def is_identity(ids: Sequence[str]) -> bool:
    """Whether raw ids are exactly ``1..N`` (dense row ``i`` is raw id ``i``)."""
    return all(raw == str(k) for k, raw in enumerate(ids, 1))


@dataclass
class Events:
    """Kept rows (indices into the rows given, in file order) and what was changed, in words."""

    keep: list[int]
    users: list[str]  # normalised raw user id per row given
    items: list[str]  # normalised raw item id per row given
    item_ids: list[str]  # sorted distinct raw item ids: item i is item_ids[i - 1]
    user_ids: list[str]  # sorted distinct raw user ids
    by_user: dict[str, list[int]]  # each user's kept rows in time order
    notes: list[str] = field(default_factory=list)


def order_events(source: str, users: Sequence[str], items: Sequence[str], times: Sequence[float], *,
                 ties: bool = True) -> Events:
    """Normalise ids, drop repeated (user, item) pairs, order each user's events in time (module doc);
    ``ties``: say how many users' last two events tie (what a leave-one-out split holds out)."""
    nu, ni = [normal_id(u) for u in users], [normal_id(i) for i in items]
    notes = []
    changed = {r.strip() for r in (*users, *items) if normal_id(r) != r.strip()}
    if changed:
        example = sorted(changed)[0]
        notes.append(f"{len(changed)} ids written with leading zeros were read as integers (e.g. {example!r} = "
                     f"{normal_id(example)!r}); write each id one way if they name different things")
    in_time_order = all(times[k] <= times[k + 1] for k in range(len(times) - 1))
    rows: dict[str, list[int]] = {}
    for n, u in enumerate(nu):
        rows.setdefault(u, []).append(n)
    by_user: dict[str, list[int]] = {}
    exact = repeated = n_ties = 0
    for u, idx in rows.items():
        if in_time_order:
            idx.sort(key=lambda n: times[n])  # stable: file order within a timestamp
        else:
            idx.sort(key=lambda n: (times[n], id_key(ni[n]), n))
        first: dict[str, int] = {}
        kept = []
        for n in idx:
            if ni[n] in first:
                exact += times[first[ni[n]]] == times[n]
                repeated += times[first[ni[n]]] != times[n]
                continue
            first[ni[n]] = n
            kept.append(n)
        by_user[u] = kept
        n_ties += len(kept) >= 2 and times[kept[-1]] == times[kept[-2]]
    if exact or repeated:
        notes.append(f"dropped {exact + repeated} repeated (user, item) rows ({exact} exact duplicates, {repeated} "
                     "at a later time), keeping each pair's first event; remove them from the file to silence this")
    if ties and n_ties:
        how = ("in the file's order (it lists events in time order)" if in_time_order else
               "by item id (the file is not in time order, so its row order says nothing)")
        notes.append(f"{n_ties} of {len(by_user)} users' last two events share a timestamp: ordered {how}; "
                     "give finer timestamps if their order matters")
    keep = sorted(n for kept in by_user.values() for n in kept)
    item_ids = sorted({ni[n] for n in keep}, key=id_key)
    return Events(keep, nu, ni, item_ids, sorted(by_user, key=id_key), by_user, notes)


def rating_notes(source: str, ratings: Sequence[float], click: float) -> list[str]:
    """Refuse ratings without both clicks and non-clicks; a warning for ratings off MovieLens's scale."""
    clicks = sum(r >= click for r in ratings)
    if clicks in (0, len(ratings)):
        from graphopt.rec.data.movielens import DataError

        raise DataError(f"{source}: {'none' if clicks == 0 else 'all'} of the {len(ratings)} ratings are clicks "
                        f"(a rating >= {click:g} is a click): click models need both; give MovieLens's 1-5 ratings")
    off = [r for r in ratings if not 0.5 <= r <= 5]
    if not off:
        return []
    return [f"warning: {len(off)} ratings lie outside MovieLens's 0.5..5 (min {min(ratings):g}, max {max(ratings):g}), "
            f"yet a rating >= {click:g} is a click: rescale them to 1..5 if that is not what they mean"]
