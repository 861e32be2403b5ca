"""Head roles from attention patterns, and the cross-task intervention (Merullo et al. 2024, §5).

**Roles** (Wang et al. 2022 classes), measured with a :func:`probe.tap` ``on_probs`` observer:

- on repeated random tokens ``r_1..r_n r_1..r_n``: *previous-token* = mean ``A[i, i-1]``;
  *duplicate-token* = mean ``A[i, i-n]`` (the earlier copy of the current token); *induction* =
  mean ``A[i, i-n+1]`` (the token after the earlier copy), over the second half;
- on a task's prompts, from the last position: *mover-like* = attention to the answer token;
  *inhibition-like* (IOI) = attention to the repeated subject S2.

**Intervention.** Merullo et al. adjusted four mid-layer heads so that the Colored Objects circuit
behaves like the IOI one, where the S-inhibition heads attend to the repeated (wrong) name. Our
reading, as an analogue: take the heads that are in the IOI circuit but not in the Colored Objects
circuit and attend most to S2, boost their last-row attention to the distractor colours
(``SpanBoost``, rows="last"; alpha picked on a calibration split by mean LD), and compare held-out
accuracy before/after, with random heads of the same layers and the same edit as a control.

Methods: docs/methods.md §3.
"""
from __future__ import annotations

import numpy as np
import torch

from probe import InterventionSpec, SpanBoost, tap
from probe.heads import HeadId

from .patching import accuracy
from .tasks import TaskBatch, token_range


class _Rows:
    """on_probs observer keeping, per layer, the full ``[B, H, T, K]`` pattern (short inputs only; float32, host)."""

    layers = None

    def __init__(self):
        self.probs: dict[int, torch.Tensor] = {}

    def on_probs(self, layer, q_pos, probs):
        B, H, _, K = probs.shape
        store = self.probs.setdefault(layer, torch.zeros(B, H, K, K, device="cpu"))
        store[:, :, q_pos.cpu()] = probs.detach().float().cpu()


def _patterns(model, ids: torch.Tensor) -> torch.Tensor:
    rec = _Rows()
    with torch.no_grad(), tap(model, rec):
        model.hf(input_ids=ids, logits_to_keep=1)
    return torch.stack([rec.probs[l] for l in range(model.n_layers)])  # [L, B, H, T, T]


def repeated_token_roles(model, n: int = 8, length: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Previous-token, duplicate-token and induction scores ``[L, H]`` on repeated random tokens."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(*token_range(model), (n, length), generator=g, device="cpu")  # seeded on the host
    A = _patterns(model, torch.cat([seq, seq], dim=1).to(model.device))            # [L, B, H, T, T] host
    i = torch.arange(length, 2 * length, device="cpu")
    j = torch.arange(1, 2 * length, device="cpu")
    prev = A[..., j, j - 1].mean((1, 3))
    dup = A[..., i, i - length].mean((1, 3))
    ind = A[..., i, i - length + 1].mean((1, 3))
    return {"previous_token": prev.numpy(), "duplicate_token": dup.numpy(), "induction": ind.numpy()}


def attention_to(model, task: TaskBatch, key: str, batch: int = 16) -> np.ndarray:
    """Mean attention ``[L, H]`` from the last position to each prompt's ``positions[key]``."""
    out = []
    for s in range(0, task.n, batch):
        A = _patterns(model, task.clean[s:s + batch])[:, :, :, -1]  # [L, B, H, K]
        pos = torch.tensor([p[key] for p in task.positions[s:s + batch]], device="cpu")
        out.append(A.permute(1, 0, 2, 3)[torch.arange(len(pos), device="cpu"), :, :, pos])  # [b, L, H]
    return torch.cat(out).mean(0).numpy()


def inhibition_heads(ioi_scores, co_circuit, s2_attention, k: int = 4, pool_frac: float = 0.10) -> list[HeadId]:
    """Heads in the IOI top ``pool_frac`` (by |score|) but not in the Colored Objects circuit, most S2-attending."""
    s = np.abs(np.asarray(ioi_scores))
    n_pool = max(k, int(round(pool_frac * s.size)))
    flat = np.argsort(-s.ravel())[:n_pool]
    pool = [HeadId(int(i // s.shape[1]), int(i % s.shape[1])) for i in flat]
    pool = [h for h in pool if h not in set(co_circuit)]
    return sorted(sorted(pool, key=lambda h: -s2_attention[h.layer, h.head])[:k])


def steer_accuracy(model, task: TaskBatch, heads, alpha: float) -> dict:
    """Colored Objects accuracy with ``heads``' last-row attention boosted on the distractor colours."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(task.positions):
        groups.setdefault(tuple(p["distractors"]), []).append(i)
    lds, n_pair, n_top = [], 0.0, 0.0
    for spans, idx in groups.items():
        spec = InterventionSpec([SpanBoost(heads=list(heads), spans=[(q, q + 1) for q in spans], alpha=alpha,
                                           rows="last")]) if heads and alpha else None
        acc = accuracy(model, task.subset(idx), spec=spec)
        n_pair += acc["pair_accuracy"] * len(idx)
        n_top += acc["top1_accuracy"] * len(idx)
        lds.append(acc["mean_ld"] * len(idx))
    return {"pair_accuracy": n_pair / task.n, "top1_accuracy": n_top / task.n, "mean_ld": sum(lds) / task.n}


def random_heads_like(heads, n_heads: int, seed: int = 0, exclude=(), n_layers: int | None = None) -> list[HeadId]:
    """Random heads in the same layers as ``heads`` (a control); when a layer is full, any other head in
    layers up to one above the highest (never beyond ``n_layers``, the model's layer count)."""
    rng = np.random.default_rng(seed)
    taken = set(heads) | set(exclude)
    out: set[HeadId] = set()
    layers = {h.layer for h in heads}
    top = max(layers, default=-1) + 2 if n_layers is None else min(n_layers, max(layers, default=-1) + 2)
    for h in heads:
        choices = [HeadId(h.layer, j) for j in range(n_heads) if HeadId(h.layer, j) not in taken | out]
        if not choices:
            choices = [HeadId(l, j) for l in range(top) for j in range(n_heads) if HeadId(l, j) not in taken | out]
        out.add(choices[int(rng.integers(len(choices)))])
    return sorted(out)


def intervention(model, heads: list[HeadId], calib: TaskBatch, held_out: TaskBatch, alphas=(0.5, 1.0, 2.0),
                 seed: int = 0) -> dict:
    """Pick ``alpha`` for ``heads`` on ``calib``; held-out accuracy before/after and with random heads (control)."""
    calib_acc = {a: steer_accuracy(model, calib, heads, a)["mean_ld"] for a in alphas}
    alpha = max(calib_acc, key=calib_acc.get)
    control = random_heads_like(heads, model.n_heads, seed, n_layers=model.n_layers)
    return {"heads": [str(h) for h in heads], "alpha": alpha, "calib_mean_ld": {str(a): v for a, v in calib_acc.items()},
            "before": steer_accuracy(model, held_out, [], 0.0), "after": steer_accuracy(model, held_out, heads, alpha),
            "control_heads": [str(h) for h in control], "control": steer_accuracy(model, held_out, control, alpha)}
