"""Eager reference of headwise attention: chunked over query rows, with edits and statistics.

This module *defines* what every edit and statistic means; the fused kernels in
``probe.kernels`` are tested against it. It never holds more than ``chunk x T`` scores per head.
What the model's own attention computes (scaling, softcap, bias, mask, learned sinks) comes from
one :class:`probe.call.AttentionCall`; spans, sinks and per-position values address token positions.

Scores of one row, in order: ``s = scaling * q.k`` (Uniform heads: q := 0), the model's softcap
``cap * tanh(s / cap)``, its additive bias, then the edits (temperature, span boost), the mask, the
knockout; the softmax runs over the visible keys plus the learned sink logit when the model has one
(so the real pattern sums to 1 - sink mass); post-softmax edits (ACT, echo) and output edits follow.

Shapes: q ``[batch, head, query_pos, d_head]``, k/v ``[batch, kv_head, key_pos, d_head]``;
probabilities ``[batch, head, query_pos, key_pos]``; the output ``[batch, query_pos, head, d_head]``
(the layout Hugging Face attention functions return).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .call import AttentionCall
from .interventions import (Edit, InterventionSpec, MeanAblate, PatternEcho, SinkCalibration, SpanBoost,
                            SpanKnockout, Temperature, Uniform, ZeroAblate)

ChunkCallback = Callable[["Chunk"], None]


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

def span_mask(spans, n_keys: int, device) -> torch.Tensor:
    """``[K]`` bool over key *indices* ``[start, stop)`` (index = position: a plain call)."""
    m = torch.zeros(n_keys, dtype=torch.bool, device=device)
    for start, stop in spans:
        m[start:min(stop, n_keys)] = True
    return m


def masked_value(dtype: torch.dtype) -> float:
    """Fill for masked scores: the dtype's lowest finite value (exp underflows to exactly 0)."""
    return torch.finfo(dtype).min


def edit_scores(scores: torch.Tensor, seen: torch.Tensor, plan: LayerPlan, last_row: torch.Tensor,
                call: AttentionCall, local: dict[int, int] | None = None) -> torch.Tensor:
    """Apply the score edits to the model's scores ``[B, h, c, K]``; ``last_row [c]`` flags the forward's last query.

    Order: temperature, span boost, the mask (``seen``), knockout. Masked scores hold :func:`masked_value`.
    ``local`` maps a model head to its index in ``scores`` when only some heads are computed.
    Spans address token positions (``call.key_mask``).
    """
    local = local if local is not None else {h: h for h in range(scores.shape[1])}
    low = masked_value(scores.dtype)
    ones = torch.ones_like(last_row)
    for h, t in plan.temperature.items():
        if h in local:
            scores[:, local[h]] = scores[:, local[h]] / t
    for h, e in plan.boosts:
        if h in local:
            sel = (last_row if e.rows == "last" else ones)[None, :, None] & call.key_mask(e.spans)[:, None, :]
            s = scores[:, local[h]]
            scores[:, local[h]] = torch.where(sel, s + e.alpha * s.abs(), s)
    # in place (the scores are this chunk's buffer; a fresh T-wide tensor per chunk page-faults anew),
    # out of place where autograd records the graph
    scores = scores.masked_fill(~seen, low) if scores.requires_grad else scores.masked_fill_(~seen, low)
    for h, e in plan.knockouts:
        if h in local:
            sel = (last_row if e.rows == "last" else ones)[None, :, None] & call.key_mask(e.spans)[:, None, :]
            s = scores[:, local[h]]
            knocked = s.masked_fill(sel, low)
            keeps_some = (knocked > low).any(-1, keepdim=True)
            scores[:, local[h]] = torch.where(keeps_some, knocked, s)  # a row never loses all its keys
    return scores


# ----------------------------------------------------------------------------- ACT

