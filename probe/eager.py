"""Eager reference of headwise attention: chunked over query rows, with edits and statistics.

This module *defines* what every edit and statistic means; the fused kernels in
``probe.kernels`` are tested against it. It never holds more than ``chunk x T`` scores per head.

Shapes: q ``[batch, head, query_pos, d_head]``, k/v ``[batch, kv_head, key_pos, d_head]``;
probabilities ``[batch, head, query_pos, key_pos]``; the output ``[batch, query_pos, head, d_head]``
(the layout Hugging Face attention functions return).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .interventions import (Edit, InterventionSpec, MeanAblate, PatternEcho, SinkCalibration, SpanBoost,
                            SpanKnockout, Temperature, Uniform, ZeroAblate)

ChunkCallback = Callable[..., None]  # (q_pos [c], probs [B, H, c, K], scores [B, H, c, K] | None)


@dataclass
class LayerPlan:
    """The edits one layer applies in one phase, indexed by query head."""

    uniform: set[int] = field(default_factory=set)
    temperature: dict[int, float] = field(default_factory=dict)
    boosts: list[tuple[int, SpanBoost]] = field(default_factory=list)
    knockouts: list[tuple[int, SpanKnockout]] = field(default_factory=list)
    act: dict[int, SinkCalibration] = field(default_factory=dict)
    echo: dict[int, tuple[int, int]] = field(default_factory=dict)  # target head -> (layer, head)
    zero: set[int] = field(default_factory=set)
    mean: dict[int, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any((self.uniform, self.temperature, self.boosts, self.knockouts, self.act, self.echo,
                    self.zero, self.mean))

    def heads(self) -> set[int]:
        """Every head this plan edits."""
        return (self.uniform | set(self.temperature) | {h for h, _ in self.boosts} | {h for h, _ in self.knockouts}
                | set(self.act) | set(self.echo) | self.zero | set(self.mean))

    def reindexed(self, heads: list[int]) -> "LayerPlan":
        """The same edits for the sub-tensor holding only ``heads`` (head ``heads[i]`` becomes ``i``)."""
        new = {h: i for i, h in enumerate(heads)}
        return LayerPlan(uniform={new[h] for h in self.uniform},
                         temperature={new[h]: t for h, t in self.temperature.items()},
                         boosts=[(new[h], e) for h, e in self.boosts],
                         knockouts=[(new[h], e) for h, e in self.knockouts],
                         act={new[h]: e for h, e in self.act.items()}, echo={new[h]: s for h, s in self.echo.items()},
                         zero={new[h] for h in self.zero}, mean={new[h]: v for h, v in self.mean.items()})

    @property
    def edits_scores(self) -> bool:
        return bool(self.uniform or self.temperature or self.boosts or self.knockouts)


def compile_plan(spec: InterventionSpec | None, layer: int, decoding: bool) -> LayerPlan:
    """Select the edits of ``spec`` that act on ``layer`` in this phase."""
    plan = LayerPlan()
    for edit in (spec.edits if spec else ()):
        if not edit.active(decoding):
            continue
        for i, head in enumerate(edit.heads):
            if head.layer == layer:
                _add(plan, edit, head.head, i)
    return plan


def _add(plan: LayerPlan, edit: Edit, h: int, i: int) -> None:
    if isinstance(edit, Uniform):
        plan.uniform.add(h)
    elif isinstance(edit, Temperature):
        plan.temperature[h] = plan.temperature.get(h, 1.0) * edit.temperature
    elif isinstance(edit, SpanBoost):
        plan.boosts.append((h, edit))
    elif isinstance(edit, SpanKnockout):
        plan.knockouts.append((h, edit))
    elif isinstance(edit, SinkCalibration):
        plan.act[h] = edit
    elif isinstance(edit, PatternEcho):
        plan.echo[h] = tuple(edit.source)
    elif isinstance(edit, ZeroAblate):
        plan.zero.add(h)
    elif isinstance(edit, MeanAblate):
        plan.mean[h] = edit.values[i]


# ----------------------------------------------------------------------------- masks and scores

def visible(q_pos: torch.Tensor, n_keys: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean ``[B|1, 1, c, K]``: which keys each query row may see (causal, or the given mask rows)."""
    if mask is None:
        keys = torch.arange(n_keys, device=q_pos.device)
        return (keys[None, :] <= q_pos[:, None])[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def span_mask(spans, n_keys: int, device) -> torch.Tensor:
    m = torch.zeros(n_keys, dtype=torch.bool, device=device)
    for start, stop in spans:
        m[start:min(stop, n_keys)] = True
    return m


def masked_value(dtype: torch.dtype) -> float:
    """Fill for masked scores: the dtype's lowest finite value (exp underflows to exactly 0)."""
    return torch.finfo(dtype).min


def edit_scores(scores: torch.Tensor, seen: torch.Tensor, plan: LayerPlan, last_row: torch.Tensor) -> torch.Tensor:
    """Apply pre-softmax edits to ``scores [B, H, c, K]``; ``last_row [c]`` flags the forward's last query.

    Order: uniform (query := 0), temperature, span boost, the causal/padding mask, knockout.
    Masked scores hold :func:`masked_value`.
    """
    K = scores.shape[-1]
    low = masked_value(scores.dtype)
    for h in plan.uniform:
        scores[:, h] = 0.0
    for h, t in plan.temperature.items():
        scores[:, h] = scores[:, h] / t
    for h, e in plan.boosts:
        cols = span_mask(e.spans, K, scores.device)
        rows = last_row if e.rows == "last" else torch.ones_like(last_row)
        sel = rows[:, None] & cols[None, :]
        s = scores[:, h]
        scores[:, h] = torch.where(sel, s + e.alpha * s.abs(), s)
    scores = scores.masked_fill(~seen, low)
    for h, e in plan.knockouts:
        cols = span_mask(e.spans, K, scores.device)
        rows = last_row if e.rows == "last" else torch.ones_like(last_row)
        s = scores[:, h]
        knocked = s.masked_fill(rows[:, None] & cols[None, :], low)
        keeps_some = (knocked > low).any(-1, keepdim=True)
        scores[:, h] = torch.where(keeps_some, knocked, s)  # a row never loses all its keys
    return scores


def softmax_rows(scores: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over keys; rows with no visible key (given ``seen``) are all zeros."""
    probs = torch.softmax(scores, dim=-1)
    if seen is not None:
        empty = ~seen.any(-1, keepdim=True)
        if bool(empty.any()):
            probs = probs.masked_fill(empty, 0.0)
    return probs


# ----------------------------------------------------------------------------- ACT

def detect_sinks(col_sum: torch.Tensor, col_count: torch.Tensor, edit: SinkCalibration) -> torch.Tensor:
    """Sink mask ``[K]`` from column sums and counts (methods.md §2), first detected sink removed."""
    K = col_sum.shape[-1]
    if edit.sinks is not None:
        return span_mask([(s, s + 1) for s in edit.sinks if s < K], K, col_sum.device)
    mean = col_sum / col_count.clamp(min=1)
    thresh = edit.tau if edit.rule == "tau" else edit.alpha / max(int((col_count > 0).sum()), 1)
    sinks = (mean > thresh) & (col_count >= max(edit.min_queries, 1))
    if edit.keep_first and sinks.any():
        sinks[int(torch.nonzero(sinks)[0])] = False
    return sinks


def calibrate(probs: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """ACT on rows ``[..., K]``: A'[s] = beta*A[s]; removed mass spread over non-sinks in proportion."""
    sink_mass = (probs * sinks).sum(-1, keepdim=True)
    rest = probs * ~sinks
    rest_mass = rest.sum(-1, keepdim=True)
    removed = (1.0 - beta) * sink_mass
    scale = torch.where(rest_mass > 0, 1.0 + removed / rest_mass.clamp(min=torch.finfo(probs.dtype).tiny),
                        torch.ones_like(rest_mass))
    out = torch.where(sinks, probs * beta, probs * scale)
    return torch.where(rest_mass > 0, out, probs)  # no non-sink mass: row unchanged


# ----------------------------------------------------------------------------- statistics

def row_stats(probs: torch.Tensor, groups: torch.Tensor | None, scores: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
    """Per row of ``probs [B, H, c, K]``: entropy (nats), max probability, argmax key, group masses.

    With the (masked, edited) ``scores`` the entropy is ``L - sum_j p_j s_j`` where the row's
    log-sum-exp ``L = s_argmax - log p_max`` (the form the fused kernel uses); without them
    ``-sum_j p_j log p_j``. A row with no visible key has entropy 0 and max 0.
    """
    max_prob, argmax = probs.max(-1)
    if scores is None:
        logp = torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny))
        entropy = -torch.einsum("...k,...k->...", probs, logp)
    else:
        lse = scores.gather(-1, argmax[..., None])[..., 0] - torch.log(max_prob.clamp(min=torch.finfo(probs.dtype).tiny))
        entropy = torch.where(max_prob > 0, lse - torch.einsum("...k,...k->...", probs, scores),
                              torch.zeros_like(lse))
    out = {"entropy": entropy.clamp(min=0.0), "max_prob": max_prob, "argmax": argmax}
    if groups is not None and groups.numel():
        out["group_mass"] = torch.einsum("bhck,gk->bhcg", probs, groups[:, :probs.shape[-1]].to(probs.dtype))
    return out


# ----------------------------------------------------------------------------- the chunked loop

def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_pos: torch.Tensor,
           mask: torch.Tensor | None = None, plan: LayerPlan | None = None, chunk: int = 256,
           echo: dict[int, torch.Tensor] | None = None, on_chunk: ChunkCallback | None = None,
           scratch: Scratch | None = None) -> torch.Tensor:
    """Attention over query chunks with ``plan``'s edits; returns ``[B, Tq, H, D]`` in ``q``'s dtype.

    ``q_pos [Tq]`` are absolute query positions (for the causal rule when ``mask`` is None);
    ``mask`` is a bool or additive ``[B|1, 1, Tq, K]`` mask; ``echo`` maps a target head to the
    ``[B, Tq, K]`` pattern it must use; ``on_chunk(q_pos, probs, shifted_scores)`` sees every
    chunk's final pattern (buffers are reused: copy what you keep).
    """
    plan = plan or LayerPlan()
    B, H, Tq, D = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    kv_index = torch.arange(H, device=q.device) // (H // k.shape[1])
    k_rep, v_rep = k[:, kv_index].to(work), v[:, kv_index].to(work)
    scratch = scratch or Scratch()
    sinks, first = _act_sinks(q, k_rep, scale, q_pos, mask, plan, chunk, scratch) if plan.act else ({}, None)
    separate = bool(sinks) and on_chunk is None and not echo  # nobody needs the calibrated pattern itself
    out = torch.empty(B, H, Tq, v.shape[-1], dtype=work, device=q.device)
    for r0 in range(0, Tq, chunk):
        rows = slice(r0, min(r0 + chunk, Tq))
        if first is not None:
            probs, scores = first
        else:
            probs, scores = _chunk_probs(q, k_rep, scale, q_pos, mask, plan, rows, Tq, scratch=scratch)
        if separate:
            out[:, :, rows] = act_output(probs, v_rep, sinks, plan)
            continue
        for h, sink_mask in sinks.items():
            probs[:, h] = calibrate(probs[:, h], sink_mask, plan.act[h].beta)
        for h, pattern in (echo or {}).items():
            probs[:, h] = pattern[:, rows].to(work)
        if on_chunk is not None:  # scores only describe probs when no post-softmax edit ran
            on_chunk(q_pos[rows], probs, None if (sinks or echo) else scores)
        out[:, :, rows] = probs @ v_rep
    _edit_outputs(out, plan, q_pos)
    return out.transpose(1, 2).to(q.dtype)


