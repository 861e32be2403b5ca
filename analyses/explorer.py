"""The engine of the pattern explorer and the token view: one text, any layer, any window, exact.

An :class:`Explorer` holds one tokenised text. :meth:`Explorer.rows` gives the exact attention rows
``q0..q1`` of every head of one layer over all their keys, observed with :func:`probe.tap` as the
engine computes them; the forward stops as soon as the last wanted row has been seen, so later rows
and layers are never computed. A window of any head is then a slice of those rows: callers cache
:class:`Rows` per :meth:`band` (rows aligned to :data:`ROW_BAND`), so moving a window along the
keys, inside the band, or switching heads costs nothing. :meth:`overview` pools a whole layer
(:mod:`analyses.patterns`), :meth:`token_window` cuts the few heads a token view compares, and
:meth:`find` locates a string in the text (token positions, for "jump to").

>>> from probe import load_model
>>> m = load_model("tiny-llama")
>>> ex = Explorer.open(m, "the cat sat on the mat, the cat sat again")
>>> r = ex.rows(1, 3, 7)
>>> r.probs.shape, round(float(r.probs.sum(-1).min()), 4)       # [head, rows 3..6, keys 0..6]; rows sum to 1
((4, 4, 7), 1.0)
>>> [ex.tokens[i] for i in ex.find("MAT")]                 # where each match starts
['m']
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probe.compat import last_logits_only
from probe.errors import InputError
from probe.heads import HeadId
from probe.runtime import tap
from probe.shapes import PatternWindow

from .patterns import MAX_CELLS, PooledPattern, pooled_pattern

ROW_BAND = 64          # cached row bands start at multiples of this
BAND_ROWS = MAX_CELLS + ROW_BAND   # a band holds any window of up to MAX_CELLS rows that starts inside it


class _Enough(Exception):
    """Raised by :class:`_Rows` once every wanted row was seen: nothing after it is computed."""


class _Rows:
    """Tap observer: keeps rows ``q0:q1`` of one layer over keys ``0:q1``, then stops the forward."""

    def __init__(self, layer: int, q0: int, q1: int, n_heads: int):
        self.layers, self.q0, self.q1 = {layer}, q0, q1
        self.out = torch.zeros(n_heads, q1 - q0, q1, device="cpu")
        self.seen = 0

    def on_probs(self, layer: int, q_pos: torch.Tensor, probs: torch.Tensor) -> None:
        keep = (q_pos >= self.q0) & (q_pos < self.q1)
        if keep.any():
            rows = (q_pos[keep] - self.q0).cpu()
            self.out[:, rows] = probs[0][:, keep.to(probs.device), :self.q1].float().cpu()
            self.seen += int(keep.sum())
        if self.seen >= self.q1 - self.q0:
            raise _Enough


@dataclass(frozen=True, eq=False)
class Rows:
    """Exact rows ``q0..q0+n`` of every head of ``layer``: ``probs [head, n, keys 0..q0+n]``."""

    layer: int
    q0: int
    probs: PatternWindow

    @property
    def q1(self) -> int:
        return self.q0 + self.probs.shape[1]

    def covers(self, queries: tuple[int, int]) -> bool:
        return self.q0 <= queries[0] and queries[1] <= self.q1

    def window(self, head: int, queries: tuple[int, int], keys: tuple[int, int]) -> np.ndarray:
        """``[q, k]`` of one head (keys past a row's own position are 0: causal)."""
        (a, b), (c, d) = queries, keys
        if not self.covers(queries) or not 0 <= c < d <= self.q1:
            raise InputError(f"window {queries} x {keys} is outside rows {self.q0}..{self.q1}")
        return self.probs[head, a - self.q0:b - self.q0, c:d]

    def outside(self, head: int, queries: tuple[int, int], keys: tuple[int, int]) -> np.ndarray:
        """Each row's attention on keys outside ``keys`` (what a window does not show)."""
        (a, b), (c, d) = queries, keys
        rows = self.probs[head, a - self.q0:b - self.q0]
        return rows.sum(-1) - rows[:, c:d].sum(-1)


@dataclass(frozen=True, eq=False)
class TokenWindow:
    """What a token view shows: tokens ``start..stop`` and, per head, attention among them."""

    model_id: str
    start: int
    tokens: tuple[str, ...]
    heads: tuple[HeadId, ...]
    weights: np.ndarray            # [head, query, key] within the window
    outside: np.ndarray            # [head, query]: attention on keys before the window

    def to_frame(self):
        import pandas as pd

        n, W, _ = self.weights.shape
        h, q, k = np.meshgrid(np.arange(n), np.arange(W), np.arange(W), indexing="ij")
        keep = k <= q
        return pd.DataFrame({"head": [str(self.heads[i]) for i in h[keep]], "query_pos": q[keep] + self.start,
                             "key_pos": k[keep] + self.start, "value": self.weights[keep]})


@dataclass(frozen=True, eq=False)
class Explorer:
    """One text on one model (see the module docstring); immutable, safe to share between sessions."""

    model: object
    ids: torch.Tensor             # [1, T]
    tokens: tuple[str, ...]

    @classmethod
    def open(cls, model, text) -> "Explorer":
        ids = model.encode(text) if isinstance(text, str) else text
        return cls(model, ids, tuple(model.str_tokens(ids)))

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[1])

    def band(self, queries: tuple[int, int]) -> tuple[int, int]:
        """The cached row band that holds ``queries`` (at most :data:`MAX_CELLS` rows)."""
        q0, q1 = queries
        if not 0 <= q0 < q1 <= self.n_tokens or q1 - q0 > MAX_CELLS:
            raise InputError(f"rows {queries} must lie in 0..{self.n_tokens}, at most {MAX_CELLS} of them")
        start = (q0 // ROW_BAND) * ROW_BAND
        return start, min(self.n_tokens, start + BAND_ROWS)

    def rows(self, layer: int, q0: int, q1: int) -> Rows:
        """Exact rows ``q0..q1`` of every head of ``layer`` (the forward stops after them)."""
        self.model.layout.check_layer(layer)
        if not 0 <= q0 < q1 <= self.n_tokens:
            raise InputError(f"rows {q0}..{q1} must lie inside 0..{self.n_tokens}")
        obs = _Rows(layer, q0, q1, self.model.n_heads)
        try:
            with tap(self.model, obs), torch.no_grad():
                self.model.hf(self.ids[:, :q1].to(self.model.device), use_cache=False, **last_logits_only(self.model.hf))
        except _Enough:
            pass
        return Rows(layer, q0, obs.out.numpy())

    def overview(self, layer: int, cells: int = 128, mode: str = "max") -> PooledPattern:
        return pooled_pattern(self.model, self.ids, layer=layer, cells=cells, mode=mode)

    def token_window(self, heads, start: int, stop: int, rows: dict | None = None) -> TokenWindow:
        """Attention among tokens ``start..stop`` for ``heads`` (``rows``: cached :class:`Rows` per layer)."""
        heads = [self.model.layout.check(HeadId.parse(h) if isinstance(h, str) else h) for h in heads]
        if not heads or len(heads) > 4:
            raise InputError(f"a token view compares 1 to 4 heads, got {len(heads)}")
        rows = dict(rows or {})
        for layer in sorted({h.layer for h in heads} - set(rows)):
            rows[layer] = self.rows(layer, start, stop)
        w = np.stack([rows[h.layer].window(h.head, (start, stop), (start, stop)) for h in heads])
        out = np.stack([rows[h.layer].outside(h.head, (start, stop), (start, stop)) for h in heads])
        return TokenWindow(self.model.model_id, start, self.tokens[start:stop], tuple(heads), w, out)

    def find(self, query: str, limit: int = 200) -> list[int]:
        """Token positions where ``query`` starts in the text (case-insensitive), at most ``limit``."""
        if not query:
            return []
        ends = np.cumsum([len(t) for t in self.tokens])
        text, q, out, i = "".join(self.tokens).lower(), query.lower(), [], 0
        while len(out) < limit and (i := text.find(q, i)) >= 0:
            out.append(int(np.searchsorted(ends, i, side="right")))
            i += 1
        return sorted(set(out))
