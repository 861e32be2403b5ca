"""Streaming statistics at close to the cost of the model's own attention (CPU, plain causal calls).

The eager engine (:mod:`probe.eager`) defines every statistic; this path computes the same ones
for the commonest calls (a causal prefill, or one decode row against the KV cache: no mask tensor,
softcap, bias or learned sink, no score or pattern edit, one sequence) with less work:

1. ``out, L = flash(q, k, v)``: torch's CPU flash kernel (what SDPA itself runs, GQA included)
   returns the output and each row's log-sum-exp ``L``; the output is bit for bit the model's own.
2. One pass over row chunks of ``x = scale q.k - L``, only over the keys a chunk can see (the
   causal lower triangle, about half the work of a full ``T x T`` pass; a decode row sees every
   key): ``p = exp(x)`` is the pattern itself (no normalising pass), ``max_prob = exp(max x)`` and
   the argmax come from ``x``, the entropy is ``-sum p x``, group masses are sums over each group's
   key range and the received attention the column sums of ``p`` (rows from ``from_pos`` on).
   Query heads are grouped by their KV head (``[kv, rep * rows, d]`` against ``[kv, keys, d]``),
   so the keys are never repeated per query head.

3. With ``output="pass"`` (:class:`probe.stats.StatsRequest`) a prefill skips step 1: each chunk holds
   its rows' whole visible range, so their softmax is finished inside it (``x = s - max``, ``l = sum p'``)
   and the output is ``(p' v) / l``. One ``exp`` per score instead of two (flash's and the pass's):
   the same statistics, an output equal to SDPA's to float32 rounding (not bit for bit).

Same meaning as :func:`probe.eager.row_stats` and the collector's column sums (tested against the
eager engine on the tiny families and the embedded model, prefill and decode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .call import AttentionCall
from .eager import LayerPlan, Scratch, _edit_outputs

# ``exp`` of float32 arguments below about -87.3 (results under the smallest normal, 1.2e-38, and
# exact underflows) takes libm's slow path here: 10-50x the vectorised cost. Scores ``x = log p``
# are floored here first, so a probability below e^-87 = 1.6e-38 reads as 1.6e-38 (an absolute
# change under 2e-38 per key, far below float32 resolution of any row sum); masked keys stay 0.
FLOOR = -87.0
CACHE_BYTES = 4 * 2**20  # scores per chunk of the statistics pass (see cache_rows)
MIN_ROWS = 16
SMALL = 1 << 16  # scores in a chunk below which row_argmax is one max(-1)


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall,
              plan: LayerPlan) -> bool:
    """Whether :func:`stats_attend` computes this call exactly (else the eager engine runs it)."""
    return (query.device.type == "cpu" and query.shape[0] == 1 and call.mask is None and not call.all_visible
            and _causal_shape(call) and call.softcap is None and call.sinks is None
            and call.bias is None and not (plan.edits_scores or plan.act or plan.echo)
            and query.shape[-1] == key.shape[-1] == value.shape[-1] and query.shape[1] % key.shape[1] == 0
            and query.dtype == torch.float32 == key.dtype == value.dtype
            and not (torch.is_grad_enabled() and query.requires_grad))


def _prefill(call: AttentionCall) -> bool:
    """A causal prefill from position 0: query ``i`` sees keys ``0..i``."""
    return call.diag == 0 and call.n_queries == call.n_keys


def _causal_shape(call: AttentionCall) -> bool:
    """A causal prefill, or one decode row that sees every cached key."""
    return _prefill(call) or (call.n_queries == 1 and call.diag == call.n_keys - 1)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``out [B, H, T, D]`` and the rows' log-sum-exp ``[B, H, T]`` (float32) from torch's CPU flash kernel.

    ``causal``: query ``i`` sees keys ``0..i`` (else every key). ``k, v`` may hold fewer (KV) heads than
    ``q`` (grouped-query attention, head ``h`` reads KV head ``h // (H / KV)``), as in SDPA.
    """
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
    return out, lse.float()


