"""Received-attention kernel: column sums ``c_j = sum_i exp(s_ij - C_i)`` parallel over key blocks.

The ACT sink statistic (column means, methods.md par. 2) needs, per key, the attention it
receives from every query. Each program owns one block of keys and walks the query rows that
can see it, recomputing the edited scores and reusing the per-row constants the forward wrote
(``C = LSE`` for the plain pattern; ``C_S, C_N`` for the ACT-calibrated one), so no pattern is stored.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention import _scores


@triton.jit
def received_kernel(
        Q, K, C_S, C_N, OUT,
        TEMP, UNIF, BALPHA, BLAST, BOOST, SINK, MASK,
        sqb, sqh, sqm, skb, skh, skn, mask_b_stride, mask_q_stride,
        row0, n_heads, kv_group, n_q, n_k, head_dim, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ACT: tl.constexpr, HAS_BOOST: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // kv_group
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < n_k
    d_ok = dims < head_dim
    temp = tl.load(TEMP + h)
    is_uniform = tl.load(UNIF + h)
    boost_alpha = tl.load(BALPHA + h)
    boost_last = tl.load(BLAST + h)
    k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_ACT:
        sink = tl.load(SINK + bh * n_k + cols, mask=col_ok, other=0) != 0
    else:
        sink = cols < 0
    acc = tl.zeros([BLOCK_N], tl.float32)
    if HAS_MASK:
        lo = 0
    else:  # causal: first query row whose position reaches this key block
        lo = tl.maximum(pid_n * BLOCK_N - (n_k - n_q), 0)
    lo = tl.maximum(lo, row0)  # rows before row0 are not counted (StatsRequest.from_pos)
    lo = (lo // BLOCK_M) * BLOCK_M
    for start_m in range(lo, n_q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = (rows < n_q) & (rows >= row0)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        s = _scores(q, k, rows, cols, h, b, n_q, n_k, scale, temp, is_uniform, boost_alpha, boost_last,
                    BOOST, MASK, mask_b_stride, mask_q_stride, HAS_BOOST, HAS_MASK, IEEE)
        cS = tl.where(row_ok, tl.load(C_S + bh * n_q + rows, mask=row_ok, other=float("inf")), float("inf"))
        cN = tl.where(row_ok, tl.load(C_N + bh * n_q + rows, mask=row_ok, other=float("inf")), float("inf"))
        c = tl.where(sink[None, :], cS[:, None], cN[:, None])
        p = tl.exp(s - c)
        acc += tl.sum(tl.where(s == float("-inf"), 0.0, p), 0)
    tl.store(OUT + bh * n_k + cols, acc, mask=col_ok)
