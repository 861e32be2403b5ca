"""Head cards: everything the study knows about one head, and ``headwise head L18H6``.

A :class:`HeadCard` holds the head's value, rank and percentile in every score of the study, the
roles each analysis gives it (``Result.roles()``, their own rules), the transfer cells it takes
part in (as one of a role's knocked-out heads or of a random control set), and a sample pattern of
a text (pooled into at most 64 x 64 blocks by :func:`analyses.patterns.pooled_pattern`, so long
texts work; exact when the text is shorter). ``to_frame()`` and ``plot(kind)`` like every result.

>>> import numpy as np
>>> from probe import HeadId
>>> from analyses.atlas.scores import Score
>>> c = card_of([Score("x: s", "x", np.arange(8.0).reshape(2, 4))], {}, HeadId(1, 3), "m")
>>> c.scores[["rank", "n", "percentile"]].values.tolist()      # mid-rank percentile: (7 below + 1/2 tie) / 8
[[1.0, 8.0, 93.75]]

Methods: docs/methods.md §7.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.errors import HeadwiseError, InputError
from probe.heads import HeadId

from .transfer import head_cells

CARD_CELLS = 64


@dataclass(frozen=True, eq=False)
class HeadCard:
    """One head's card (see the module docstring)."""

    head: HeadId
    model_id: str
    scores: pd.DataFrame                           # score, source, kind, value, rank, n, percentile
    roles: tuple[str, ...] = ()
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)
    pattern: object | None = None                  # analyses.patterns.PooledPattern of the head's layer
    kv_group: int | None = None

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per score (``metric``), with ``rank``, ``n`` (heads ranked) and ``percentile``."""
        df = self.scores.rename(columns={"score": "metric"})
        return df.assign(layer=self.head.layer, head=self.head.head)[
            ["layer", "head", "metric", "value", "rank", "n", "percentile", "source", "kind"]]

    def plots(self) -> dict:
        from . import plots

        out = {"scores": lambda: plots.card_scores(self)}
        if self.pattern is not None:
            out["pattern"] = lambda: self.pattern.plot(self.head.head)
        if len(self.cells):
            out["transfer"] = lambda: plots.card_cells(self)
        return out

    def plot(self, kind: str = "scores"):
        plots = self.plots()
        if kind not in plots:
            raise InputError(f"this card has no {kind!r} figure: use one of {sorted(plots)}")
        return plots[kind]()

    def text(self) -> str:
        """The card as the terminal prints it."""
        group = f" (KV group {self.kv_group})" if self.kv_group is not None else ""
        lines = [f"{self.head}{group} on {self.model_id}", "roles: " + ("; ".join(self.roles) or "none in the saved results")]
        width = max([len(s) for s in self.scores["score"]] + [5])
        lines.append("scores:")
        for r in self.scores.itertuples():
            if not np.isfinite(r.value):
                lines.append(f"  {r.score:<{width}}  {'undefined':>9}  (no value for this head)")
                continue
            rank = f"rank {int(r.rank):>3}/{int(r.n)}  {r.percentile:5.1f} pct" if not pd.isna(r.rank) else "(a label)"
            lines.append(f"  {r.score:<{width}}  {r.value:>9.4g}  {rank}")
        top = self.cells[self.cells["condition"] == "top"] if len(self.cells) else self.cells
        if len(top):
            lines.append("knocked out with its role (drop = plain - knocked out, 95% interval over items):")
            for c in top.itertuples():
                mark = "  beyond random" if c.beyond_random else ""
                lines.append(f"  {c.role} -> {c.task}: {c.set_drop:+.3g} [{c.set_lo:.3g}, {c.set_hi:.3g}]; "
                             f"random sets {c.drop_random:+.3g}{mark}")
        rnd = self.cells[self.cells["condition"] != "top"] if len(self.cells) else self.cells
        if len(rnd):
            sets = sorted({f"{c.role} {c.condition}" for c in rnd.itertuples()})
            lines.append(f"in {len(sets)} random control set(s): {', '.join(sets)} (card.cells has their drops)")
        if self.pattern is not None:
            p = self.pattern
            how = "exact" if p.block == 1 else f"block-{p.mode} of {p.block} tokens per cell"
            lines.append(f"pattern: {p.n_tokens} tokens of the sample text ({how}); plot('pattern') draws it")
        return "\n".join(lines)


def rank_rows(scores, head: HeadId) -> pd.DataFrame:
    """Value, rank (1 = highest), heads ranked and percentile of ``head`` in each score."""
    rows = []
    for s in scores:
        v = float(s.values[head.layer, head.head])
        flat = s.values[np.isfinite(s.values)]
        ranked = s.kind != "categorical" and np.isfinite(v)
        below, ties = ((flat < v).sum(), (flat == v).sum()) if ranked else (0, 0)
        rows.append({"score": s.name, "source": s.source, "kind": s.kind, "value": v,
                     "rank": float(1 + (flat > v).sum()) if ranked else np.nan,
                     "n": float(flat.size) if ranked else np.nan,          # mid-rank percentile: ties share
                     "percentile": float(100 * (below + 0.5 * ties) / flat.size) if ranked else np.nan})
    return pd.DataFrame(rows, columns=["score", "source", "kind", "value", "rank", "n", "percentile"])


def card_of(scores, head_roles: dict, head: HeadId, model_id: str, *, transfer: pd.DataFrame | None = None,
            outcomes: pd.DataFrame | None = None, sets: dict | None = None, pattern=None,
            kv_group: int | None = None) -> HeadCard:
    """A card from scores and roles (and the transfer cells when the study ran)."""
    cells = head_cells(transfer, outcomes, sets or {}, head) if transfer is not None and outcomes is not None \
        else pd.DataFrame()
    return HeadCard(head, model_id, rank_rows(scores, head), tuple(head_roles.get(head, [])), cells, pattern, kv_group)


def head_card(result, head, *, model=None, text: str | None = None) -> HeadCard:
    """The card of ``head`` (``"L18H6"`` or a :class:`HeadId`) from an :class:`~.result.AtlasResult`.

    With ``model``, a sample pattern of ``text`` (default: a repeated sentence, where previous-token,
    induction and sink heads show) is added.
    """
    from .result import SAMPLE_TEXT

    head = result.layout.check(HeadId.parse(head) if isinstance(head, str) else head)
    pattern = None
    if model is not None:
        if model.model_id != result.model_id:
            raise InputError(f"the study was made for {result.model_id}, the model is {model.model_id}: "
                             "load the model the study ran on")
        from ..patterns import pooled_pattern

        pattern = pooled_pattern(model, text or SAMPLE_TEXT, layer=head.layer, cells=CARD_CELLS)
    roles = {h: list(v) for h, v in result.head_roles.items()}
    for h, v in result.roles().items():
        roles.setdefault(h, []).extend(v)
    return card_of(result.scores, roles, head, result.model_id, transfer=result.transfer, outcomes=result.outcomes,
                   sets=result.sets, pattern=pattern, kv_group=result.layout.kv_group(head.head))


def saved_card(head, model, roots, *, text: str | None = None, pattern: bool = True) -> HeadCard:
    """The card from the newest saved study under ``roots`` for ``model``, else from the analyses' own results."""
    from .. import registry
    from .grid import merge_roles
    from .scores import result_scores

    saved = [s for s in registry.find_results(*roots)]
    opened = []
    for s in saved:
        try:
            opened.append((s, s.load()))
        except (OSError, ValueError, KeyError, HeadwiseError):
            continue                                          # a damaged result: the others still count
    mine = [(s, r) for s, r in opened if r.model_id == model.model_id]
    study = next((r for s, r in mine if s.analysis.name == "atlas"), None)
    if study is not None:
        return head_card(study, head, model=model if pattern else None, text=text)
    head = model.layout.check(HeadId.parse(head) if isinstance(head, str) else head)
    newest: dict[str, object] = {}
    for s, r in mine:
        newest.setdefault(s.analysis.name, r)
    if not newest:
        raise InputError(f"no saved results for {model.model_id} under {', '.join(map(str, roots))}: run "
                         f"`headwise scan atlas --out DIR` (or any analysis) first, or pass --results")
    scores = [x for name, r in newest.items() for x in result_scores(name, r)]
    from ..patterns import pooled_pattern
    from .result import SAMPLE_TEXT

    pat = pooled_pattern(model, text or SAMPLE_TEXT, layer=head.layer, cells=CARD_CELLS) if pattern else None
    return card_of(scores, merge_roles(*(r.roles() for r in newest.values())), head, model.model_id, pattern=pat,
                   kv_group=model.layout.kv_group(head.head))


# ----------------------------------------------------------------------------- `headwise head L18H6`

def card_arguments(parser) -> None:
    parser.add_argument("head", help="the head, e.g. L18H6")
    parser.add_argument("--results", action="append", default=None,
                        help="folder of saved results (a study of `headwise scan atlas`, or the analyses' own); "
                             "repeat for several (default: ./results)")
    parser.add_argument("--text", default=None, help="text of the sample pattern (long texts are pooled)")
    parser.add_argument("--pattern", action=argparse.BooleanOptionalAction, default=True,
                        help="compute a sample pattern (default: yes)")
    parser.add_argument("--csv", default=None, help="also write the card's scores here (CSV)")


def card_command(args, load) -> int:
    head = HeadId.parse(args.head)                       # a malformed head fails before the model loads
    model = load(args)
    card = saved_card(head, model, args.results or ["results"], text=args.text, pattern=args.pattern)
    print(card.text())
    if args.csv:
        from probe.atomic import atomic_path

        with atomic_path(Path(args.csv)) as tmp:
            card.to_frame().to_csv(tmp, index=False)
        print(f"wrote {args.csv}")
    return 0