def stats_attend(query, key, value, call: AttentionCall, plan: LayerPlan, groups=(), received: bool = True,
                 received_from: int = 0, chunk: int = 256, scratch: Scratch | None = None, own_output: bool = False):
    """``(out [B, T, H, D], row stats, received [B, H, K] | None)``: the contract of :func:`probe.kernels.fused_attend`.

    ``groups`` are ``(start, stop|None)`` token-position ranges; row stats are ``entropy, max_prob,
    argmax [B, H, T]`` (argmax a key index) and ``group_mass [B, H, T, G]``. ``own_output`` (a prefill):
    the output comes from the pass's own probabilities (:func:`_chunk_own`, no flash call), equal to
    SDPA's to float32 rounding but not bit for bit; a decode row always takes SDPA's output.
    """
    scratch = scratch or Scratch()
    H, KV, T, K, D = query.shape[1], key.shape[1], call.n_queries, call.n_keys, query.shape[3]
    own = own_output and T > 1
    if own:
        out, neg_lse = torch.empty(1, H, T, D), torch.zeros(KV, H // KV, T)
    else:
        out, lse = flash(query, key, value, call.scaling, causal=T > 1)   # SDPA's own output, GQA in the kernel
        neg_lse = lse.reshape(KV, H // KV, T).neg()
    grouped = Grouped(query.view(KV, H // KV, T, D), key[0], neg_lse, call.scaling, call.diag)
    ranges = _index_ranges(groups, call.k_pos[0])
    stats = {"entropy": torch.empty(1, H, T), "max_prob": torch.empty(1, H, T),
             "argmax": torch.empty(1, H, T, dtype=torch.long), "group_mass": torch.zeros(1, H, T, len(ranges))}
    col = torch.zeros(1, H, K) if received else None
    row0 = min(max(received_from - int(call.q_pos[0, 0]), 0), T)  # first row at or after from_pos (consecutive)
    chunk = min(chunk, cache_rows(H, K))
    for r0 in range(0, T, chunk):
        if own:
            _chunk_own(grouped, value[0], out.view(KV, H // KV, T, D), r0, min(r0 + chunk, T), ranges, stats, col,
                       row0, scratch)
        else:
            _chunk(grouped, r0, min(r0 + chunk, T), ranges, stats, col, row0, scratch)
    if plan.zero or plan.mean:
        _edit_outputs(out, plan, call.q_pos)
    return out.transpose(1, 2), stats, col


@dataclass(frozen=True)
class Grouped:
    """One call's queries grouped by KV head: ``q [kv, rep, T, d]``, ``k [kv, K, d]``, ``neg_lse [kv, rep, T]``.

    Row ``i`` sees keys ``0..diag + i``; query head ``h = kv * rep + r`` (the order of ``repeat_interleave``).
    """

    q: torch.Tensor
    k: torch.Tensor
    neg_lse: torch.Tensor
    scale: float
    diag: int

    def scores(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """``x = scale q.k - L`` of rows ``r0:r1`` over keys ``0:diag + r1``: ``[1, H, c, n]`` in ``out``'s storage."""
        kv, rep, c, n = self.q.shape[0], self.q.shape[1], r1 - r0, self.diag + r1
        q = self.q[:, :, r0:r1].reshape(kv, rep * c, -1)                                  # [kv, rep*c, d]
        lse = self.neg_lse[:, :, r0:r1].reshape(kv, rep * c, 1)                           # [kv, rep*c, 1]
        x = out.view(kv, rep * c, n)
        torch.baddbmm(lse, q, self.k[:, :n].transpose(-1, -2), alpha=self.scale, out=x)  # [kv, rep*c, n]
        return x.view(1, kv * rep, c, n)


def cache_rows(n_heads: int, n_keys: int) -> int:
    """Rows per chunk so that one chunk's scores stay near :data:`CACHE_BYTES` (at least :data:`MIN_ROWS`).

    The passes over a chunk (argmax, exp, the entropy dot, sums) are memory-bound: a chunk that
    stays in the cache between them runs them several times faster than one that streams from RAM.
    """
    return max(MIN_ROWS, CACHE_BYTES // (4 * n_heads * max(n_keys, 1)))


def _chunk(g: Grouped, r0: int, r1: int, ranges, stats, col, row0: int, scratch: Scratch) -> None:
    """Rows ``r0:r1`` over the keys they see, ``0:diag + r1`` (see :class:`Grouped`).

    ``x = scale q.k - L`` comes from one ``baddbmm`` per chunk, so ``p = exp(x)`` is the pattern
    itself (:func:`_visible_probs`).
    """
    n = g.diag + r1
    x, p, best, arg = _visible_probs(g, r0, r1, scratch, shift=False)
    stats["max_prob"][:, :, r0:r1] = best.exp_()
    stats["argmax"][:, :, r0:r1] = arg
    _group_masses(p, ranges, n, stats["group_mass"][:, :, r0:r1])
    if col is not None and r1 > row0:
        col[..., :n] += p[:, :, max(row0 - r0, 0):].sum(2)
    stats["entropy"][:, :, r0:r1] = _dot(x, p).neg_().clamp_(min=0.0)  # -sum p log p


def _chunk_own(g: Grouped, v: torch.Tensor, out: torch.Tensor, r0: int, r1: int, ranges, stats, col, row0: int,
               scratch: Scratch) -> None:
    """Rows ``r0:r1`` of a causal prefill, their softmax finished inside the chunk, and their output.

    No log-sum-exp is known beforehand: ``x = s - max`` (the row maximum), ``p' = exp(x)``
    (:func:`_visible_probs`), ``l = sum p'``; then ``max_prob = 1 / l``, group masses and received
    columns are sums of ``p' / l``, the entropy is ``log l - sum p' x / l`` and the output
    ``(p' v) / l`` (``v [kv, K, d]``; ``out [kv, rep, T, d]``).
    """
    H = stats["entropy"].shape[1]
    kv, rep = g.q.shape[0], g.q.shape[1]
    c, n = r1 - r0, r1
    x, p, _, arg = _visible_probs(g, r0, r1, scratch, shift=True)
    stats["argmax"][:, :, r0:r1] = arg
    inv = p.sum(-1).reciprocal_()                                                       # [1, H, c]: 1 / l (l >= 1)
    stats["max_prob"][:, :, r0:r1] = inv
    _group_masses(p, ranges, n, stats["group_mass"][:, :, r0:r1], inv)
    if col is not None and r1 > row0:
        first = max(row0 - r0, 0)
        col[..., :n] += torch.bmm(inv[0, :, None, first:], p[0, :, first:]).view(1, H, n)
    pv = torch.bmm(p.view(kv, rep * c, n), v[:, :n])                                   # [kv, rep*c, d]
    out[:, :, r0:r1] = pv.mul_(inv.view(kv, rep * c, 1)).view(kv, rep, c, -1)
    stats["entropy"][:, :, r0:r1] = inv.log().neg_().sub_(_dot(x, p).mul_(inv)).clamp_(min=0.0)


def _visible_probs(g: Grouped, r0: int, r1: int, scratch: Scratch, shift: bool):
    """``(x, p, max, argmax)`` of rows ``r0:r1`` over keys ``0:diag + r1``: ``[1, H, c, n]`` scores and ``exp``.

    ``x`` is :meth:`Grouped.scores`, less each row's maximum when ``shift``; the row maximum and its
    first index come from :func:`row_argmax` before that. ``x`` is floored at :data:`FLOOR` before
    ``exp`` (see there); the future keys of the diagonal block (:func:`_future`) are exact zeros in ``p``.
    """
    H = g.q.shape[0] * g.q.shape[1]
    c, n, d = r1 - r0, g.diag + r1, g.diag
    x = g.scores(r0, r1, scratch.get("scores", (H * c * n,), torch.float32, g.q.device))  # [1, H, c, n]
    hide, keep = _future(c, g.q.device) if c > 1 else (None, None)  # one row sees every key up to its own
    if hide is not None:
        x[..., d + r0:d + r1].add_(hide)  # -inf: below every visible row maximum
    best, arg = row_argmax(x, scratch)
    if shift:
        x.sub_(best[..., None])
    x.clamp_(min=FLOOR)
    p = torch.exp(x, out=scratch.get("probs", x.shape, torch.float32, g.q.device))
    if keep is not None:
        p[..., d + r0:d + r1].mul_(keep)  # the future keys: exact zeros
    return x, p, best, arg


def _group_masses(p: torch.Tensor, ranges, n: int, out: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """``out [1, H, c, G]`` = the sums of ``p`` over each group's key range ``[a, b)`` (times ``scale [1, H, c]``)."""
    for gi, (a, b) in enumerate(ranges):
        if b > a and a < n:
            mass = p[..., a:min(b, n)].sum(-1)
            out[..., gi] = mass if scale is None else mass.mul_(scale)


def _dot(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sum(x * p, -1)``, overwriting ``x`` (its last use): no temporary."""
    return x.mul_(p).sum(-1)


def _future(c: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hide, keep) [c, c]`` float masks of a chunk's diagonal block: ``-inf`` / ``0`` where key ``j > row i``.

    Added and multiplied (vectorised) rather than ``masked_fill_``: on a strided block of the
    chunk that is an order of magnitude slower here.
    """
    hide = torch.full((c, c), -torch.inf, device=device).triu_(1)
    return hide, torch.ones(c, c, device=device).tril_()


def row_argmax(x: torch.Tensor, scratch: Scratch | None = None, block: int = 64, small: int = SMALL
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, argmax)`` over the last dim of ``x``, equal to ``x.max(-1)`` (the first index of a tie).

    The maxima of ``block``-key blocks (a vectorised ``amax``) pick the first block holding the
    row's maximum; ``argmax`` then runs inside that block alone. Index-tracking reductions are
    several times slower than ``amax`` on the CPU, so this costs about one ``amax`` pass.
    """
    n = x.shape[-1]
    n0 = n - n % block
    if n0 == 0 or x.numel() <= small:  # a few rows (decoding): one reduction beats the block passes' overhead
        return x.max(-1)
    xb = x[..., :n0].unflatten(-1, (n0 // block, block))
    bmax = torch.amax(xb, -1)
    bi = bmax.argmax(-1, keepdim=True)                                         # first block with the max
    inner = xb.gather(-2, bi[..., None].expand(*bi.shape, block)).squeeze(-2)  # [..., block]
    best, wi = inner.max(-1)
    arg = bi.squeeze(-1) * block + wi
    if n0 < n:                                                                 # the tail comes after: only a
        tb, ti = x[..., n0:].max(-1)                                           # strictly greater value wins
        later = tb > best
        best, arg = torch.where(later, tb, best), torch.where(later, ti + n0, arg)
    return best, arg


def _index_ranges(groups, k_pos: torch.Tensor) -> list[tuple[int, int]]:
    """Key-index ranges ``[a, b)`` of position ranges ``(start, stop|None)`` (``k_pos`` increases by one per key)."""
    K = k_pos.numel()
    k0 = int(k_pos[0]) if K and groups else 0  # key j holds position k0 + j (probe.call: no mask tensor)
    return [(min(max(start - k0, 0), K), K if stop is None else min(max(stop - k0, 0), K)) for start, stop in groups]


# ----------------------------------------------------------------------------- ACT at inference

def act_supported(query, key, value, call: AttentionCall, plan: LayerPlan) -> bool:
    """Whether :func:`act_attend` computes this layer's calibrated output exactly (ACT and output edits only).

    Only a causal prefill from position 0 (query ``i`` sees keys ``0..i``): the column sums that find the
    sinks take the query rows as the key rows. Decode rows run the eager engine.
    """
    only_act = not (plan.edits_scores or plan.echo) and bool(plan.act)
    return only_act and _prefill(call) and supported(query, key, value, call, LayerPlan(zero=plan.zero, mean=plan.mean))


def act_attend(query, key, value, call: AttentionCall, plan: LayerPlan, chunk: int = 256,
               scratch: Scratch | None = None) -> torch.Tensor:
    """The ACT heads of one layer (methods.md §2): ``out [B, T, H, D]`` for the heads of ``query``.

    Sinks come from the column sums of each head's pattern (one causal pass, :func:`_column_sums`;
    skipped when the sinks are given). The calibrated output never
    touches the whole pattern: ``O' = beta P_S + (1 - beta m) O_N`` where ``P_S = A[:, S] v_S`` and
    the sink mass ``m`` come from the |S| sink columns and ``O_N`` is attention over the non-sink
    keys alone (a second flash call with the sinks masked through one extra q/k dimension). That
    equals :func:`probe.eager.act_output` (``s P_N = (r + (1 - beta) m) O_N`` with ``r = 1 - m``)
    without subtracting nearly equal numbers when the sinks take almost all the mass. A row that
    sees only sinks keeps its output.
    """
    from .eager import detect_sinks

    scratch = scratch or Scratch()
    H = query.shape[1]
    rep = H // key.shape[1]
    k = key if rep == 1 else key.repeat_interleave(rep, dim=1)
    v = value if rep == 1 else value.repeat_interleave(rep, dim=1)
    heads = sorted(plan.act)
    col = None
    if any(plan.act[h].sinks is None for h in heads):
        every = heads == list(range(H))
        col = _column_sums(query if every else query[:, heads], k if every else k[:, heads], call, chunk, scratch)
    count = call.visible_counts()[0]
    sinks = {h: torch.nonzero(detect_sinks(None if col is None else col[i], count, plan.act[h], call.k_pos[0])
                              ).flatten() for i, h in enumerate(heads)}
    out = torch.empty(1, H, call.n_queries, v.shape[-1])
    plain = [h for h in range(H) if h not in heads or sinks[h].numel() == 0]
    if plain:
        out[:, plain] = flash(query[:, plain], k[:, plain], v[:, plain], call.scaling)[0]
    act = [h for h in heads if sinks[h].numel()]
    if act:
        out[:, act] = _calibrated(query[:, act], k[:, act], v[:, act], [sinks[h] for h in act],
                                  [plan.act[h].beta for h in act], call.scaling)
    if plan.zero or plan.mean:
        _edit_outputs(out, plan, call.q_pos)
    return out.transpose(1, 2)


def _column_sums(q, k, call: AttentionCall, chunk: int, scratch: Scratch) -> torch.Tensor:
    """``[h, K]`` column sums of the heads' causal pattern, one pass over row chunks (no flash call).

    A chunk holds its rows' whole visible range (keys ``0..i``), so each row's softmax is finished
    inside it: ``p' = exp(s - max)`` (floored like the statistics pass, future keys exact zeros) and
    the columns get ``sum_i p'_ij / l_i`` as one matrix-vector product with ``1 / l``.
    """
    n_h, T, D = q.shape[1], call.n_queries, q.shape[-1]
    q3, k3 = q.reshape(n_h, T, D), k.reshape(n_h, T, D)
    col = torch.zeros(n_h, 1, call.n_keys)
    chunk = min(chunk, cache_rows(n_h, T))
    for r0 in range(0, T, chunk):
        r1 = min(r0 + chunk, T)
        c = r1 - r0
        x = scratch.get("scores", (n_h, c, r1), torch.float32, q.device)
        torch.bmm(q3[:, r0:r1], k3[:, :r1].transpose(-1, -2), out=x).mul_(call.scaling)
        hide, keep = _future(c, q.device)
        x[..., r0:r1].add_(hide)
        x.sub_(torch.amax(x, -1, keepdim=True)).clamp_(min=FLOOR)
        p = torch.exp(x, out=scratch.get("probs", x.shape, torch.float32, q.device))
        p[..., r0:r1].mul_(keep)
        inv = p.sum(-1, keepdim=True).reciprocal_().transpose(-1, -2)   # [h, 1, c]: 1 / l_i (l >= 1)
        col[..., :r1] += torch.bmm(inv, p)
    return col[:, 0]


MASKED = -1e30  # added to a sink key's score (through the extra dimension): exp underflows to exactly 0


def _calibrated(q, k, v, sinks: list[torch.Tensor], betas: list[float], scale: float) -> torch.Tensor:
    """ACT outputs ``[1, h, T, D]`` of heads ``q, k, v [1, h, T, D]`` with sink key indices ``sinks[i]``."""
    n_h, T, D = q.shape[1], q.shape[2], q.shape[3]
    drop = torch.zeros(1, n_h, T, 1)
    for i, idx in enumerate(sinks):
        drop[0, i, idx] = MASKED / scale
    ones = torch.ones(1, n_h, T, 1)
    o_n, lse_n = flash(torch.cat([q, ones], -1), torch.cat([k, drop], -1),
                       torch.cat([v, torch.zeros(1, n_h, T, 1)], -1), scale)
    rows = torch.arange(T)
    out = torch.empty(1, n_h, T, D)
    for i, idx in enumerate(sinks):
        seen = idx[None, :] <= rows[:, None]                                # sink j visible from row j on
        s_s = ((q[0, i] @ k[0, i, idx].T) * scale).masked_fill(~seen, float("-inf"))  # [T, |S|]
        lse = torch.logaddexp(lse_n[0, i], torch.logsumexp(s_s, -1))        # the full row's log-sum-exp
        p_s = torch.exp(s_s - lse[:, None])
        m = p_s.sum(-1, keepdim=True)
        p_out = p_s @ v[0, i, idx]
        has_rest = (rows + 1 - seen.sum(-1))[:, None] > 0                 # the row sees a non-sink key
        out[0, i] = torch.where(has_rest, betas[i] * p_out + (1.0 - betas[i] * m) * o_n[0, i, :, :D], p_out)
    return out
