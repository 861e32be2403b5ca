"""The retrieval-head scan as stages: NIAH samples -> head scores -> masking cells -> result.

Stage ``samples``: one unit per grid cell (needle, length, depth): prefill on the fast path, greedy
decoding through the streaming statistics (:mod:`.decode`), copy-paste events per head
(:mod:`.scoring`). Its reduce scores the heads (mean over answered samples) and draws the head
sets of the masking control: the top-K and, per seed, K random heads from outside the best
``exclude_top``. Stage ``masking``: one unit per masking cell, the prompt prefilled once and
decoded with each set made uniform (decode rows only). Methods: docs/methods.md §1.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from probe import HeadId
from probe.errors import InputError

from ..config import Config, opt
from ..contract import Analysis, Stage, Unit
from .checks import check_masking, check_sample
from .decode import decode, prefill
from .harness import Needle, build_prompt, load_needles, rouge1_recall, select_needles
from .result import RetrievalResult
from .scoring import head_scores, sample_events

SUCCESS_RECALL = 0.5
Cell = tuple[str, int, float]
# The full grid (issue 18): 6 lengths to the embedded model's 8k context (8000 + 50 new tokens <= 8192)
# x 5 depths x every shipped needle (4, each with its own never-repeated haystack). Method: docs/methods.md §1.
DEFAULT_LENGTHS = (500, 1000, 2000, 4000, 6000, 8000)
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)


@dataclass(frozen=True)
class RetrievalConfig(Config):
    """The NIAH grid and the masking control (defaults: 6 lengths to 8k x 5 depths x every shipped needle)."""

    lengths: tuple[int, ...] = opt(DEFAULT_LENGTHS, "context lengths in tokens", min=1)
    depths: tuple[float, ...] = opt(DEFAULT_DEPTHS, "needle depths in percent", min=0, max=100)
    needles: tuple[str, ...] | None = opt(None, "needle names from data/retrieval/needles.jsonl (default: all)")
    cells: tuple[Cell, ...] | None = opt(None, "explicit needle:length:depth cells instead of the grid")
    threshold: float = opt(0.1, "a retrieval head scores above this", min=0, max=1)
    k: int = opt(10, "heads masked (top-K and each random-K set)", min=1)
    seeds: tuple[int, ...] = opt((0, 1, 2), "seeds of the random-K head sets", min=0)
    exclude_top: int | None = opt(None, "random heads are drawn outside the best N (default 2K)", min=0)
    mask: bool = opt(True, "run the masking experiment")
    mask_lengths: tuple[int, ...] | None = opt(None, "lengths of the masking grid (default: lengths)", min=1)
    mask_cells: tuple[Cell, ...] | None = opt(None, "explicit needle:length:depth masking cells (default: the "
                                                    "scored cells, or the grid with mask_lengths)")
    max_new_tokens: int = opt(50, "greedy answer length (stops at a newline)", min=1)
    row: Literal["producing", "consuming"] = opt("producing", "attention row scored for each emitted token "
                                                              "(reference: the row that produced it)")
    lead: bool = opt(True, "end the prompt with the needle's completion-style lead-in")

    @classmethod
    def small(cls, model) -> "RetrievalConfig":
        """A grid that says something in about a minute: 3 depths, and 3 lengths where the context allows."""
        top = min(1000, model.n_ctx - 48)
        lengths = (top // 4, top // 2, top) if top >= 400 else (top,)
        return cls(lengths=lengths, depths=(10.0, 50.0, 90.0), needles=("code",), k=5, seeds=(0,), max_new_tokens=8)


# ----------------------------------------------------------------------------- one sample, one masked cell

def run_sample(model, needle: Needle, length: int, depth: float, *, max_new_tokens: int = 50,
               row: str = "producing", lead: bool = True, seed: int = 0) -> dict:
    """One unmasked NIAH sample: response, ROUGE-1 recall and per-head events/|span| (``events [layer, head]``)."""
    p = build_prompt(model, needle, length, depth, max_new_tokens=max_new_tokens, lead=lead, seed=seed)
    new, st = decode(model, p.ids, prefill(model, p.ids), max_new_tokens=max_new_tokens, span=(p.start, p.stop))
    ev = sample_events(st.argmax, st.query_pos, p.ids[0].tolist(), new, (p.start, p.stop), row=row)
    return _record(model, p, new) | {"events": ev.numpy()}


def run_masked(model, needle: Needle, length: int, depth: float, conditions: dict[str, list[HeadId]], *,
               max_new_tokens: int = 50, lead: bool = True, seed: int = 0) -> dict:
    """One prompt, prefilled once, decoded with each condition's heads made uniform (decode rows only)."""
    p = build_prompt(model, needle, length, depth, max_new_tokens=max_new_tokens, lead=lead, seed=seed)
    past = prefill(model, p.ids)
    runs = {}
    for cond, heads in conditions.items():
        new, _ = decode(model, p.ids, past, max_new_tokens=max_new_tokens, heads=heads)
        runs[cond] = _record(model, p, new) | {"heads": [str(h) for h in heads]}
    return {"runs": runs}


def _record(model, p, new: list[int]) -> dict:
    response = model.tokenizer.decode(new, skip_special_tokens=True).strip()
    recall = rouge1_recall(p.needle.answer, response)
    return {"needle": p.needle.name, "length": p.length, "depth": p.depth, "prompt_len": int(p.ids.shape[1]),
            "span": [p.start, p.stop], "new_ids": list(new), "response": response, "recall": recall,
            "success": recall > SUCCESS_RECALL}


