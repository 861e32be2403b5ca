"""Launch the fused kernels for one attention call: plan -> per-head parameter tensors -> outputs.

:func:`fused_attend` is the kernel twin of :func:`probe.eager.attend` plus the statistics a
:class:`probe.stats.StatsCollector` keeps. ACT heads whose sinks must be detected take a
pre-pass: forward without ACT (LSE only), received-attention column sums, then
:func:`probe.eager.detect_sinks` on the column means, exactly as the eager engine does.
"""
from __future__ import annotations

import torch

from .. import eager
from ..call import AttentionCall
from ..errors import InputError

NGROUPS = 16


def plan_supported(plan: eager.LayerPlan | None) -> str | None:
    """``None`` when the kernel can run ``plan``; else the reason it cannot (the caller uses eager)."""
    if plan is None:
        return None
    if plan.knockouts:
        return "SpanKnockout (row-dependent 'never lose all keys' rule)"
    if plan.echo:
        return "PatternEcho needs materialised patterns"
    heads = [h for h, _ in plan.boosts]
    if len(heads) != len(set(heads)):
        return "more than one SpanBoost on one head"
    return None


def call_supported(call: AttentionCall | None, plan: eager.LayerPlan | None = None) -> str | None:
    """``None`` when the kernel implements every argument of ``call``; else what it lacks (the caller uses eager).

    The kernel computes ``scale * q.k`` under a visibility mask: anything else the model's attention
    does (softcap, learned sinks, an additive bias, per-head masks) goes to the exact eager engine.
    """
    if call is None:
        return None
    if call.softcap is not None:
        return "attention logit softcapping (tanh)"
    if call.sinks is not None:
        return "learned attention sinks (s_aux)"
    if call.bias is not None:
        return "an additive score bias (position_bias or a float mask)"
    if call.mask is not None and call.mask.shape[1] > 1:
        return "a per-head attention mask"
    if plan is not None and plan.boosts and not call.shared_keys:
        return "SpanBoost on batch rows whose keys sit at different positions"
    return None


def _plan_heads(plan: eager.LayerPlan) -> set[int]:
    return (set(plan.uniform) | set(plan.temperature) | {h for h, _ in plan.boosts} | set(plan.act) | set(plan.zero)
            | set(plan.mean))


def _params(plan: eager.LayerPlan, H: int, K: int, device, call: AttentionCall) -> dict:
    """Per-head parameter tensors (built on the CPU, moved once: no per-element device writes)."""
    p = {"temp": torch.ones(H), "unif": torch.zeros(H, dtype=torch.int32), "skip": torch.zeros(H, dtype=torch.int32),
         "beta": torch.ones(H), "balpha": torch.zeros(H), "blast": torch.zeros(H, dtype=torch.int32),
         "boost": torch.zeros(H, max(K, 1), dtype=torch.int8)}
    for h, t in plan.temperature.items():
        p["temp"][h] = t
    for h in plan.uniform:
        p["unif"][h] = 1
    for h in plan.zero:
        p["skip"][h] = 1
    for h, e in plan.boosts:
        p["balpha"][h] = e.alpha
        p["blast"][h] = int(e.rows == "last")
        p["boost"][h] = call.key_mask(e.spans)[0].cpu()
    for h, e in plan.act.items():
        p["beta"][h] = e.beta
    out = {k: v.to(device, non_blocking=True) for k, v in p.items()}
    out["has_boost"] = bool(plan.boosts)
    return out


def _mask_rows(call: AttentionCall):
    """Visible-key mask as int8 ``[B|1, Tq, K]`` and its batch stride (0 when broadcast); None: plain causal."""
    if call.lower_right:
        return None, 0
    vis = call.visible(slice(None))[:, 0].to(torch.int8).contiguous()
    return vis, (vis.stride(0) if vis.shape[0] > 1 else 0)


def _groups(groups, call: AttentionCall, device):
    """Key groups given in token positions, as key-index ranges of this call (keys hold consecutive positions)."""
    groups = list(groups or ())
    if len(groups) > NGROUPS:
        raise InputError(f"the fused kernel measures at most {NGROUPS} key groups, got {len(groups)}")
    K, first = call.n_keys, int(call.k_pos[0, 0])  # token position of key 0
    lo = torch.zeros(NGROUPS, dtype=torch.int32)
    hi = torch.zeros(NGROUPS, dtype=torch.int32)
    for i, (a, b) in enumerate(groups):
        lo[i] = min(max(a - first, 0), K)
        hi[i] = K if b is None else min(max(b - first, 0), K)
    return lo.to(device), hi.to(device), len(groups)


def _blocks(D: int, block_m: int, block_n: int):
    import triton

    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)))


def _forward(q, k, v, scale, p, vis, vis_bs, sink, g_lo, g_hi, stats, blocks, num_warps):
    from .attention import fused_attention_kernel

    B, H, Tq, D = q.shape
    K = k.shape[2]
    dev = q.device
    out = torch.empty(B, Tq, H, D, dtype=q.dtype, device=dev)
    rows = dict(dtype=torch.float32, device=dev)
    cS, cN = torch.empty(B, H, Tq, **rows), torch.empty(B, H, Tq, **rows)
    ent, maxp = torch.zeros(B, H, Tq, **rows), torch.zeros(B, H, Tq, **rows)
    arg = torch.zeros(B, H, Tq, dtype=torch.int32, device=dev)
    gm = torch.zeros(B, H, Tq, NGROUPS, **rows) if stats else torch.zeros(1, **rows)
    dummy = torch.zeros(1, dtype=torch.int8, device=dev)
    grid = (triton_cdiv(Tq, blocks["BLOCK_M"]), B * H)
    fused_attention_kernel[grid](
        q, k, v, out, cS, cN, ent, maxp, arg, gm,
        p["temp"], p["unif"], p["skip"], p["beta"], p["balpha"], p["blast"], p["boost"],
        dummy if sink is None else sink, dummy if vis is None else vis, g_lo, g_hi,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        vis_bs, K, H, H // k.shape[1], Tq, K, D, float(scale),
        HAS_ACT=sink is not None, HAS_BOOST=p["has_boost"], HAS_MASK=vis is not None,
        STATS=stats, IEEE=q.dtype == torch.float32, num_warps=num_warps, **blocks)
    return out, cS, cN, {"entropy": ent, "max_prob": maxp, "argmax": arg.long(), "group_mass": gm}


