"""Block-wise accumulation of attention similarity (cosine and row-wise Jensen–Shannon) from one forward.

A prompt of T tokens runs **once**: a :func:`probe.tap` ``on_call`` observer keeps every layer's
post-rotary queries and keys and its :class:`probe.call.AttentionCall` (scaling, mask, softcap,
bias, learned sinks), O(L·H·T·d) memory. The patterns are then rebuilt block by block, query rows
[r0, r1) at a time, by the eager engine's own scores and softmax (:func:`pattern_block`), so a
Gemma2 or gpt-oss pattern is the real one; each block's contributions (dot products, squared norms,
JS sums) are added to an :class:`Accumulator` and the block is dropped. Memory is O(L·H·w·T),
never O(L·H·T²). Every quantity is a sum over rows, so the block sums equal the sums over the full
patterns; a block holds only the keys its rows can see (keys after its last row are zero in every
layer, and zeros add nothing to a dot product or a JS sum).

Definitions (per prompt; the causal upper triangle is zero, so flattening the full map is the
lower triangle):

* layer cosine ``S[l, m] = <Ā_l, Ā_m> / (|Ā_l| |Ā_m|)`` with Ā_l the head-averaged map;
* head cosine the same over single-head maps, all L·H heads;
* row-wise JS ``D[l, m] = mean over query rows of JS(Ā_l[q], Ā_m[q])`` in bits (0..1);
  heads: between the heads of adjacent layers (``[L-1, H, H]``), or all pairs with ``head_js="all"``.

Over a prompt set, cosines are averaged over prompts (each prompt weighs the same) and JS
divergences are averaged over all query rows of all prompts.

**JS per pair of maps: one log per key.** Each map's row sums ``½ sum p log p`` are computed once
(:func:`js_terms`); a pair adds ``-sum m log m`` per row (:func:`cross_js`). Key sums are float32,
rows and blocks are combined in float64 (against the float64 definition: under 2e-5 per row, 4e-8 on
the embedded model's matrices at 2k tokens, far below the 1e-5 the tests hold them to).

Methods: docs/methods.md §4.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from probe.eager import Scratch
from probe.errors import InputError
from probe.shapes import Patterns

LN2 = math.log(2.0)
_TINY = 1e-30  # added to one side of a pair sum so s log s is finite (it changes no float32 value > 1e-23)


def js_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits between rows ``p, q [..., K]`` (sums over the last axis)."""
    m = 0.5 * (p + q)
    kl_p = torch.xlogy(p, p) - torch.xlogy(p, m)
    kl_q = torch.xlogy(q, q) - torch.xlogy(q, m)
    return (0.5 * (kl_p + kl_q)).sum(-1).clamp(min=0.0) / LN2


