"""Fused flash-style causal attention forward with per-head edits and online statistics (Triton).

One pass over the keys per block of query rows (FlashAttention-2 style online softmax,
Dao 2023) computes the head output *and* the row statistics that :mod:`probe.stats` needs,
so no ``T x T`` pattern is ever materialised. Meanings follow :mod:`probe.eager` exactly:

* scores: ``s = scale * q.k``; Uniform heads ``s := 0``; Temperature ``s / t``; SpanBoost
  ``s + alpha*|s|`` on the boosted keys (all rows or the last row only); then the causal /
  given mask. GQA: query head ``h`` reads KV head ``h // (H // H_kv)``.
* ACT (Yu et al. 2024; methods.md par. 2, output form): sink and non-sink keys keep *separate*
  online-softmax accumulators; the epilogue merges them as
  ``O' = beta*m*O_S + (1 - beta*m)*O_N`` with ``m = sigmoid(L_S - L_N)`` (never a log-gamma bias).
  A row without non-sink mass is left unchanged; a fully masked row gives zeros.
* statistics of the final pattern, in the same pass (methods.md par. 6): entropy (from the
  centred sums ``sum exp(s - M)(s - M)``), max probability and argmax (running best, strictly
  greater replaces), mass on up to 16 key ranges (``[BLOCK_M, 16]`` accumulator via a one-hot dot).
* per row it also writes ``C_S, C_N`` with ``p_ij = exp(s_ij - C_X(j), i)`` for the final pattern,
  so :mod:`probe.kernels.received` can recompute column sums (``C = LSE`` without ACT).
"""
from __future__ import annotations

import triton
import triton.language as tl

NGROUPS = 16  # group accumulator width (stats.MAX_GROUPS)


