"""Mitigation: Lookback Lens guided decoding and the PAINT-style pre-softmax boost.

Guided decoding (Chuang et al. 2024, §4): at each step sample ``n_candidates`` chunks of
``chunk`` tokens, score each chunk's mean lookback ratios with the detector, keep the chunk the
detector finds most grounded, continue from it. A chunk's rows are the ones that produced its
tokens: the row of the token before it (shared by all candidates) and the rows of its own tokens
but the last (the last row produces the next chunk's first token and is carried over).

PAINT-style boost (arXiv 2501.12206): pre-softmax scores on context keys become ``z + alpha*|z|``
in the chosen heads of layers ``2..L-1``, on the last query row (``SpanBoost(rows="last")``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from probe.compat import output_cache, with_cache
from probe.checks import check_generation
from probe.errors import InputError
from probe.heads import HeadId
from probe.interventions import InterventionSpec, SpanBoost
from probe.runtime import collect_stats
from probe.stats import StatsRequest
from probe.streaming import _stop_ids

from .detector import Detector
from .lookback import Regions, ratios_from_stats, regions


@dataclass(frozen=True)
class GuidedOutput:
    new_ids: list[int]
    text: str
    chunk_scores: list[float]        # detector score of each kept chunk
    row_lr: np.ndarray               # [n_new, L, H] ratios of the rows that produced each kept token


def _sample(logits: torch.Tensor, gen: torch.Generator, temperature: float, top_p: float) -> int:
    """Nucleus sampling on the host (float32) with the seeded host generator: the same draw on any device."""
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    p, idx = probs.sort(descending=True)
    keep = (p.cumsum(0) - p) < top_p
    p = p * keep
    return int(idx[torch.multinomial(p / p.sum(), 1, generator=gen)])


def _candidate(model, reg: Regions, past, logits, n: int, stop: set[int], sample):
    """Sample up to ``n`` tokens after ``past``, feeding each one; returns (tokens, lr [k, L, H], past, logits)."""
    request = StatsRequest(groups=tuple(reg.groups()), received=False)
    toks = []
    with collect_stats(model, request) as col, torch.no_grad():
        for _ in range(n):
            t = sample(logits)
            if t in stop:
                break
            toks.append(t)
            out = model.hf(torch.tensor([[t]], device=model.device), **with_cache(model.hf, past), use_cache=True)
            past, logits = output_cache(out), out.logits[0, -1]
    lr = (ratios_from_stats(col.result(), reg, "one") if toks
          else torch.zeros(0, model.n_layers, model.n_heads, device="cpu"))  # statistics live on the host
    return toks, lr, past, logits


def guided_generate(model, prompt: str | torch.Tensor, detector: Detector, *, ctx: tuple[int, int] | None = None,
                    max_new_tokens: int = 16, chunk: int = 8, n_candidates: int = 8, temperature: float = 0.9,
                    top_p: float = 0.95, seed: int = 0, reading: str = "code", stop_at_newline: bool = True,
                    random_choice: bool = False) -> GuidedOutput:
    """Lookback Lens guided decoding; ``ctx`` = context key span (default: the whole prompt but its last token).

    Each step samples ``n_candidates`` chunks and keeps the one the detector scores most grounded;
    an empty chunk (stop at once) is kept only when every candidate is empty.
    ``random_choice=True`` keeps a random candidate instead (the sampling control).
    """
    ids = model.encode(prompt) if isinstance(prompt, str) else prompt
    T = ids.shape[1]
    if T < 2:
        raise InputError("the prompt needs a context and at least one more token")
    check_generation(model, T, max_new_tokens)
    c0, c1 = ctx or (0, T - 1)
    reg = regions(T, c0, c1, reading)
    if detector.n_layers != model.n_layers or detector.n_heads != model.n_heads:
        raise InputError(f"detector is for {detector.n_layers}x{detector.n_heads} heads, model has "
                         f"{model.n_layers}x{model.n_heads}: train a detector on this model")
    gen, stop = torch.Generator().manual_seed(seed), _stop_ids(model, stop_at_newline)
    request = StatsRequest(groups=tuple(reg.groups()), received=False, from_pos=T - 1)
    with collect_stats(model, request) as col, torch.no_grad():
        out = model.hf(ids, use_cache=True)
    past, logits = output_cache(out), out.logits[0, -1]
    carry = ratios_from_stats(col.result(), reg, "one")[-1:]     # row that produces the next token
    kept, rows, scores = [], [], []
    while len(kept) < max_new_tokens:
        best = None
        for c in range(n_candidates):
            toks, lr, p2, lg2 = _candidate(model, reg, copy.deepcopy(past), logits,
                                           min(chunk, max_new_tokens - len(kept)), stop,
                                           lambda lg: _sample(lg, gen, temperature, top_p))
            feats = torch.cat([carry, lr[:-1]]) if len(toks) else carry
            s = float(detector.score(feats.mean(0).flatten().numpy()[None])[0])
            # a candidate that stops at once is scored on the prompt's row alone: it wins only if all do
            key = (bool(toks), float(torch.rand(1, generator=gen, device="cpu")) if random_choice else s)
            if best is None or key > best[0]:
                best = (key, s, toks, feats, p2, lg2, lr)
        _, s, toks, feats, past, logits, lr = best
        if not toks:
            break
        kept += toks
        rows.append(feats[:len(toks)])
        scores.append(s)
        carry = lr[-1:]
        if len(toks) < chunk:
            break
    row_lr = torch.cat(rows).numpy() if rows else np.zeros((0, model.n_layers, model.n_heads))
    return GuidedOutput(kept, model.tokenizer.decode(kept), scores, row_lr)


def boost_spec(heads, ctx: tuple[int, int], alpha: float = 0.3) -> InterventionSpec:
    """PAINT-style boost of the context keys in ``heads`` on the last query row."""
    if not heads:
        raise InputError("no heads to boost: give at least one head in layers 2..L-1")
    return InterventionSpec([SpanBoost(heads=tuple(heads), spans=(tuple(ctx),), alpha=alpha, rows="last")])


def boost_heads(detector: Detector, k: int | None = None, how: str = "top", seed: int = 0) -> list[HeadId]:
    """Heads in layers ``2..L-1``: all (``k=None``), the top-``k`` by detector coefficient, or ``k`` random."""
    L, H = detector.n_layers, detector.n_heads
    pool = [HeadId(l, h) for l in range(2, L) for h in range(H)]
    if not pool or (k is not None and not 0 < k <= len(pool)):
        raise InputError(f"cannot pick {k} heads from layers 2..{L - 1} ({len(pool)} heads): "
                         "use a model with at least 3 layers and 0 < k <= that many heads")
    if k is None:
        return pool
    if how == "random":
        rng = np.random.default_rng(seed)
        return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]
    w = detector.head_weights()
    return sorted(pool, key=lambda hd: -w[hd.layer, hd.head])[:k]