def top_heads(scores: torch.Tensor, k: int) -> list[HeadId]:
    """The ``k`` best heads, best first."""
    H = scores.shape[1]
    return [HeadId(int(i) // H, int(i) % H) for i in scores.flatten().argsort(descending=True, stable=True)[:k]]


def pick_random(model, k: int, seed: int, exclude: set[HeadId]) -> list[HeadId]:
    """``k`` heads drawn (seeded) from outside ``exclude``."""
    pool = [h for h in model.layout.all_heads() if h not in exclude]
    if len(pool) < k:
        raise InputError(f"only {len(pool)} heads outside the top set; use a smaller k than {k}")
    return random.Random(seed).sample(pool, k)


# ----------------------------------------------------------------------------- stages

def _cells(cells, needles, lengths, depths) -> list[tuple[Needle, int, float]]:
    known = {n.name: n for n in load_needles()}
    if cells:
        missing = sorted({c[0] for c in cells} - set(known))
        if missing:
            raise InputError(f"unknown needle(s) {missing} in cells; known: {sorted(known)}")
        return [(known[n], int(L), float(d)) for n, L, d in cells]
    return [(n, int(L), float(d)) for n in select_needles(list(needles) if needles else None)
            for L in lengths for d in depths]


def _unit(needle: Needle, length: int, depth: float, **extra) -> Unit:
    return Unit(f"{needle.name}-L{length}-D{depth:g}", {"needle": asdict(needle), "length": length,
                                                         "depth": depth, **extra})


def plan_samples(model, cfg: RetrievalConfig, _) -> list[Unit]:
    return [_unit(n, L, d) for n, L, d in _cells(cfg.cells, cfg.needles, cfg.lengths, cfg.depths)]


def compute_sample(model, cfg: RetrievalConfig, unit: Unit, _) -> dict:
    s = unit.spec
    return run_sample(model, Needle(**s["needle"]), s["length"], s["depth"], max_new_tokens=cfg.max_new_tokens,
                      row=cfg.row, lead=cfg.lead)


def reduce_samples(model, cfg: RetrievalConfig, payloads: dict, _) -> dict:
    """Head scores over the answered samples, the top-K set and the random-K control sets."""
    recs = list(payloads.values())
    scores, _n = head_scores([torch.as_tensor(r["events"], dtype=torch.float64, device="cpu") for r in recs],
                             [r["success"] for r in recs])
    if not recs:
        scores = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64, device="cpu")
    top = top_heads(scores, cfg.k)
    exclude = set(top_heads(scores, cfg.exclude_top or min(2 * cfg.k, scores.numel() - cfg.k)))
    random_sets = {f"random{s}": pick_random(model, cfg.k, s, exclude) for s in cfg.seeds} if cfg.mask else {}
    return {"records": recs, "scores": scores, "top": top, "random_sets": random_sets}


def plan_masking(model, cfg: RetrievalConfig, state: dict) -> list[Unit]:
    if not cfg.mask:
        return []
    conditions = {"top": [str(h) for h in state["top"]]} | \
        {c: [str(h) for h in hs] for c, hs in state["random_sets"].items()}
    explicit = cfg.mask_cells or (cfg.cells if not cfg.mask_lengths else None)   # default: the scored cells
    cells = _cells(explicit, cfg.needles, cfg.mask_lengths or cfg.lengths, cfg.depths)
    return [_unit(n, L, d, conditions=conditions) for n, L, d in cells]


def compute_masking(model, cfg: RetrievalConfig, unit: Unit, _) -> dict:
    s = unit.spec
    conditions = {c: [HeadId.parse(h) for h in hs] for c, hs in s["conditions"].items()}
    return run_masked(model, Needle(**s["needle"]), s["length"], s["depth"], conditions,
                      max_new_tokens=cfg.max_new_tokens, lead=cfg.lead)


def reduce_masking(model, cfg: RetrievalConfig, payloads: dict, state: dict) -> RetrievalResult:
    masking = pd.DataFrame([r | {"condition": c} for p in payloads.values() for c, r in p["runs"].items()])
    samples = pd.DataFrame([{k: v for k, v in r.items() if k != "events"} for r in state["records"]])
    needles = sorted({r["needle"] for r in state["records"]})
    meta = {"k": cfg.k, "seeds": list(cfg.seeds), "row": cfg.row, "lengths": list(cfg.lengths),
            "depths": list(cfg.depths), "needles": needles, "mask_lengths": list(cfg.mask_lengths or cfg.lengths),
            "weights_hash": model.weights_hash}
    events = np.stack([np.asarray(r["events"], np.float64) for r in state["records"]]) if state["records"] else None
    return RetrievalResult(model.model_id, state["scores"].numpy(), model.n_kv_heads, cfg.threshold, samples, masking,
                           tuple(state["top"]), {c: tuple(hs) for c, hs in state["random_sets"].items()}, meta,
                           events)


RETRIEVAL = Analysis(
    name="retrieval", title="Retrieval heads", order=10, icon=":material/search:",
    description="Needle-in-a-haystack: a head makes a copy-paste event when its argmax key is in the needle and "
                "holds the emitted token; masking makes the top-K heads (vs random K) uniform while decoding.",
    paper="Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality",
    url="https://arxiv.org/abs/2404.15574", methods="docs/methods.md §1",
    config=RetrievalConfig, result=RetrievalResult, min_samples=75,
    stages=(Stage("samples", plan_samples, compute_sample, reduce_samples, depends=("max_new_tokens", "row", "lead"),
                  check=check_sample),
            Stage("masking", plan_masking, compute_masking, reduce_masking, depends=("max_new_tokens", "lead"),
                  check=check_masking)))
