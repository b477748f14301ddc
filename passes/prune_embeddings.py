"""prune-embeddings: drop retired/never-seen item rows, keep the caller's item ids."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from graphopt.errors import PassOptionError
from graphopt.ir.fx import add_tensor_attr, fetch_attr, is_op, module_path
from graphopt.transform.base import Option, Pass, PassResult, register_pass

__all__ = ["PruneEmbeddings"]

aten = torch.ops.aten

DEFAULT_FILL = -65504.0  # lowest finite float16: stays finite under later fp16/bf16 casts


def _parse_ids(items: tuple[str, ...]) -> set[int]:
    """``("3", "10-20")`` -> {3, 10..20} (ranges inclusive)."""
    out: set[int] = set()
    for item in items:
        lo, sep, hi = item.partition("-")
        try:
            if sep and int(hi) < int(lo):
                raise PassOptionError(f"pass 'prune-embeddings' option 'keep': range {item!r} is reversed (empty); "
                                      f"write it low-high, {hi}-{lo}")
            if sep:
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(item))
        except ValueError:
            raise PassOptionError(
                f"pass 'prune-embeddings' option 'keep': {item!r} is not an item id or a range like 10-20"
            ) from None
    return out


def read_keep_file(path: str, min_count: int) -> set[int]:
    """Ids from a file: one ``id`` or ``id count`` (space/comma/tab separated)
    per line, ``#`` comments; with counts, ids seen fewer than ``min_count``
    times are dropped."""
    p = Path(path)
    if not p.is_file():
        raise PassOptionError(f"pass 'prune-embeddings' option 'keep_file': no file at {path}; give a path to an id list")
    out: set[int] = set()
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        try:
            item = int(fields[0])
            count = float(fields[1]) if len(fields) > 1 else float(min_count)
        except ValueError:
            raise PassOptionError(
                f"pass 'prune-embeddings' option 'keep_file': {path}:{lineno}: expected 'id' or 'id count', got {line!r}"
            ) from None
        if not math.isfinite(count):
            raise PassOptionError(f"pass 'prune-embeddings' option 'keep_file': {path}:{lineno}: count {fields[1]!r} "
                                  "is not a finite number; give a count (or just the id) on each line")
        if count >= min_count:
            out.add(item)
    return out


def _is_transpose(node: torch.fx.Node) -> bool:
    return is_op(node, aten.t) or (is_op(node, aten.transpose) and sorted(node.args[1:3]) in ([0, 1], [-2, -1]))


def _tied_head(table: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, int] | None:
    """The item-scoring head reading the same table, ``matmul(h, t(W[:N]))``:
    (matmul, the row slice or the table itself, N)."""
    rows = fetch_attr(table.graph.owning_module, table.target).shape[0]
    for u in table.users:
        if is_op(u, aten.slice) and u.args[1] == 0 and (len(u.args) < 3 or u.args[2] in (0, None)):
            src, end = u, (u.args[3] if len(u.args) > 3 else rows)
            t = next(iter(u.users)) if len(u.users) == 1 else None
        elif _is_transpose(u):
            src, end, t = table, rows, u
        else:
            continue
        if t is None or not _is_transpose(t) or len(t.users) != 1:
            continue
        mm = next(iter(t.users))
        if is_op(mm, aten.matmul, aten.mm) and mm.args[1] is t:
            return mm, src, min(int(end), rows)
    return None


@register_pass
class PruneEmbeddings(Pass):
    """Drop item-embedding rows (and scoring-head columns) for items not kept; ids stay original.

    Matches: ``aten.embedding(W, ids)`` with ``ids`` a model input and ``W``
    (a) tied to an item-scoring head ``matmul(h, t(slice(W, 0, 0, N))) [+ bias[N]]``
    (BERT4Rec: output column i = item id i; found automatically), or (b) named
    in ``tables=`` (parameter name or module path, e.g. ``model.item_emb``).
    EmbeddingBag tables and untied heads are declined.
    Produces (the contract callers see): inputs and outputs keep the ORIGINAL
    item ids. The table keeps the kept item rows, the padding row and every
    row outside the head's range (special tokens such as [mask]), plus one
    zero "unknown" row. A gather ``remap[ids]`` on the input maps original ids
    to rows; a dropped id reads the zero unknown row. The head scores only
    kept items plus the unknown row, whose bias is ``fill``; an
    ``index_select`` on the last dim scatters the scores back into the
    original [.., N] index space, so dropped items score ``fill`` (default
    -65504, the lowest finite float16: lower than any real score, so never in
    a top-k, and finite under fp16/bf16 casts).
    ``keep``: item ids / inclusive ranges (``keep=1-30,42``); ``keep_file``:
    one ``id`` or ``id count`` per line, ids with count < ``min_count`` dropped.
    Requires shapes. Preserves nothing. Approximate, tolerance=inf: kept items'
    scores are exact when inputs hold only kept ids (tests hold that to 1e-5);
    dropped columns become ``fill`` by design.
    Before/after: ``embedding(W[52, 32], ids) ... matmul(h, t(slice(W, 0, 0, 51))) + b[51]`` ->
    ``embedding(W'[K+2, 32], remap[ids]) ... index_select(matmul(h, t(slice(W', 0, 0, K+1))) + b'[K+1], -1, inv[51])``.
    """

    name = "prune-embeddings"
    options = (
        Option("keep", list, (), "item ids (or ranges a-b) to keep"),
        Option("keep_file", str, "none", "file of ids to keep: 'id' or 'id count' per line"),
        Option("min_count", int, 1, "with a frequency file, keep ids seen at least this often"),
        Option("tables", list, (), "embedding tables to prune (default: tables tied to a scoring head)"),
        Option("fill", float, DEFAULT_FILL, "score of dropped items in the original index space"),
    )
    requires = frozenset({"shapes"})
    exact = False
    tolerance = float("inf")
    backend_notes = "adds one gather on the ids and one on the scores; every backend gets the smaller table"

    def validate(self) -> None:
        if not self.keep and self.keep_file == "none":
            raise PassOptionError("pass 'prune-embeddings': give keep=ID,ID,A-B or keep_file=PATH (the items to keep)")
        ids = _parse_ids(self.keep)
        if self.keep_file != "none":
            ids |= read_keep_file(self.keep_file, self.min_count)
        if not ids or min(ids) < 0:
            raise PassOptionError("pass 'prune-embeddings': the keep set is empty or has negative ids; check keep/keep_file")
        self.keep_ids = ids

    def _selected(self, table: torch.fx.Node) -> bool:
        names = {table.target, table.target.rsplit(".", 1)[0]}
        return any(t in names for t in self.tables)

    def _check_tables(self, gm) -> None:  # type: ignore[no-untyped-def]
        """Refuse ``tables=`` names that match no embedding table, naming the tables there are."""
        found: dict[str, str] = {}  # module path (or parameter name) -> what reads it
        for node in gm.graph.nodes:
            table = node.args[0] if node.op == "call_function" and node.args else None
            if isinstance(table, torch.fx.Node) and table.op == "get_attr":
                bag = is_op(node, aten.embedding_bag, aten._embedding_bag)
                if bag or is_op(node, aten.embedding):
                    path = table.target.rsplit(".", 1)[0] if table.target.endswith(".weight") else table.target
                    found[path] = "EmbeddingBag" if bag else found.get(path, "embedding")
        unmatched = [t for t in self.tables if t not in found and not any(t == f"{k}.weight" for k in found)]
        bags = [t for t in self.tables if found.get(t.removesuffix(".weight")) == "EmbeddingBag"]
        if not unmatched and not bags:
            return
        tables = ", ".join(f"{k} ({v})" if v == "EmbeddingBag" else k for k, v in sorted(found.items())) or "none"
        if bags:
            raise PassOptionError(
                f"pass 'prune-embeddings' option 'tables': {', '.join(bags)} is an EmbeddingBag table, which this pass "
                f"does not prune; name aten.embedding tables (tables here: {tables})")
        raise PassOptionError(
            f"pass 'prune-embeddings' option 'tables': no embedding table named {', '.join(unmatched)}; "
            f"name tables by module path or parameter name (tables here: {tables})")

    def _check_keep(self, gm, emb, head, where) -> None:  # type: ignore[no-untyped-def]
        """Refuse keep ids past the table's rows, and a keep set with none of its items."""
        rows = fetch_attr(gm, emb.args[0].target).shape[0]
        n_items = head[2] if head else rows
        beyond = sorted(i for i in self.keep_ids if i >= rows)
        if beyond:
            raise PassOptionError(
                f"pass 'prune-embeddings' option 'keep': {len(beyond)} ids ({beyond[0]}..{beyond[-1]}) are beyond "
                f"{where}'s {rows} rows; keep ids in [0, {rows - 1}]")
        if not any(i < n_items for i in self.keep_ids):
            raise PassOptionError(
                f"pass 'prune-embeddings' option 'keep': none of {where}'s items [0, {n_items - 1}] is kept, "
                "which would drop the whole table; keep ids in that range")

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        declined: list[str] = []
        details: list[dict] = []
        todo: list[tuple] = []
        placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
        if self.tables:
            self._check_tables(gm)
        for emb in list(gm.graph.nodes):
            if not is_op(emb, aten.embedding) or not isinstance(emb.args[0], torch.fx.Node):
                continue
            table, ids = emb.args[0], emb.args[1]
            where = module_path(emb) or table.target
            if table.op != "get_attr":
                continue
            head = _tied_head(table)
            if not (self._selected(table) or (not self.tables and head is not None)):
                continue
            if ids not in placeholders:
                declined.append(f"{where}: ids are computed, not a model input")
                continue
            others = [u for u in table.users if u is not emb and (head is None or u is not head[1])]
            if others or (head is None and len(table.users) > 1):
                declined.append(f"{where}: table has other readers ({', '.join(u.name for u in others)})")
                continue
            self._check_keep(gm, emb, head, where)
            todo.append((emb, head, where))
        details = [self._prune(gm, emb, head, where) for emb, head, where in todo]  # all checked first
        if not details and not declined:
            declined.append("no aten.embedding table tied to a scoring head; name tables with tables=...")
        notes = [f"{d['layer']}: rows {d['rows_before']} -> {d['rows_after']} "
                 f"({d['items_dropped']} items dropped), -{d['params_removed']:,} params" for d in details]
        return PassResult(program, modified=bool(details), stats={"tables": len(details)} if details else {},
                          declined=declined, details=details, notes=notes)

    def _prune(self, gm, emb, head, where):  # type: ignore[no-untyped-def]
        table = emb.args[0]
        weight = fetch_attr(gm, table.target).detach()
        rows = weight.shape[0]
        n_items = head[2] if head else rows
        pad = emb.args[2] if len(emb.args) > 2 and isinstance(emb.args[2], int) and emb.args[2] >= 0 else None
        kept = sorted(i for i in self.keep_ids if i < n_items) + ([pad] if pad is not None and pad not in self.keep_ids and pad < n_items else [])
        kept = sorted(set(kept))
        specials = list(range(n_items, rows))
        unknown = len(kept)  # zero row right after the kept items: inside the head's slice
        new_rows = kept + [-1] + specials
        new_weight = torch.cat([weight[kept], weight.new_zeros(1, weight.shape[1]), weight[specials]])
        remap = torch.full((rows,), unknown, dtype=torch.long)
        for new, old in enumerate(new_rows):
            if old >= 0:
                remap[old] = new
        g = gm.graph
        new_table = add_tensor_attr(gm, table.target.replace(".", "_") + "_pruned", new_weight, before=table)
        remap_node = add_tensor_attr(gm, table.target.replace(".", "_") + "_id_remap", remap, before=table)
        with g.inserting_before(emb):
            new_ids = g.call_function(aten.index.Tensor, (remap_node, [emb.args[1]]))
        args = list(emb.args)
        args[0], args[1] = new_table, new_ids
        if pad is not None:
            args[2] = int(remap[pad])
        emb.args = tuple(args)
        params_removed = weight.numel() - new_weight.numel() - remap.numel()
        if head is not None:
            matmul, src, _ = head
            if src is not table:
                src.args = (new_table, 0, 0, unknown + 1)
            else:
                src.replace_input_with(table, new_table)
            scores = matmul
            bias_add = next(iter(matmul.users)) if len(matmul.users) == 1 else None
            bias = None  # the head's bias, on either side of the add (h @ W.t() + b, b + h @ W.t())
            if bias_add is not None and is_op(bias_add, aten.add) and matmul in bias_add.args[:2]:
                bias = bias_add.args[1] if bias_add.args[0] is matmul else bias_add.args[0]
            fill_bias = torch.full((unknown + 1,), self.fill, dtype=weight.dtype)
            if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" and len(bias.users) == 1:
                old_bias = fetch_attr(gm, bias.target).detach()
                fill_bias[:unknown] = old_bias[kept]
                new_bias = add_tensor_attr(gm, bias.target.replace(".", "_") + "_pruned", fill_bias, before=bias)
                bias_add.replace_input_with(bias, new_bias)
                g.erase_node(bias)
                params_removed += old_bias.numel() - fill_bias.numel()
                scores = bias_add
            else:
                fill_bias[:unknown] = 0.0
                new_bias = add_tensor_attr(gm, table.target.replace(".", "_") + "_fill", fill_bias, before=matmul)
                with g.inserting_after(matmul):
                    scores = g.call_function(aten.add.Tensor, (matmul, new_bias))
                matmul.replace_all_uses_with(scores, delete_user_cb=lambda u: u is not scores)
                params_removed -= fill_bias.numel()
            inv = torch.full((n_items,), unknown, dtype=torch.long)
            inv[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
            inv_node = add_tensor_attr(gm, table.target.replace(".", "_") + "_score_index", inv, before=matmul)
            with g.inserting_after(scores):
                restored = g.call_function(aten.index_select.default, (scores, -1, inv_node))
            scores.replace_all_uses_with(restored, delete_user_cb=lambda u: u is not restored)
            params_removed -= inv.numel()
        if not table.users:
            g.erase_node(table)
        return {"layer": where, "kind": "embedding", "rows_before": rows, "rows_after": len(new_rows),
                "items_dropped": n_items - len(kept), "head": head is not None, "params_removed": int(params_removed)}
