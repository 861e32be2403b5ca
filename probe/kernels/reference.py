"""The eager reference of the fused kernels on the same inputs (float64 by default), for tests.

It runs :func:`probe.eager.attend` (which defines every edit) and computes, from the final
pattern of every chunk, the row statistics of :func:`probe.eager.row_stats` and the received
column sums, so its outputs line up one to one with :func:`probe.kernels.fused_attend`.
"""
from __future__ import annotations

import torch

from .. import eager
from ..stats import KeyGroup


def reference_attend(q, k, v, *, scale: float, mask=None, plan=None, groups=(), received_from: int = 0,
                     dtype=torch.float64, chunk: int = 64):
    """``(out [B, Tq, H, D], row stats, received [B, H, K])`` from the eager engine in ``dtype``."""
    B, H, Tq, _ = q.shape
    K = k.shape[2]
    masks = (torch.stack([KeyGroup(str(i), a, b).mask(K, q.device) for i, (a, b) in enumerate(groups)])
             if groups else None)
    parts: list[dict] = []
    col = torch.zeros(B, H, K, dtype=dtype, device=q.device)

    def on_chunk(chunk):
        parts.append(eager.row_stats(chunk.probs, masks, chunk.scores))
        keep = (torch.arange(chunk.rows.start, chunk.rows.stop, device=q.device) >= received_from).to(chunk.probs.dtype)
        col.add_((chunk.probs * keep[None, None, :, None]).sum(2))

    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    out = eager.attend(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale, mask=mask, plan=plan,
                       chunk=chunk, on_chunk=on_chunk)
    stats = {key: torch.cat([p[key] for p in parts], dim=2) for key in parts[0]}
    if "group_mass" not in stats:
        stats["group_mass"] = torch.zeros(B, H, Tq, 0, dtype=dtype)
    return out, stats, col
