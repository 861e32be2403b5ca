"""Top heads by any metric across saved results: one tidy table, each score ranked within its metric.

Every saved result gives per-head scores through the contract (``head_scores()``); this table
stacks them all (one row per result, metric and head) with the head's rank within that metric
of that result (1 = highest) and its percentile, and names the result folder each score comes
from, so a score is never shown without its source. A head's card is this table filtered to it.

>>> import numpy as np
>>> from analyses.contract import Result
>>> class Toy(Result):
...     FORMAT, model_id = "toy", "m"
...     def head_scores(self):
...         return {"score": np.array([[0.1, 0.9], [0.5, np.nan]])}
>>> t = head_table([("toy", "/r/toy", Toy())])
>>> t[["head", "value", "rank", "of"]].values.tolist()
[['L0H1', 0.9, 1, 3], ['L1H0', 0.5, 2, 3], ['L0H0', 0.1, 3, 3]]
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from probe.heads import HeadId

COLUMNS = ["analysis", "metric", "head", "layer", "head_index", "value", "rank", "of", "percentile", "source", "model_id"]


def head_table(results) -> pd.DataFrame:
    """``results``: ``(analysis name, folder, Result)``; returns :data:`COLUMNS`, best first within each metric."""
    parts = []
    for name, folder, res in results:
        for metric, m in res.head_scores().items():
            m = np.asarray(m, dtype=float)
            l, h = np.nonzero(np.isfinite(m))
            if not len(l):
                continue
            v = m[l, h]
            order = np.argsort(-v, kind="stable")
            rank = np.empty(len(v), dtype=int)
            rank[order] = np.arange(1, len(v) + 1)
            parts.append(pd.DataFrame({
                "analysis": name, "metric": metric, "head": [str(HeadId(int(a), int(b))) for a, b in zip(l, h)],
                "layer": l.astype(int), "head_index": h.astype(int), "value": v, "rank": rank, "of": len(v),
                "percentile": 100.0 * (len(v) - rank) / max(1, len(v) - 1), "source": str(folder),
                "model_id": res.model_id}))
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(parts, ignore_index=True)[COLUMNS]
    return out.sort_values(["analysis", "metric", "rank"], kind="stable").reset_index(drop=True)


def head_rows(table: pd.DataFrame, head: HeadId) -> pd.DataFrame:
    """Every score of ``head`` in ``table`` (its card), the best-ranked first."""
    mine = table[(table["layer"] == head.layer) & (table["head_index"] == head.head)]
    return mine.sort_values(["percentile", "analysis"], ascending=[False, True], kind="stable").reset_index(drop=True)