def _received(q, k, scale, p, vis, vis_bs, sink, cS, cN, row0, blocks, num_warps):
    from .received import received_kernel

    B, H, Tq, D = q.shape
    K = k.shape[2]
    col = torch.zeros(B, H, K, dtype=torch.float32, device=q.device)
    dummy = torch.zeros(1, dtype=torch.int8, device=q.device)
    grid = (triton_cdiv(K, blocks["BLOCK_N"]), B * H)
    received_kernel[grid](
        q, k, cS, cN, col, p["temp"], p["unif"], p["balpha"], p["blast"], p["boost"],
        dummy if sink is None else sink, dummy if vis is None else vis,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        vis_bs, K, int(row0), H, H // k.shape[1], Tq, K, D, float(scale),
        HAS_ACT=sink is not None, HAS_BOOST=p["has_boost"], HAS_MASK=vis is not None,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, **blocks)
    return col


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _detect(q, k, v, scale, plan, p, vis, vis_bs, blocks, num_warps, call: AttentionCall):
    """Sink masks ``[B, H, K]`` int8 for the ACT heads (given or detected from column means)."""
    B, H, Tq, _ = q.shape
    K = k.shape[2]
    sink = torch.zeros(B, H, K, dtype=torch.int8, device=q.device)
    col = cnt = None
    if any(e.sinks is None for e in plan.act.values()):
        g_lo = torch.zeros(NGROUPS, dtype=torch.int32, device=q.device)
        plain = {**p, "beta": torch.ones_like(p["beta"]), "skip": torch.zeros_like(p["skip"])}
        _, _, lse, _ = _forward(q, k, v, scale, plain, vis, vis_bs, None, g_lo, g_lo, False, blocks, num_warps)
        col = _received(q, k, scale, p, vis, vis_bs, None, lse, lse, 0, blocks, num_warps)
        cnt = call.visible_counts(0).to(q.device).expand(B, K)
    kp = call.k_pos
    for h, e in plan.act.items():
        for b in range(B):
            found = eager.detect_sinks(col[b, h] if e.sinks is None else torch.zeros(K, device=q.device),
                                       cnt[b] if e.sinks is None else None, e, kp[min(b, kp.shape[0] - 1)])
            sink[b, h] = found.to(torch.int8)
    return sink


def fused_attend(q, k, v, *, scale: float | None = None, mask=None, call: AttentionCall | None = None, plan=None,
                 groups=(), stats: bool = True, received: bool = False, received_from: int = 0, block_m: int = 64,
                 block_n: int = 64, num_warps: int | None = None):
    """Kernel attention: ``(out [B, Tq, H, D], row stats or None, received [B, H, K] or None)``.

    ``call`` describes the model's attention (:mod:`probe.call`); without it ``scale`` and ``mask``
    give a plain causal call. ``groups`` are key ranges ``(start, stop|None)`` in token positions;
    row stats are ``entropy, max_prob, argmax [B, H, Tq]`` (argmax a key index) and ``group_mass
    [B, H, Tq, G]``, of the final (edited, calibrated) pattern. ``received_from`` drops query rows
    before it from the column sums.
    """
    plan = plan or eager.LayerPlan()
    call = call or AttentionCall.plain(scale, q.shape[2], k.shape[2], mask, device=q.device)
    reason = plan_supported(plan) or call_supported(call, plan)
    if reason:
        raise InputError(f"the fused kernel cannot run this plan: {reason}; use probe.eager.attend")
    scale = call.scaling
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Tq, D = q.shape
    K = k.shape[2]
    if H % k.shape[1]:
        raise InputError(f"{H} query heads do not divide into {k.shape[1]} KV heads")
    bad = sorted(h for h in _plan_heads(plan) if not 0 <= h < H)
    if bad:
        raise InputError(f"the plan edits heads {bad} but the input has {H} query heads: compile it for this layer")
    p = _params(plan, H, K, q.device, call)
    vis, vis_bs = _mask_rows(call)
    g_lo, g_hi, G = _groups(groups, call, q.device)
    blocks = _blocks(D, block_m, block_n)
    num_warps = num_warps or (4 if D <= 64 else 8)
    sink = _detect(q, k, v, scale, plan, p, vis, vis_bs, blocks, num_warps, call) if plan.act else None
    out, cS, cN, rs = _forward(q, k, v, scale, p, vis, vis_bs, sink, g_lo, g_hi, stats, blocks, num_warps)
    if plan.mean:
        eager._edit_outputs(out.transpose(1, 2), eager.LayerPlan(mean=plan.mean), call.q_pos)
    col = _received(q, k, scale, p, vis, vis_bs, sink, cS, cN, received_from, blocks, num_warps) if received else None
    if stats:
        rs["group_mass"] = rs["group_mass"][..., :G]
    return out, (rs if stats else None), col