@triton.jit
def _scores(q, k, rows, cols, h, b, n_q, n_k, scale, temp, is_uniform, boost_alpha, boost_last,
            BOOST, MASK, mask_b_stride, mask_q_stride, HAS_BOOST: tl.constexpr, HAS_MASK: tl.constexpr,
            IEEE: tl.constexpr):
    """Edited scores ``[BM, BN]`` (fp32) with ``-inf`` on invisible keys (eager.edit_scores order)."""
    if IEEE:  # fp32 inputs: no tf32 rounding
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(is_uniform != 0, 0.0, s)
    s = s / temp
    if HAS_BOOST:
        on = tl.load(BOOST + h * n_k + cols, mask=cols < n_k, other=0)
        row_ok = (boost_last == 0) | (rows == n_q - 1)
        sel = row_ok[:, None] & (on != 0)[None, :]
        s = tl.where(sel, s + boost_alpha * tl.abs(s), s)
    inside = (rows[:, None] < n_q) & (cols[None, :] < n_k)
    if HAS_MASK:
        vis = tl.load(MASK + b * mask_b_stride + rows[:, None] * mask_q_stride + cols[None, :], mask=inside, other=0)
        keep = inside & (vis != 0)
    else:
        keep = inside & (cols[None, :] <= (rows + (n_k - n_q))[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _online(m_i, l_i, t_i, best, bidx, acc, gm, s, v, cols, g_lo, g_hi, STATS: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step for one key class (sink or non-sink) on scores ``s`` (-inf = excluded)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    if STATS:
        shift = l_i * tl.where(l_i > 0, m_i - m_use, 0.0)  # no 0 * -inf
        t_i = alpha * (t_i + shift) + tl.sum(p * tl.where(p > 0, s - m_use[:, None], 0.0), 1)
        blk = tl.max(s, 1)
        arg = tl.argmax(s, 1) + tl.min(cols, 0)
        better = blk > best
        bidx = tl.where(better, arg, bidx)
        best = tl.where(better, blk, best)
        onehot = ((cols[:, None] >= g_lo[None, :]) & (cols[:, None] < g_hi[None, :])).to(tl.float32)
        gm = gm * alpha[:, None] + tl.dot(p, onehot, input_precision="ieee")
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, t_i, best, bidx, acc, gm


@triton.jit
def _sigmoid(x):
    z = tl.exp(-tl.abs(x))  # no overflow for large |x|
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def fused_attention_kernel(
        Q, K, V, O, C_S, C_N, ENT, MAXP, ARG, GM,
        TEMP, UNIF, SKIP, BETA, BALPHA, BLAST, BOOST, SINK, MASK, G_LO, G_HI,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, som, soh,
        mask_b_stride, mask_q_stride,
        n_heads, kv_group, n_q, n_k, head_dim, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ACT: tl.constexpr, HAS_BOOST: tl.constexpr, HAS_MASK: tl.constexpr, STATS: tl.constexpr,
        IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // kv_group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_q
    d_ok = dims < head_dim

    temp = tl.load(TEMP + h)
    is_uniform = tl.load(UNIF + h)
    skip = tl.load(SKIP + h)
    beta = tl.load(BETA + h)
    boost_alpha = tl.load(BALPHA + h)
    boost_last = tl.load(BLAST + h)
    g_idx = tl.arange(0, 16)
    g_lo = tl.load(G_LO + g_idx)
    g_hi = tl.load(G_HI + g_idx)

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    ninf = tl.full([BLOCK_M], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_M], tl.float32)
    izero = tl.zeros([BLOCK_M], tl.int32)
    mN, lN, tN, bN, iN = ninf, zero, zero, ninf, izero
    mS, lS, tS, bS, iS = ninf, zero, zero, ninf, izero
    accN = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    accS = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    gN = tl.zeros([BLOCK_M, 16], tl.float32)
    gS = tl.zeros([BLOCK_M, 16], tl.float32)

    if HAS_MASK:
        hi = n_k
    else:
        hi = tl.minimum(n_k, (pid_m + 1) * BLOCK_M + (n_k - n_q))
    if not STATS:
        hi = hi * (skip == 0).to(tl.int32)  # an ablated head without statistics needs no keys
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (cols < n_k)[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + dims[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, rows, cols, h, b, n_q, n_k, scale, temp, is_uniform, boost_alpha, boost_last,
                    BOOST, MASK, mask_b_stride, mask_q_stride, HAS_BOOST, HAS_MASK, IEEE)
        if HAS_ACT:
            sink = tl.load(SINK + bh * n_k + cols, mask=cols < n_k, other=0) != 0
            sS = tl.where(sink[None, :], s, float("-inf"))
            s = tl.where(sink[None, :], float("-inf"), s)
            mS, lS, tS, bS, iS, accS, gS = _online(mS, lS, tS, bS, iS, accS, gS, sS, v, cols, g_lo, g_hi, STATS, IEEE)
        mN, lN, tN, bN, iN, accN, gN = _online(mN, lN, tN, bN, iN, accN, gN, s, v, cols, g_lo, g_hi, STATS, IEEE)

    # epilogue: class weights W_S, W_N (final-pattern mass of each class) and merge
    hasS = lS > 0
    hasN = lN > 0
    LS = tl.where(hasS, mS + tl.log(tl.where(hasS, lS, 1.0)), 0.0)
    LN = tl.where(hasN, mN + tl.log(tl.where(hasN, lN, 1.0)), 0.0)
    m = tl.where(hasS, tl.where(hasN, _sigmoid(LS - LN), 1.0), 0.0)
    one_minus_m = tl.where(hasS, tl.where(hasN, _sigmoid(LN - LS), 0.0), 1.0)
    WS = tl.where(hasN, beta * m, tl.where(hasS, 1.0, 0.0))
    WN = tl.where(hasN, one_minus_m + (1.0 - beta) * m, 0.0)
    lS_safe = tl.where(hasS, lS, 1.0)
    lN_safe = tl.where(hasN, lN, 1.0)
    out = accS * (WS / lS_safe)[:, None] + accN * (WN / lN_safe)[:, None]
    out = tl.where(skip != 0, 0.0, out)
    tl.store(O + b * sob + rows[:, None] * som + h * soh + dims[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])

    posS = hasS & (WS > 0)
    posN = hasN & (WN > 0)
    cS = tl.where(posS, LS - tl.log(tl.where(posS, WS, 1.0)), float("inf"))
    cN = tl.where(posN, LN - tl.log(tl.where(posN, WN, 1.0)), float("inf"))
    row_off = bh * n_q + rows
    tl.store(C_S + row_off, cS, mask=row_ok)
    tl.store(C_N + row_off, cN, mask=row_ok)
    if STATS:
        # entropy of the merged pattern: sum_X W_X*H_X - sum_X W_X*log W_X, H_X = log l_X - t_X/l_X
        hS = tl.log(lS_safe) - tS / lS_safe
        hN = tl.log(lN_safe) - tN / lN_safe
        ent = tl.where(posS, WS * (hS - tl.log(tl.where(posS, WS, 1.0))), 0.0) \
            + tl.where(posN, WN * (hN - tl.log(tl.where(posN, WN, 1.0))), 0.0)
        pS = tl.where(posS, tl.exp(bS - cS), 0.0)
        pN = tl.where(posN, tl.exp(bN - cN), 0.0)
        takeS = (pS > pN) | ((pS == pN) & (iS < iN) & posS)
        tl.store(ENT + row_off, ent, mask=row_ok)
        tl.store(MAXP + row_off, tl.where(takeS, pS, pN), mask=row_ok)
        tl.store(ARG + row_off, tl.where(takeS, iS, iN), mask=row_ok)
        gm = gS * (WS / lS_safe)[:, None] + gN * (WN / lN_safe)[:, None]
        tl.store(GM + row_off[:, None] * 16 + g_idx[None, :], gm, mask=row_ok[:, None])
