"""Streaming statistics at close to the cost of the model's own attention (CPU, plain causal prefill).

The eager engine (:mod:`probe.eager`) defines every statistic; this path computes the same ones
for the commonest call (a causal prefill: no mask tensor, softcap, bias or learned sink, no score
or pattern edit, one sequence) with less work:

1. ``out, L = flash(q, k, v)``: torch's CPU flash kernel (what SDPA itself runs) returns the output
   and each row's log-sum-exp ``L``; the output is bit for bit the model's own.
2. One pass over row chunks of ``x = scale q.k - L``, only over the keys a chunk can see (the
   causal lower triangle, about half the work of a full ``T x T`` pass): ``p = exp(x)`` is the
   pattern itself (no normalising pass), ``max_prob = exp(max x)`` and the argmax come from ``x``,
   the entropy is ``-sum p x``, group masses are sums over each group's key range and the received
   attention the column sums of ``p`` (rows from ``from_pos`` on).

Same meaning as :func:`probe.eager.row_stats` and the collector's column sums (tested against the
eager engine on the tiny families and the embedded model).
"""
from __future__ import annotations

import torch

from .call import AttentionCall
from .eager import LayerPlan, Scratch, _edit_outputs, masked_value


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall,
              plan: LayerPlan) -> bool:
    """Whether :func:`stats_attend` computes this call exactly (else the eager engine runs it)."""
    return (query.device.type == "cpu" and query.shape[0] == 1 and call.mask is None and not call.all_visible
            and call.diag == 0 and call.n_queries == call.n_keys and call.softcap is None and call.sinks is None
            and call.bias is None and not (plan.edits_scores or plan.act or plan.echo)
            and query.shape[-1] == key.shape[-1] == value.shape[-1] and query.shape[1] % key.shape[1] == 0
            and query.dtype == torch.float32 == key.dtype == value.dtype
            and not (torch.is_grad_enabled() and query.requires_grad))


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention ``out [B, H, T, D]`` and the rows' log-sum-exp ``[B, H, T]`` (float32) from torch's CPU flash kernel."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse.float()


def stats_attend(query, key, value, call: AttentionCall, plan: LayerPlan, groups=(), received: bool = True,
                 received_from: int = 0, chunk: int = 256, scratch: Scratch | None = None):
    """``(out [B, T, H, D], row stats, received [B, H, K] | None)``: the contract of :func:`probe.kernels.fused_attend`.

    ``groups`` are ``(start, stop|None)`` token-position ranges; row stats are ``entropy, max_prob,
    argmax [B, H, T]`` (argmax a key index) and ``group_mass [B, H, T, G]``.
    """
    scratch = scratch or Scratch()
    H = query.shape[1]
    rep = H // key.shape[1]
    k = key if rep == 1 else key.repeat_interleave(rep, dim=1)
    v = value if rep == 1 else value.repeat_interleave(rep, dim=1)
    out, lse = flash(query, k, v, call.scaling)
    q32, k32 = query, k
    ranges = _index_ranges(groups, call.k_pos[0])
    T = call.n_queries
    stats = {"entropy": torch.empty(1, H, T), "max_prob": torch.empty(1, H, T),
             "argmax": torch.empty(1, H, T, dtype=torch.long), "group_mass": torch.zeros(1, H, T, len(ranges))}
    col = torch.zeros(1, H, call.n_keys) if received else None
    row0 = int(torch.searchsorted(call.q_pos[0], torch.tensor(received_from)))  # first row at or after from_pos
    for r0 in range(0, T, chunk):
        r1 = min(r0 + chunk, T)
        _chunk(q32, k32, lse, call.scaling, r0, r1, ranges, stats, col, row0, scratch)
    if plan.zero or plan.mean:
        _edit_outputs(out, plan, call.q_pos)
    return out.transpose(1, 2), stats, col


def _chunk(q, k, lse, scale: float, r0: int, r1: int, ranges, stats, col, row0: int, scratch: Scratch) -> None:
    """Rows ``r0:r1`` over keys ``0:r1`` (a causal prefill: query ``i`` sees keys ``0..i``)."""
    B, H, _, _ = q.shape
    c, n = r1 - r0, r1
    x = torch.matmul(q[:, :, r0:r1], k[:, :, :n].transpose(-1, -2), out=scratch.get("scores", (B, H, c, n),
                                                                                      torch.float32, q.device))
    x.mul_(scale).sub_(lse[:, :, r0:r1, None])  # x = s - L = log p
    future = scratch.get("future", (c, c), torch.bool, q.device)
    torch.ones(c, c, out=future)
    future.triu_(1)
    x[..., r0:r1].masked_fill_(future, masked_value(x.dtype))
    best, arg = x.max(-1)
    stats["max_prob"][:, :, r0:r1] = best.exp_()
    stats["argmax"][:, :, r0:r1] = arg
    p = torch.exp(x, out=scratch.get("probs", x.shape, torch.float32, q.device))
    stats["entropy"][:, :, r0:r1] = torch.linalg.vecdot(p, x).neg_().clamp_(min=0.0)
    for gi, (a, b) in enumerate(ranges):
        if b > a and a < n:
            stats["group_mass"][:, :, r0:r1, gi] = p[..., a:min(b, n)].sum(-1)
    if col is not None and r1 > row0:
        col[..., :n] += p[:, :, max(row0 - r0, 0):].sum(2)


def _index_ranges(groups, k_pos: torch.Tensor) -> list[tuple[int, int]]:
    """Key-index ranges ``[a, b)`` of position ranges ``(start, stop|None)`` (``k_pos`` increases by one per key)."""
    out = []
    for start, stop in groups:
        a = int(torch.searchsorted(k_pos, torch.tensor(start, dtype=k_pos.dtype)))
        b = k_pos.numel() if stop is None else int(torch.searchsorted(k_pos, torch.tensor(stop, dtype=k_pos.dtype)))
        out.append((a, b))
    return out