def js_terms(x: torch.Tensor, buffers: Scratch | None = None, name: str = "terms"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`cross_js` needs of maps ``x [n, w, K]``: the halves ``(x + tiny) / 2`` and each row's
    self term ``½ sum (x + tiny) log(x + tiny)`` ``[n, w]`` (float64)."""
    buffers = buffers or Scratch()
    whole = torch.add(x, _TINY, out=buffers.get(name, x.shape, x.dtype, x.device))
    self_terms = _sum_xlogx(whole, buffers).mul_(0.5)   # half + half == whole exactly
    return whole.mul_(0.5), self_terms


def _sum_xlogx(m: torch.Tensor, buffers: Scratch) -> torch.Tensor:
    """``sum m log m`` over the last axis (``m > 0``), float32 sums returned as float64."""
    f = torch.log(m, out=buffers.get("log", m.shape, m.dtype, m.device)).mul_(m)   # rounded alike for a map and a pair
    return f.sum(-1).double()


def cross_js(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
             upper: bool = False, buffers: Scratch | None = None) -> torch.Tensor:
    """Row-summed JS in bits between every map of ``a`` and of ``b`` (:func:`js_terms` of ``[n, w, K]``): ``[na, nb]``.

    Per row ``½ sum p log p + ½ sum q log q - sum m log m`` with ``m = (p + q) / 2``: the self terms are
    the maps' own (computed once), so a pair costs one add, one log and one product per key. The key
    sums are float32, subtracted in float64 (within 2e-5 of the float64 definition; identical rows give exactly 0:
    ``m`` is then bit for bit the map, and its sum is exactly twice the self term); each row is clamped
    at 0 and the rows summed in float64. With ``upper`` (``a`` is ``b``) only pairs ``i < j`` are
    computed and the result is symmetric with a zero diagonal.
    """
    buffers = buffers or Scratch()
    (ha, sa), (hb, sb) = a, b
    na, nb = ha.shape[0], hb.shape[0]
    out = torch.zeros(na, nb, dtype=torch.float64, device="cpu")
    mid = buffers.get("mid", ha.shape, ha.dtype, ha.device)
    for j in range(nb):
        n = j if upper else na
        if n == 0:
            continue
        m = torch.add(ha[:n], hb[j], out=mid[:n])
        rows = (sa[:n] + sb[j]).sub_(_sum_xlogx(m, buffers)).clamp_(min=0.0)   # [n, w] nats
        out[:n, j] = rows.sum(-1) / LN2
    if upper:
        out = out + out.T
    return out


@dataclass
class Accumulator:
    """Running sums for one prompt set; ``add_window`` per block of query rows, then ``end_prompt`` per prompt."""

    n_layers: int
    n_heads: int
    head_js: str = "adjacent"  # "adjacent" | "all" | "none"
    layer_cos_sum: np.ndarray = field(init=False)
    head_cos_sum: np.ndarray = field(init=False)
    layer_js_sum: np.ndarray = field(init=False)
    head_js_sum: np.ndarray = field(init=False)
    n_rows: int = 0
    n_prompts: int = 0
    scratch: Scratch = field(default_factory=Scratch, repr=False, compare=False)  # this run's block temporaries

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

    def reserve(self, rows: int, keys: int) -> None:
        """Size this run's temporaries once for blocks of up to ``rows x keys`` (blocks grow by a window
        of keys each: sizing the buffers block by block would reallocate, and page-fault, every one)."""
        L, H, f32 = self.n_layers, self.n_heads, torch.float32
        maps = L * H if self.head_js == "all" else max(L, H)
        for name, n, dtype in (("avg", L, f32), ("avg_terms", L, f32), ("flat", L, torch.float64), ("log", maps, f32),
                               ("mid", maps, f32), ("terms0", H, f32), ("terms1", H, f32),
                               ("terms", L * H if self.head_js == "all" else 0, f32)):
            if n:
                self.scratch.get(name, (n, rows, keys), dtype, "cpu")

    def add_window(self, probs: Patterns) -> None:
        """Add rows ``probs [layer, head, w, K]`` (one block of one prompt; ``K`` may stop at the last visible key)."""
        if probs.dim() != 4:
            raise InputError(f"a block of patterns is [layer, head, rows, keys], not shape {tuple(probs.shape)}")
        L, H, w, K = probs.shape
        if (L, H) != (self.n_layers, self.n_heads):
            raise InputError(f"window has {L} layers x {H} heads, accumulator expects "
                             f"{self.n_layers} x {self.n_heads}: use one model for the whole prompt set")
        p = probs.detach().to("cpu", torch.promote_types(probs.dtype, torch.float32))
        sc = self.scratch
        avg = torch.mean(p, 1, out=sc.get("avg", (L, w, K), p.dtype, "cpu"))
        flat = sc.get("flat", (L, w * K), torch.float64, "cpu").copy_(avg.reshape(L, -1))
        self._ldot += flat @ flat.T
        self._hdot += gram(p.reshape(L * H, -1)).double()
        terms = js_terms(avg, sc, "avg_terms")
        self.layer_js_sum += cross_js(terms, terms, upper=True, buffers=sc).numpy()
        self._add_head_js(p)
        self.n_rows += w

    def _add_head_js(self, p: torch.Tensor) -> None:
        if self.head_js == "none":
            return
        L, H = p.shape[:2]
        sc = self.scratch
        if self.head_js == "adjacent":   # two layers' terms at a time, in alternating buffers
            prev = js_terms(p[0], sc, "terms0")
            for l in range(L - 1):
                cur = js_terms(p[l + 1], sc, f"terms{(l + 1) % 2}")
                self.head_js_sum[l] += cross_js(prev, cur, buffers=sc).numpy()
                prev = cur
        else:
            terms = js_terms(p.reshape(L * H, *p.shape[2:]), sc)
            self.head_js_sum += cross_js(terms, terms, upper=True, buffers=sc).numpy()

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


def gram(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``x @ x.T`` for ``x [n, m]``, computing only the blocks on and above the diagonal (about half the
    products of one GEMM when ``n >> block``) and mirroring the rest."""
    n = x.shape[0]
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, block):
        j = min(i + block, n)
        out[i:j, i:] = x[i:j] @ x[i:].T
        out[j:, i:j] = out[i:j, j:].T
    return out


