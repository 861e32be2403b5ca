"""The echo experiment: reuse an earlier layer's attention pattern and measure the loss it costs.

``PatternEcho(heads=[target], source=HeadId)`` (probe.interventions) makes a head of layer
l+1 use a head of layer l's pattern (its own values). Variants per adjacent pair (l, l+1):

* ``same``: head h of l+1 echoes head h of l (heads are not aligned across layers, LiSA);
* ``matched``: head perm[h] of l+1 echoes head h of l, perm the optimal head matching;
* ``random``: a seeded random permutation (control: matching should beat it).

A *sharing plan* is a list of blocks of consecutive layers; every later layer of a block
echoes the block's first layer. :func:`greedy_plan` grows blocks greedily, most similar
merge first, keeping a merge only if the measured loss increase of the whole plan stays
within ``budget`` nats.

Methods: docs/methods.md §4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from probe import HeadId, InterventionSpec, PatternEcho, intervene

from .measure import match_heads


def text_losses(model, texts: Sequence[torch.Tensor], spec: InterventionSpec | None = None) -> np.ndarray:
    """Per text ``[n_texts, 2]``: the summed next-token cross-entropy (nats) and the number of predicted tokens.

    Kept per text so every loss figure can be resampled over the held-out texts (its interval).
    """
    out = np.zeros((len(texts), 2))
    for i, ids in enumerate(texts):
        with torch.no_grad():
            if spec:
                with intervene(model, spec):
                    logits = model.hf(ids).logits
            else:
                logits = model.hf(ids).logits
        ce = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        out[i] = float(ce), int(ids.shape[1]) - 1
    return out


def pooled(texts: np.ndarray) -> float:
    """Mean loss per predicted token of ``[.., n_texts, 2]`` (sum, count) rows, pooled over the texts."""
    t = np.asarray(texts, dtype=np.float64)
    return t[..., 0].sum(-1) / np.maximum(t[..., 1].sum(-1), 1)


def mean_loss(model, texts: Sequence[torch.Tensor], spec: InterventionSpec | None = None) -> float:
    """Mean next-token cross-entropy (nats per predicted token, pooled over ``texts``)."""
    return float(pooled(text_losses(model, texts, spec)))


def echo_edits(src: int, dst: int, perm: Sequence[int]) -> list[PatternEcho]:
    """Edits making head ``perm[h]`` of layer ``dst`` use head ``h`` of layer ``src``."""
    return [PatternEcho(heads=(HeadId(dst, int(perm[h])),), source=HeadId(src, h)) for h in range(len(perm))]


def pair_perm(variant: str, head_cos: np.ndarray, n_layers: int, n_heads: int, src: int, dst: int,
              seed: int = 0) -> np.ndarray:
    """Head map for ``variant`` ("same", "matched" or "random") from layer ``src`` to ``dst``."""
    if variant == "same":
        return np.arange(n_heads)
    if variant == "matched":
        return match_heads(head_cos, n_layers, n_heads, src, dst)
    if variant == "random":
        return np.random.default_rng(seed * 1000 + dst).permutation(n_heads)
    raise ValueError(f"unknown echo variant {variant!r}: use 'same', 'matched' or 'random'")


def plan_spec(blocks: Sequence[Sequence[int]], variant: str, head_cos: np.ndarray, n_layers: int,
              n_heads: int) -> InterventionSpec:
    """All echoes of a sharing plan: each later layer of a block echoes the block's first layer."""
    edits = []
    for block in blocks:
        src = block[0]
        for dst in block[1:]:
            edits += echo_edits(src, dst, pair_perm(variant, head_cos, n_layers, n_heads, src, dst))
    return InterventionSpec(edits)


@dataclass(frozen=True)
class PlanSearch:
    """The state of the greedy sharing-plan search: current blocks, their cost, rejected merges, trial log."""

    blocks: tuple[tuple[int, ...], ...]
    cost: float = 0.0
    rejected: tuple[tuple[int, int, int], ...] = ()
    log: tuple[dict, ...] = ()

    @classmethod
    def start(cls, n_layers: int) -> "PlanSearch":
        return cls(tuple((l,) for l in range(n_layers)))


def next_trial(layer_cos: np.ndarray, state: PlanSearch, min_layer: int = 0):
    """The best untried merge of two neighbouring blocks: ``(blocks, score, merge)`` or ``None``.

    A merge's score is the lowest layer cosine between the left block's first layer and each
    layer of the right block; layers below ``min_layer`` never share.
    """
    blocks = state.blocks
    cands = [(min(layer_cos[a[0], t] for t in b), i) for i, (a, b) in enumerate(zip(blocks, blocks[1:]))
             if a[0] >= min_layer and (a[0], b[0], b[-1]) not in state.rejected]
    if not cands:
        return None
    score, i = max(cands)
    trial = blocks[:i] + (blocks[i] + blocks[i + 1],) + blocks[i + 2:]
    return trial, float(score), (blocks[i][0], blocks[i + 1][0], blocks[i + 1][-1])


def record_trial(state: PlanSearch, trial, score: float, merge, cost: float, budget: float) -> PlanSearch:
    """The search after measuring ``trial`` (its loss increase ``cost``): kept when within ``budget``."""
    ok = cost <= budget
    entry = {"trial": len(state.log), "merge": list(merge), "score": score, "loss_increase": float(cost),
             "accepted": bool(ok)}
    if ok:
        return PlanSearch(tuple(trial), float(cost), state.rejected, state.log + (entry,))
    return PlanSearch(state.blocks, state.cost, state.rejected + (tuple(merge),), state.log + (entry,))


def greedy_plan(layer_cos: np.ndarray, measure: Callable[[list[list[int]]], float], budget: float,
                max_trials: int = 12, min_layer: int = 0) -> tuple[list[list[int]], float, list[dict]]:
    """Grow blocks greedily under a loss budget; returns (blocks, measured cost, trial log).

    Candidates (see :func:`next_trial`) are tried best first; ``measure(blocks)`` gives the loss
    increase of a whole plan, and a merge is kept when that stays ``<= budget``.
    """
    state = PlanSearch.start(layer_cos.shape[0])
    while len(state.log) < max_trials and (step := next_trial(layer_cos, state, min_layer)) is not None:
        trial, score, merge = step
        state = record_trial(state, trial, score, merge, measure([list(b) for b in trial]), budget)
    return [list(b) for b in state.blocks], state.cost, list(state.log)
