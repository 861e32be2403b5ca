"""Windowed accumulation of attention similarity (cosine and row-wise Jensen–Shannon).

A prompt of T tokens is run once per query-row window [r0, r1): a :func:`probe.tap` observer
keeps only those rows of every layer's pattern (``[layer, head, w, T]``), the window's
contributions (dot products, squared norms, JS sums) are added to a :class:`Accumulator`, and
the buffer is dropped. Memory is O(L·H·w·T), never O(L·H·T²). Every quantity is a sum over
rows, so the windowed sums equal the sums over the full patterns.

Definitions (per prompt; the causal upper triangle is zero, so flattening the full map is the
lower triangle):

* layer cosine ``S[l, m] = <Ā_l, Ā_m> / (|Ā_l| |Ā_m|)`` with Ā_l the head-averaged map;
* head cosine the same over single-head maps, all L·H heads;
* row-wise JS ``D[l, m] = mean over query rows of JS(Ā_l[q], Ā_m[q])`` in bits (0..1);
  heads: between the heads of adjacent layers (``[L-1, H, H]``), or all pairs with ``head_js="all"``.

Over a prompt set, cosines are averaged over prompts (each prompt weighs the same) and JS
divergences are averaged over all query rows of all prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from probe.shapes import Patterns

from probe.errors import InputError

LN2 = math.log(2.0)


def js_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits between rows ``p, q [..., K]`` (sums over the last axis)."""
    m = 0.5 * (p + q)
    kl_p = torch.xlogy(p, p) - torch.xlogy(p, m)
    kl_q = torch.xlogy(q, q) - torch.xlogy(q, m)
    return (0.5 * (kl_p + kl_q)).sum(-1).clamp(min=0.0) / LN2


@dataclass
class Accumulator:
    """Running sums for one prompt set; ``add_window`` then ``end_prompt`` per prompt."""

    n_layers: int
    n_heads: int
    head_js: str = "adjacent"  # "adjacent" | "all" | "none"
    layer_cos_sum: np.ndarray = field(init=False)
    head_cos_sum: np.ndarray = field(init=False)
    layer_js_sum: np.ndarray = field(init=False)
    head_js_sum: np.ndarray = field(init=False)
    n_rows: int = 0
    n_prompts: int = 0

    def __post_init__(self):
        if self.head_js not in ("adjacent", "all", "none"):
            raise InputError(f"head_js must be 'adjacent', 'all' or 'none', not {self.head_js!r}")
        L, H = self.n_layers, self.n_heads
        self.layer_cos_sum = np.zeros((L, L))
        self.head_cos_sum = np.zeros((L * H, L * H))
        self.layer_js_sum = np.zeros((L, L))
        shape = (L * H, L * H) if self.head_js == "all" else (max(L - 1, 0), H, H)
        self.head_js_sum = np.zeros(shape)
        self._reset_prompt()

    def _reset_prompt(self) -> None:
        L, H = self.n_layers, self.n_heads
        self._ldot = torch.zeros(L, L, dtype=torch.float64, device="cpu")  # host: the sums end in numpy
        self._hdot = torch.zeros(L * H, L * H, dtype=torch.float64, device="cpu")

    def add_window(self, probs: Patterns) -> None:
        """Add rows ``probs [layer, head, w, T]`` (one window of one prompt)."""
        L, H, w, T = probs.shape
        if (L, H) != (self.n_layers, self.n_heads):
            raise InputError(f"window has {L} layers x {H} heads, accumulator expects "
                             f"{self.n_layers} x {self.n_heads}: use one model for the whole prompt set")
        p = probs.double()
        avg = p.mean(1)  # (L, w, T)
        flat = avg.reshape(L, -1)
        self._ldot += flat @ flat.T
        heads = p.reshape(L * H, -1)
        self._hdot += heads @ heads.T
        for l in range(L):
            self.layer_js_sum[l] += js_rows(avg[l:l + 1], avg).sum(-1).numpy()
        self._add_head_js(p)
        self.n_rows += w

    def _add_head_js(self, p: torch.Tensor) -> None:
        L, H = p.shape[:2]
        if self.head_js == "adjacent":
            for l in range(L - 1):
                self.head_js_sum[l] += js_rows(p[l][:, None], p[l + 1][None]).sum(-1).numpy()
        elif self.head_js == "all":
            flat = p.reshape(L * H, *p.shape[2:])
            for i in range(L * H):
                self.head_js_sum[i] += js_rows(flat[i:i + 1], flat).sum(-1).numpy()

    def end_prompt(self) -> None:
        """Turn this prompt's dot products into cosines and add them to the set averages."""
        self.layer_cos_sum += _cosine(self._ldot)
        self.head_cos_sum += _cosine(self._hdot)
        self.n_prompts += 1
        self._reset_prompt()

    def finish(self) -> dict[str, np.ndarray]:
        """Set-level matrices: layer_cos, head_cos, layer_js, head_js (bits)."""
        if self.n_prompts == 0 or self.n_rows == 0:
            raise InputError("no prompt was accumulated: give at least one prompt of two or more tokens")
        return {"layer_cos": self.layer_cos_sum / self.n_prompts, "head_cos": self.head_cos_sum / self.n_prompts,
                "layer_js": self.layer_js_sum / self.n_rows, "head_js": self.head_js_sum / self.n_rows}