def detect_sinks(col_sum: torch.Tensor, col_count: torch.Tensor | None, edit: SinkCalibration,
                 k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Sink mask ``[K]`` from column sums and counts (methods.md §2), first detected sink removed.

    Given ``edit.sinks`` are token positions, matched against ``k_pos [K]`` (default: index = position);
    ``col_sum`` is then not read (may be None).
    """
    if edit.sinks is not None:
        ref = col_sum if col_sum is not None else col_count
        pos = torch.arange(ref.shape[-1], device=ref.device) if k_pos is None else k_pos
        return torch.isin(pos, torch.tensor(edit.sinks, dtype=pos.dtype, device=pos.device))
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
    """Per row of ``probs [B, H, c, K]``: entropy (nats), max probability, argmax key index, group masses.

    With the (masked, edited) ``scores`` the entropy is ``L - sum_j p_j s_j`` where the row's
    log-sum-exp ``L = s_argmax - log p_max`` (the form the fused kernel uses); without them
    ``-sum_j p_j log p_j``. A row with no visible key has entropy 0 and max 0. With a learned sink
    the rows sum to 1 - sink mass and the entropy is ``-sum_j p_j log p_j`` over the real keys.
    """
    max_prob, argmax = probs.max(-1)
    if scores is None:
        logp = torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny))
        entropy = -torch.einsum("...k,...k->...", probs, logp)
    else:
        tiny = torch.finfo(probs.dtype).tiny
        lse = scores.gather(-1, argmax[..., None])[..., 0] - torch.log(max_prob.clamp(min=tiny))
        entropy = torch.where(max_prob > 0, lse - torch.einsum("...k,...k->...", probs, scores),
                              torch.zeros_like(lse))
    out = {"entropy": entropy.clamp(min=0.0), "max_prob": max_prob, "argmax": argmax}
    if groups is not None and groups.numel():
        out["group_mass"] = torch.einsum("bhck,gk->bhcg", probs, groups[:, :probs.shape[-1]].to(probs.dtype))
    return out


# ----------------------------------------------------------------------------- the chunked loop

@dataclass(frozen=True, eq=False)
class Chunk:
    """One chunk of query rows as the engine computed it (buffers are reused: copy what you keep)."""

    rows: slice                       # query indices of the chunk
    q_pos: torch.Tensor               # [B|1, c] token positions of the rows
    probs: torch.Tensor               # [B, H, c, K] the final pattern (over key indices)
    scores: torch.Tensor | None       # [B, H, c, K] row-shifted final scores; None after post-softmax edits / sinks
    sink: torch.Tensor | None         # [B, H, c] mass the learned sink took (None: the model has none)
    seen: torch.Tensor                # [B|1, 1|H, c, K] visible keys


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: AttentionCall | None = None,
           scale: float | None = None, q_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
           plan: LayerPlan | None = None, chunk: int = 256, echo: dict[int, torch.Tensor] | None = None,
           on_chunk: ChunkCallback | None = None, scratch: Scratch | None = None) -> torch.Tensor:
    """Attention over query chunks with ``plan``'s edits; returns ``[B, Tq, H, D]`` in ``q``'s dtype.

    ``call`` describes the model's attention (see :mod:`probe.call`); without it ``scale``, ``q_pos``
    (index positions of the queries, default the last ``Tq`` keys) and ``mask`` (bool or additive
    ``[B|1, 1, Tq, K]``) give a plain call. ``echo`` maps a target head to the ``[B, Tq, K]``
    pattern it must use; ``on_chunk(chunk)`` sees every chunk's final pattern (a :class:`Chunk`).

    >>> q = k = v = torch.randn(1, 2, 4, 8)
    >>> tuple(attend(q, k, v, scale=8 ** -0.5).shape)
    (1, 4, 2, 8)
    """
    plan = plan or LayerPlan()
    B, H, Tq, D = q.shape
    if call is None:
        call = AttentionCall.plain(scale if scale is not None else D ** -0.5, Tq, k.shape[2], mask, q_pos, q.device)
    work = torch.promote_types(q.dtype, torch.float32)
    kv_index = torch.arange(H, device=q.device) // (H // k.shape[1])
    k_rep, v_rep = k[:, kv_index].to(work), v[:, kv_index].to(work)
    scratch = scratch or Scratch()
    sinks, first = _act_sinks(q, k_rep, call, plan, chunk, scratch) if plan.act else ({}, None)
    separate = bool(sinks) and on_chunk is None and not echo  # nobody needs the calibrated pattern itself
    out = torch.empty(B, H, Tq, v.shape[-1], dtype=work, device=q.device)
    for r0 in range(0, Tq, chunk):
        rows = slice(r0, min(r0 + chunk, Tq))
        probs, scores, sink, seen = first if first is not None else _chunk_probs(q, k_rep, call, plan, rows,
                                                                                 scratch=scratch)
        if separate:
            out[:, :, rows] = act_output(probs, v_rep, sinks, plan)
            continue
        for h, sink_mask in sinks.items():
            probs[:, h] = calibrate(probs[:, h], sink_mask, plan.act[h].beta)
        for h, pattern in (echo or {}).items():
            probs[:, h] = pattern[:, rows].to(work)
            if sink is not None:
                sink[:, h] = (1.0 - probs[:, h].sum(-1)).clamp(min=0.0)
        if on_chunk is not None:  # scores only describe probs when no post-softmax edit ran
            on_chunk(Chunk(rows, call.q_pos[:, rows], probs, None if (sinks or echo) else scores, sink, seen))
        out[:, :, rows] = probs @ v_rep
    _edit_outputs(out, plan, call.q_pos)
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


def _model_scores(qc, kc, call: AttentionCall, plan: LayerPlan, rows: slice, heads, local, grad: bool, scratch):
    """The model's own scores ``[B, h, c, K]`` before any mask: scaling, softcap, bias (Uniform: q := 0)."""
    shape = (qc.shape[0], qc.shape[1], qc.shape[2], kc.shape[2])
    if grad:  # differentiable path (attribution patching): no out= buffers, no in-place ops on leaves
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * call.scaling
    else:
        scores = torch.matmul(qc, kc.transpose(-1, -2), out=scratch.get("scores", shape, kc.dtype, qc.device))
        scores.mul_(call.scaling)
    uniform = [local[h] for h in sorted(plan.uniform) if h in local]
    if uniform:
        scores[:, uniform] = 0.0
    if call.softcap is not None:
        cap = call.softcap
        scores = torch.tanh(scores / cap) * cap if grad else scores.div_(cap).tanh_().mul_(cap)
    bias = call.bias_rows(rows, heads)
    if bias is not None:
        scores = scores + bias.to(scores.dtype) if grad else scores.add_(bias.to(scores.dtype))
    return scores


def _chunk_probs(q, k_rep, call: AttentionCall, plan: LayerPlan, rows: slice, heads=None,
                 scratch: Scratch | None = None):
    """``(probs, shifted scores | None, sink mass | None, seen)`` for query ``rows`` (optionally some heads).

    The softmax runs in place on reusable buffers; shifted scores ``s - max_j s`` give the same
    entropy (``L - sum p s`` is shift invariant) and are what the statistics use. With a learned sink
    its logit joins the denominator and the shifted scores are not returned (they no longer give L).
    """
    work = k_rep.dtype
    scratch = scratch or Scratch()
    idx = list(range(q.shape[1])) if heads is None else list(heads)
    local = {h: i for i, h in enumerate(idx)}
    qc = (q if heads is None else q[:, idx])[:, :, rows].to(work)
    kc = k_rep if heads is None else k_rep[:, idx]
    grad = torch.is_grad_enabled() and (qc.requires_grad or kc.requires_grad)
    scores = _model_scores(qc, kc, call, plan, rows, None if heads is None else idx, local, grad, scratch)
    seen = call.visible(rows)
    if seen.shape[1] > 1 and heads is not None:
        seen = seen[:, idx]
    last = torch.arange(rows.start, rows.stop, device=q.device) == call.n_queries - 1
    scores = edit_scores(scores, seen, plan, last, call, local)
    sink = None
    if call.sinks is not None:
        sink = call.sinks.to(device=q.device, dtype=work)[idx].clone()
        for h, t in plan.temperature.items():
            if h in local:
                sink[local[h]] = sink[local[h]] / t
        sink = sink.view(1, -1, 1, 1)
    top = scores.detach().amax(-1, keepdim=True)
    if sink is not None:
        top = torch.maximum(top, sink)
    if grad:
        e = torch.exp(scores - top)
        den = e.sum(-1, keepdim=True) + (0.0 if sink is None else torch.exp(sink - top))
        probs, scores = e / den, scores - top
    else:
        scores.sub_(top)
        probs = torch.exp(scores, out=scratch.get("probs", scores.shape, work, q.device))
        den = probs.sum(-1, keepdim=True)
        if sink is not None:
            den = den + torch.exp(sink - top)
        probs.div_(den)
    sink_mass = None if sink is None else (torch.exp(sink - top) / den)[..., 0]
    if call.mask is not None:
        empty = ~seen.any(-1, keepdim=True)
        if bool(empty.any()):
            probs = probs.masked_fill(empty, 0.0)
    return probs, (None if sink is not None else scores), sink_mass, seen


def _act_sinks(q, k_rep, call: AttentionCall, plan: LayerPlan, chunk: int, scratch: Scratch | None = None):
    """First pass for ACT heads: column sums/counts of their (pre-calibration) pattern, then sinks.

    Returns, per head, a sink mask ``[B, 1, K]`` (sinks are detected per sequence; given sinks are
    token positions), and the pre-calibration chunk of :func:`_chunk_probs` when one chunk covered
    every row and every head is an ACT head (so the main pass can reuse it), else None.
    """
    heads = sorted(plan.act)
    B, Tq, K = q.shape[0], q.shape[2], k_rep.shape[2]
    col_sum = torch.zeros(B, len(heads), K, dtype=k_rep.dtype, device=q.device)
    col_cnt = torch.zeros(B, K, dtype=k_rep.dtype, device=q.device)
    reuse = None
    if any(plan.act[h].sinks is None for h in heads):
        for r0 in range(0, Tq, chunk):
            reuse = _chunk_probs(q, k_rep, call, plan, slice(r0, min(r0 + chunk, Tq)), heads, scratch)
            col_sum += reuse[0].sum(2)
        col_cnt += call.visible_counts().to(col_cnt.dtype)
        if not (chunk >= Tq and heads == list(range(q.shape[1]))):
            reuse = None
    kp = call.k_pos
    return {h: torch.stack([detect_sinks(col_sum[b, i], col_cnt[b], plan.act[h], kp[min(b, kp.shape[0] - 1)])
                            for b in range(B)])[:, None] for i, h in enumerate(heads)}, reuse
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
    """Output edits on ``out [B, H, Tq, D]``; per-position values are indexed by token position ``q_pos [B|1, Tq]``."""
    q_pos = q_pos if q_pos.dim() == 2 else q_pos[None]
    for h in plan.zero:
        out[:, h] = 0.0
    for h, value in plan.mean.items():
        value = value.to(out.dtype).to(out.device)
        if value.dim() == 1:
            out[:, h] = value
        else:
            if int(q_pos.max()) >= value.shape[0]:
                raise IndexError(f"patch values cover {value.shape[0]} positions, query reaches {int(q_pos.max())}")
            out[:, h] = value[q_pos.clamp(min=0)]  # padding rows (negative positions) are never read
