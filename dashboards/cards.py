"""What the head-card page needs from a card, and a card built from the saved results.

The page draws any object with the :class:`Card` interface: the head, its roles, ``to_frame()``
(one row per score: ``metric, value, rank, percentile, source``) and ``plots()`` (figure kind ->
function). :func:`basic_card` builds one from the saved results alone (every score ranked by
:func:`analyses.leaderboard.head_table`, every role by each result's own ``roles()``, a sample
pattern); the cross-analysis study's card (:func:`analyses.atlas.card.head_card`: every score of
the study with its rank, the roles, the transfer cells the head takes part in) satisfies the same
interface, and :func:`card_for` uses it whenever a saved study of the model exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import pandas as pd

from analyses.leaderboard import head_rows, head_table
from analyses.patterns import pooled_pattern
from probe.heads import HeadId

SAMPLE = ("The cat sat on the mat. The dog sat on the log. The cat sat on the mat. "
          "The dog sat on the log. The cat sat on the mat.")
CARD_CELLS = 64


class Card(Protocol):
    head: HeadId
    model_id: str
    roles: tuple[str, ...]

    def to_frame(self) -> pd.DataFrame: ...

    def plots(self) -> dict[str, Callable]: ...


@dataclass(frozen=True, eq=False)
class BasicCard:
    head: HeadId
    model_id: str
    roles: tuple[str, ...]
    frame: pd.DataFrame
    pattern: object | None = None

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def plots(self) -> dict[str, Callable]:
        return {} if self.pattern is None else {"pattern": lambda: self.pattern.plot(self.head.head)}


def basic_card(model, head: HeadId, opened, text: str | None = None, pattern=None) -> BasicCard:
    """``opened``: ``(analysis, source, Result)`` made for ``model``; a pooled sample pattern of ``text``
    (or the given ``pattern``, a :class:`~analyses.patterns.PooledPattern` of the head's layer)."""
    opened = list(opened)
    rows = head_rows(head_table(opened), head)
    roles = tuple(f"{r} ({name})" for name, _, res in opened for r in res.roles().get(head, []))
    frame = rows[["analysis", "metric", "value", "rank", "of", "percentile", "source"]]
    if pattern is None:
        pattern = pooled_pattern(model, text or SAMPLE, layer=head.layer, cells=CARD_CELLS)
    return BasicCard(head, model.model_id, roles, frame, pattern)


def card_for(model, head: HeadId, opened, pattern) -> tuple[object, str | None]:
    """The card the head-card page shows, and the study it comes from (None: the fallback).

    The newest saved cross-analysis study (``headwise scan atlas``) of ``model`` among ``opened``
    (``(analysis, label, Result)``) gives :func:`analyses.atlas.card.head_card`; without one, the
    :func:`basic_card` of the analyses' own newest results.
    """
    from dataclasses import replace

    from analyses.atlas.card import head_card

    opened = list(opened)
    study = next(((label, res) for name, label, res in opened if name == "atlas"), None)
    if study is None:
        return basic_card(model, head, opened, pattern=pattern), None
    return replace(head_card(study[1], head), pattern=pattern), study[0]