def _cosine(dot: torch.Tensor) -> np.ndarray:
    norm = dot.diagonal().clamp(min=1e-300).sqrt()
    cos = (dot / norm[:, None] / norm[None, :]).clamp(-1.0, 1.0)
    return cos.numpy()


class WindowTap:
    """``probe.tap`` observer keeping query rows [r0, r1) of every layer: ``buf [L, H, r1-r0, T]`` (float32, host)."""

    layers = None

    def __init__(self, n_layers: int, n_heads: int, r0: int, r1: int, n_keys: int):
        self.r0, self.r1 = r0, r1
        self.buf = torch.zeros(n_layers, n_heads, r1 - r0, n_keys, device="cpu")
        self.seen = torch.zeros(n_layers, r1 - r0, dtype=torch.bool, device="cpu")

    def on_probs(self, layer: int, q_pos: torch.Tensor, probs: torch.Tensor) -> None:
        keep = (q_pos >= self.r0) & (q_pos < self.r1)
        if not bool(keep.any()):
            return
        rows = (q_pos[keep] - self.r0).cpu()
        self.buf[layer][:, rows] = probs[0][:, keep, :self.buf.shape[-1]].float().cpu()
        self.seen[layer, rows] = True


def accumulate_prompt(model, ids: torch.Tensor, acc: Accumulator, window: int) -> None:
    """Run ``ids [1, T]`` once per window of ``window`` query rows and add it to ``acc``."""
    import probe

    T = int(ids.shape[1])
    if T < 2:
        raise InputError("a prompt needs at least two tokens to compare attention rows; drop one-token prompts")
    if window < 1:
        raise InputError(f"window must be a positive number of query rows, not {window}")
    for r0 in range(0, T, window):
        tap = WindowTap(model.n_layers, model.n_heads, r0, min(r0 + window, T), T)
        with torch.no_grad(), probe.tap(model, tap):
            model.hf(ids)
        if not bool(tap.seen.all()):
            raise RuntimeError("the attention tap missed rows: is every layer routed through headwise?")
        acc.add_window(tap.buf)
    acc.end_prompt()


# ----------------------------------------------------------------------------- matching and families

def match_heads(head_sim: np.ndarray, n_layers: int, n_heads: int, src: int, dst: int) -> np.ndarray:
    """Optimal one-to-one map ``perm[h_src] = h_dst`` maximising total similarity (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    block = _block(head_sim, n_heads, src, dst)
    rows, cols = linear_sum_assignment(block, maximize=True)
    perm = np.empty(n_heads, dtype=int)
    perm[rows] = cols
    return perm


def _block(head_sim: np.ndarray, n_heads: int, a: int, b: int) -> np.ndarray:
    return head_sim[a * n_heads:(a + 1) * n_heads, b * n_heads:(b + 1) * n_heads]


def head_families(head_sim: np.ndarray, n_clusters: int) -> np.ndarray:
    """Cluster labels per head (average-linkage agglomerative clustering on ``1 - similarity``)."""
    from sklearn.cluster import AgglomerativeClustering

    n = head_sim.shape[0]
    k = int(min(max(n_clusters, 1), n))
    if k == 1 or n < 2:
        return np.zeros(n, dtype=int)
    dist = np.clip(1.0 - head_sim, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    dist = 0.5 * (dist + dist.T)
    return AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(dist)