class Scratch:
    """Reusable flat buffers for chunk scores and probabilities (no allocation per chunk)."""

    def __init__(self):
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._flat.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._flat[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def _chunk_probs(q, k_rep, scale, q_pos, mask, plan, rows, Tq, heads=None, scratch: Scratch | None = None):
    """Probabilities and row-shifted scores ``s - max_j s`` for query ``rows`` (optionally some heads).

    The softmax runs in place on reusable buffers; shifted scores give the same entropy
    (``L - sum p s`` is shift invariant) and are what the statistics use.
    """
    work = k_rep.dtype
    scratch = scratch or Scratch()
    qc = q[:, :, rows].to(work)
    kc = k_rep
    if heads is not None:
        qc, kc = qc[:, heads], k_rep[:, heads]
    shape = (qc.shape[0], qc.shape[1], qc.shape[2], kc.shape[2])
    grad = torch.is_grad_enabled() and (qc.requires_grad or kc.requires_grad)
    if grad:  # differentiable path (attribution patching): no out= buffers, no in-place softmax
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    else:
        scores = torch.matmul(qc, kc.transpose(-1, -2), out=scratch.get("scores", shape, work, q.device)).mul_(scale)
    seen = visible(q_pos[rows], kc.shape[2], None if mask is None else mask[..., rows, :])
    if plan.edits_scores:
        last = torch.arange(rows.start, rows.stop, device=q.device) == Tq - 1
        if heads is None:
            edited = edit_scores(scores.clone() if grad else scores, seen, plan, last)
        else:
            full = torch.zeros((scores.shape[0], q.shape[1]) + scores.shape[2:], dtype=work, device=q.device)
            full[:, heads] = scores
            edited = edit_scores(full, seen, plan, last)[:, heads]
        scores = edited if grad else scores.copy_(edited)
    else:
        scores = scores.masked_fill(~seen, masked_value(work)) if grad else scores.masked_fill_(~seen, masked_value(work))
    if grad:
        scores = scores - scores.detach().amax(-1, keepdim=True)
        probs = torch.softmax(scores, dim=-1)
    else:
        scores.sub_(scores.amax(-1, keepdim=True))
        probs = torch.exp(scores, out=scratch.get("probs", shape, work, q.device))
        probs.div_(probs.sum(-1, keepdim=True))
    if mask is not None:
        empty = ~seen.any(-1, keepdim=True)
        if bool(empty.any()):
            probs = probs.masked_fill(empty, 0.0)
    return probs, scores


def _act_sinks(q, k_rep, scale, q_pos, mask, plan, chunk, scratch: Scratch | None = None
               ) -> tuple[dict[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """First pass for ACT heads: column sums/counts of their (pre-calibration) pattern, then sinks.

    Returns, per head, a sink mask ``[B, 1, K]`` (sinks are detected per sequence), and the
    pre-calibration ``(probs, shifted scores)`` when one chunk covered every row and every head
    is an ACT head (so the main pass can reuse them instead of recomputing), else None.
    """
    heads = sorted(plan.act)
    B, Tq, K = q.shape[0], q.shape[2], k_rep.shape[2]
    col_sum = torch.zeros(B, len(heads), K, dtype=k_rep.dtype, device=q.device)
    col_cnt = torch.zeros(B, K, dtype=k_rep.dtype, device=q.device)
    reuse = None
    if any(plan.act[h].sinks is None for h in heads):
        for r0 in range(0, Tq, chunk):
            rows = slice(r0, min(r0 + chunk, Tq))
            reuse = _chunk_probs(q, k_rep, scale, q_pos, mask, plan, rows, Tq, heads, scratch)
            col_sum += reuse[0].sum(2)
            seen = visible(q_pos[rows], K, None if mask is None else mask[..., rows, :])
            col_cnt += seen[:, 0].sum(1).to(col_cnt.dtype).expand(B, K)
        if not (chunk >= Tq and heads == list(range(q.shape[1]))):
            reuse = None
    return {h: torch.stack([detect_sinks(col_sum[b, i], col_cnt[b], plan.act[h]) for b in range(B)])[:, None]
            for i, h in enumerate(heads)}, reuse


def act_output(probs: torch.Tensor, v_rep: torch.Tensor, sinks: dict[int, torch.Tensor], plan: LayerPlan):
    """``calibrate(probs) @ v`` for every head, with the sink and non-sink accumulators kept separate.

    Per row: O' = beta * P_S + s * P_N with P_S = A[:, S] @ v[S], P_N = (A with S zeroed) @ v and
    s = 1 + (1 - beta) * m / r (m, r: sink and non-sink mass); a row with r = 0 keeps O = P_S.
    Equal to :func:`calibrate` followed by ``@ v`` (tested), but it touches only the |S| sink
    columns instead of rewriting the whole ``[rows, K]`` pattern. ``probs`` is overwritten.
    """
    B, H, c, _ = probs.shape
    out = torch.empty(B, H, c, v_rep.shape[-1], dtype=probs.dtype, device=probs.device)
    for h in range(H):
        if h not in sinks:
            out[:, h] = probs[:, h] @ v_rep[:, h]
            continue
        beta = plan.act[h].beta
        for b in range(B):
            idx = torch.nonzero(sinks[h][b, 0]).flatten()
            p, vb = probs[b, h], v_rep[b, h]
            if idx.numel() == 0:
                out[b, h] = p @ vb
                continue
            ps = p[:, idx]
            p.index_fill_(1, idx, 0.0)
            rest, m = p.sum(-1, keepdim=True), ps.sum(-1, keepdim=True)
            has_rest = rest > 0
            s = torch.where(has_rest, 1.0 + (1.0 - beta) * m / rest.clamp(min=torch.finfo(p.dtype).tiny), 1.0)
            out[b, h] = s * (p @ vb) + torch.where(has_rest, beta, 1.0) * (ps @ vb[idx])
    return out


def _edit_outputs(out: torch.Tensor, plan: LayerPlan, q_pos: torch.Tensor) -> None:
    for h in plan.zero:
        out[:, h] = 0.0
    for h, value in plan.mean.items():
        value = value.to(out.dtype).to(out.device)
        if value.dim() == 1:
            out[:, h] = value
        else:
            if int(q_pos.max()) >= value.shape[0]:
                raise IndexError(f"patch values cover {value.shape[0]} positions, query reaches {int(q_pos.max())}")
            out[:, h] = value[q_pos]
