"""What the head-card page needs from a card, and a card built from the saved results.

The page draws any object with the :class:`Card` interface: the head, its roles, ``to_frame()``
(one row per score: ``metric, value, rank, percentile, source``) and ``plots()`` (figure kind ->
function). :func:`basic_card` builds one from the saved results alone (every score ranked by
:func:`analyses.leaderboard.head_table`, every role by each result's own ``roles()``, a sample
pattern); the cross-analysis study's card (``analyses.atlas``) satisfies the same interface.
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


def basic_card(model, head: HeadId, opened, text: str | None = None) -> BasicCard:
    """``opened``: ``(analysis, source, Result)`` made for ``model``; a pooled sample pattern of ``text``."""
    opened = list(opened)
    rows = head_rows(head_table(opened), head)
    roles = tuple(f"{r} ({name})" for name, _, res in opened for r in res.roles().get(head, []))
    frame = rows[["analysis", "metric", "value", "rank", "of", "percentile", "source"]]
    pattern = pooled_pattern(model, text or SAMPLE, layer=head.layer, cells=CARD_CELLS)
    return BasicCard(head, model.model_id, roles, frame, pattern)