def _cosine(dot: torch.Tensor) -> np.ndarray:
    norm = dot.diagonal().clamp(min=1e-300).sqrt()
    cos = (dot / norm[:, None] / norm[None, :]).clamp(-1.0, 1.0)
    return cos.numpy()


class QueryKeyTap:
    """``probe.tap`` observer keeping each layer's post-rotary ``q [1, H, T, d]``, ``k [1, KV, T, d]`` and its call.

    It watches only the call (``on_call``), so every layer runs the model's own attention.
    """

    layers = None

    def __init__(self):
        self.layers_seen: dict[int, tuple[torch.Tensor, torch.Tensor, object]] = {}

    def on_call(self, module, query, key, value, mask, kwargs, out) -> None:
        from probe.call import parse_call

        call = parse_call(module, query, key, mask, kwargs)
        self.layers_seen[call.layer] = (query.detach(), key.detach(), call)


def _first_keys(call, stop: int):
    """``call`` restricted to its first ``stop`` keys (the rows at hand see none after them)."""
    if stop >= call.n_keys:
        return call

    def cut(t):
        return None if t is None else t[..., :stop]
    return dataclasses.replace(call, n_keys=stop, k_pos=call.k_pos[:, :stop], mask=cut(call.mask),
                               bias=cut(call.bias))


def pattern_block(seen: dict, n_layers: int, rows: slice, scratch=None) -> torch.Tensor:
    """Every layer's final pattern on query ``rows``: ``[L, H, w, K']`` (K' = keys up to the last row's own key).

    Rebuilt by :func:`probe.eager._chunk_probs` (the engine's scores and softmax: scaling, softcap,
    bias, mask, learned sink) from the recorded queries, keys and call.
    """
    from probe import eager

    scratch = scratch or Scratch()
    stops = [_stop(seen[layer][2], rows) for layer in range(n_layers)]
    block = None
    for layer in range(n_layers):
        q, k, call = seen[layer]
        work = torch.promote_types(q.dtype, torch.float32)
        kv_index = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // k.shape[1])
        k_rep = torch.index_select(k[:, :, :stops[layer]].to(work), 1, kv_index,
                                   out=scratch.get("k_rep", (k.shape[0], q.shape[1], stops[layer], k.shape[-1]),
                                                   work, q.device))
        probs = eager._chunk_probs(q, k_rep, _first_keys(call, stops[layer]), eager.LayerPlan(), rows,
                                   scratch=scratch)[0][0]
        if block is None:   # in the scratch too: valid until the next block
            block = scratch.get("block", (n_layers, *probs.shape[:-1], max(stops)), probs.dtype, "cpu")
        block[layer, ..., :stops[layer]] = probs
        block[layer, ..., stops[layer]:] = 0.0
    return block


def _stop(call, rows: slice) -> int:
    """Keys the query ``rows`` can see at most: up to the last row's own key (every key when all are visible)."""
    return call.n_keys if call.all_visible else min(call.n_keys, call.diag + rows.stop)


def accumulate_prompt(model, ids: torch.Tensor, acc: Accumulator, window: int) -> None:
    """Run ``ids [1, T]`` once, then add its patterns to ``acc`` in blocks of ``window`` query rows."""
    import probe

    T = int(ids.shape[1])
    if T < 2:
        raise InputError("a prompt needs at least two tokens to compare attention rows; drop one-token prompts")
    if window < 1:
        raise InputError(f"window must be a positive number of query rows, not {window}")
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InputError(f"accumulate_prompt takes one prompt [1, T], not shape {tuple(ids.shape)}")
    tap = probe.tap(model, QueryKeyTap())
    with torch.no_grad(), tap as seen:
        model.hf(ids, use_cache=False, logits_to_keep=1)
    missing = [l for l in range(model.n_layers) if l not in seen.layers_seen]
    if missing:
        raise RuntimeError(f"the attention tap missed layers {missing[:8]}: is every layer routed through headwise?")
    for layer, (_, _, call) in seen.layers_seen.items():
        if call.n_queries != T or call.n_keys != T:
            raise RuntimeError(f"layer {layer} attended {call.n_queries} queries over {call.n_keys} keys for a "
                               f"prompt of {T} tokens: similarity needs one cache-free forward")
    scratch, rows = Scratch(), min(window, T)
    acc.reserve(rows, T)
    scratch.get("block", (model.n_layers, model.n_heads, rows, T), torch.float32, "cpu")   # the largest block, once
    with torch.no_grad():
        for r0 in range(0, T, window):
            acc.add_window(pattern_block(seen.layers_seen, model.n_layers, slice(r0, min(r0 + window, T)), scratch))
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
