"""Mitigation: Lookback Lens guided decoding and the PAINT-style pre-softmax boost.

Guided decoding (Chuang et al. 2024, §4): at each step sample ``n_candidates`` chunks of
``chunk`` tokens, score each chunk's mean lookback ratios with the detector, keep the chunk the
detector finds most grounded, continue from it. A chunk's rows are the ones that produced its
tokens: the row of the token before it (shared by all candidates) and the rows of its own tokens
but the last (the last row produces the next chunk's first token and is carried over).

PAINT-style boost (arXiv 2501.12206): pre-softmax scores on context keys become ``z + alpha*|z|``
in the chosen heads of layers ``2..L-1``, on the last query row (``SpanBoost(rows="last")``);
``boost="paint"`` uses PAINT as stated instead (:mod:`.paint`: passage tokens only, 0.7 / 0.3).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from probe.compat import output_cache, with_cache
from probe.checks import check_generation
from probe.errors import InputError
from probe.heads import HeadId
from probe.interventions import InterventionSpec, SpanBoost
from probe.runtime import collect_stats
from probe.stats import StatsRequest
from probe.decoding import stop_ids

from ..inference import mcnemar_exact
from .data import Item, answer_item, item_regions, label, text_regions
from .detector import Detector, paired_diff
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
    gen, stop = torch.Generator().manual_seed(seed), stop_ids(model, newline=stop_at_newline)
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


# ----------------------------------------------------------------------------- the mitigation experiment

def conditions(det: Detector, k: int, alpha: float, boost: str = "context") -> dict[str, dict]:
    """Mitigation conditions; ``control`` names the condition each one is compared with besides greedy.

    greedy (before), sampled (one candidate per chunk: the sampling control), guided (best of 8 by
    the detector), and the boost on the detector's top-``k`` heads, on ``k`` random heads (control)
    and on all heads of layers 2..L-1. ``boost="paint"``: the boosts are PAINT as stated
    (:mod:`.paint`: passage tokens only, 0.7/0.3, all heads of layers 2..L-1 for ``paint``; the
    top-``k`` detector heads vs ``k`` random heads).
    """
    if boost == "paint":
        return {"greedy": {},
                "paint": {"paint": True},
                f"paint_top{k}": {"paint": True, "heads": boost_heads(det, k, "top"), "control": f"paint_random{k}"},
                f"paint_random{k}": {"paint": True, "heads": boost_heads(det, k, "random")},
                "sampled": {"guided": True, "n_candidates": 1},
                "guided": {"guided": True, "control": "sampled"}}
    if boost != "context":
        raise InputError(f"boost must be 'context' (whole context, one alpha) or 'paint', not {boost!r}")
    return {"greedy": {},
            f"boost_top{k}": {"heads": boost_heads(det, k, "top"), "alpha": alpha, "control": f"boost_random{k}"},
            f"boost_random{k}": {"heads": boost_heads(det, k, "random"), "alpha": alpha},
            "boost_all": {"heads": boost_heads(det), "alpha": alpha},
            "sampled": {"guided": True, "n_candidates": 1},
            "guided": {"guided": True, "control": "sampled"}}


def answer(model, item: Item, det: Detector, cond: dict, max_new_tokens: int, seed: int) -> str:
    """The answer to ``item`` under one condition (guided decoding, PAINT, or a boost of ``cond["heads"]``)."""
    ids, reg = item_regions(model, item)
    if cond.get("guided"):
        return guided_generate(model, ids, det, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=max_new_tokens,
                               reading=det.meta.get("reading", "code"),
                               seed=seed, n_candidates=cond.get("n_candidates", 8)).text
    if cond.get("paint"):
        from .paint import paint_for

        spec = paint_for(model, item.prompt, item.passage, heads=cond.get("heads"))[1]
        return answer_item(model, item, max_new_tokens=max_new_tokens, spec=spec)["answer"]
    spec = boost_spec(cond["heads"], (reg.ctx_start, reg.ctx_stop), cond["alpha"]) if cond.get("heads") else None
    return answer_item(model, item, max_new_tokens=max_new_tokens, spec=spec)["answer"]


def rates(answers: dict[str, list[str]], items: list[Item], conds: dict[str, dict]) -> pd.DataFrame:
    """Grounded / contradicted rate per condition, and the paired change vs greedy and vs the control.

    ``d_greedy`` / ``d_control``: paired change in grounded rate with a 95% bootstrap interval;
    ``p_greedy`` / ``p_control``: the exact McNemar p-values of the same pairs.
    """
    grounded, rows = {}, []
    for name, texts in answers.items():
        labs = [label(t, it.passage_value, it.true_value) for t, it in zip(texts, items)]
        grounded[name] = np.array([lab == 1 for lab in labs], float)
        rows.append({"condition": name, "n": len(labs), "grounded_rate": float(grounded[name].mean()),
                     "contradicted_rate": float(np.mean([lab == 0 for lab in labs])),
                     "heads": ", ".join(str(h) for h in conds[name].get("heads", []))})
    for r in rows:
        r.update(zip(("d_greedy", "d_greedy_lo", "d_greedy_hi"), paired_diff(grounded[r["condition"]],
                                                                              grounded["greedy"])))
        c = conds[r["condition"]].get("control")
        r["control"] = c or ""
        r.update(zip(("d_control", "d_control_lo", "d_control_hi"),
                     paired_diff(grounded[r["condition"]], grounded[c]) if c else (np.nan,) * 3))
        r["p_greedy"] = mcnemar_exact(grounded[r["condition"]], grounded["greedy"])
        r["p_control"] = mcnemar_exact(grounded[r["condition"]], grounded[c]) if c else np.nan
    return pd.DataFrame(rows)


def guided_view(model, det: Detector, prompt: str, *, max_new_tokens: int = 12, chunk: int = 8,
                n_candidates: int = 8, seed: int = 0):
    """Guided decoding of ``prompt`` (context: all but its last line) and each new token's P(grounded).

    Returns ``(output, tokens, scores)``; the token view shows the detector's probability on each
    generated token's own row of lookback ratios.
    """
    from .result import token_scores

    reading = det.meta.get("reading", "code")
    ids, reg = text_regions(model, prompt, reading=reading)
    out = guided_generate(model, ids, det, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=max_new_tokens,
                          chunk=chunk, n_candidates=n_candidates, seed=seed, reading=reading)
    return out, [model.tokenizer.decode([t]) for t in out.new_ids], token_scores(det, out.row_lr)
