"""Run the NIAH grid: per-sample retrieval events, head scores, and the masking experiment.

Each finished grid cell is one JSON file under ``out/samples`` (``out/masking`` for masked runs),
written atomically and skipped on rerun, so an interrupted scan resumes where it stopped.
Prefill runs on the fast path (no patterns) over all but the last prompt token; the last prompt
token and every new token are decode rows through the streaming statistics (see :mod:`.decode`).
The masking pass prefills each prompt once and decodes it under every condition.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from probe import HeadId
from probe.atomic import read_json, write_json
from probe.errors import InputError

from .decode import decode, prefill
from .harness import Needle, build_prompt, rouge1_recall, select_needles
from .scoring import sample_events

SUCCESS_RECALL = 0.5


def run_sample(model, needle: Needle, length: int, depth: float, *, max_new_tokens: int = 50,
               row: str = "producing", lead: bool = True, seed: int = 0) -> dict:
    """One unmasked NIAH sample: response, ROUGE-1 recall and per-head events/|span|."""
    p = build_prompt(model, needle, length, depth, max_new_tokens=max_new_tokens, lead=lead, seed=seed)
    new, st = decode(model, p.ids, prefill(model, p.ids), max_new_tokens=max_new_tokens, span=(p.start, p.stop))
    ev = sample_events(st.argmax, st.query_pos, p.ids[0].tolist(), new, (p.start, p.stop), row=row)
    mass = st.mass("answer").double().mean(-1)  # mean attention mass on the span over recorded rows
    return _record(model, p, new) | {"events": ev.tolist(), "span_mass": mass.tolist(), "row": row}


def run_masked(model, needle: Needle, length: int, depth: float, conditions: dict[str, list[HeadId]], *,
               max_new_tokens: int = 50, lead: bool = True, seed: int = 0) -> dict:
    """One prompt, prefilled once, decoded with each condition's heads made uniform (decode only)."""
    p = build_prompt(model, needle, length, depth, max_new_tokens=max_new_tokens, lead=lead, seed=seed)
    past = prefill(model, p.ids)
    runs = {}
    for cond, heads in conditions.items():
        new, _ = decode(model, p.ids, past, max_new_tokens=max_new_tokens, heads=heads)
        runs[cond] = _record(model, p, new) | {"heads": [repr(h) for h in heads]}
    return {"weights_hash": model.weights_hash, "runs": runs}


def _record(model, p, new: list[int]) -> dict:
    response = model.tokenizer.decode(new, skip_special_tokens=True).strip()
    recall = rouge1_recall(p.needle.answer, response)
    return {"needle": p.needle.name, "length": p.length, "depth": p.depth, "prompt_len": int(p.ids.shape[1]),
            "span": [p.start, p.stop], "new_ids": list(new), "response": response, "recall": recall,
            "success": recall > SUCCESS_RECALL, "weights_hash": model.weights_hash}


def grid(needles, lengths, depths):
    return [(n, int(L), float(d)) for n in needles for L in lengths for d in depths]


def cell_name(prefix: str, needle: Needle, length: int, depth: float) -> str:
    return f"{prefix}_{needle.name}_L{length}_D{depth:g}.json"


def cached(path: Path | None, model, settings: dict, compute) -> dict:
    """Load a finished unit if it exists (same weights and settings), else compute it and write it atomically."""
    if path is not None and path.exists():
        rec = read_json(path, "retrieval sample")
        if rec.get("weights_hash") == model.weights_hash and rec.get("settings") == settings:
            return rec
    rec = compute() | {"settings": settings}
    if path is not None:
        write_json(path, rec)
    return rec


def scan_samples(model, cells, out: Path | None, *, desc="retrieval", progress=True, **kw) -> list[dict]:
    """Unmasked samples, one file per grid cell under ``out/samples`` (skipped when already there)."""
    recs, settings = [], {k: v for k, v in sorted(kw.items())}
    for n, L, d in tqdm(cells, desc=desc, disable=not progress):
        path = Path(out) / "samples" / cell_name("sample", n, L, d) if out else None
        recs.append(cached(path, model, settings, lambda: run_sample(model, n, L, d, **kw)))
    return recs


def pick_random(model, top: list[HeadId], k: int, seed: int, exclude: set[HeadId]) -> list[HeadId]:
    """``k`` heads drawn (seeded) from outside ``exclude`` (the top set)."""
    pool = [HeadId(l, h) for l in range(model.n_layers) for h in range(model.n_heads)
            if HeadId(l, h) not in exclude]
    if len(pool) < k:
        raise InputError(f"only {len(pool)} heads outside the top set; use a smaller k than {k}")
    return random.Random(seed).sample(pool, k)


def scan_masking(model, cells, conditions: dict[str, list[HeadId]], out: Path | None, *,
                 progress=True, **kw) -> list[dict]:
    """Masked runs per cell (one file per cell, recomputed if the head sets changed)."""
    want = {c: [repr(h) for h in hs] for c, hs in conditions.items()}
    settings = {k: v for k, v in sorted(kw.items())}
    recs = []
    for n, L, d in tqdm(cells, desc="masking", disable=not progress):
        path = Path(out) / "masking" / cell_name("mask", n, L, d) if out else None
        if path and path.exists():
            rec = read_json(path, "retrieval masking")
            same = rec.get("weights_hash") == model.weights_hash and rec.get("settings", settings) == settings
            if same and {c: r["heads"] for c, r in rec["runs"].items()} == want:
                recs += [r | {"condition": c} for c, r in rec["runs"].items()]
                continue
        rec = run_masked(model, n, L, d, conditions, **kw) | {"settings": settings}
        if path:
            write_json(path, rec)
        recs += [r | {"condition": c} for c, r in rec["runs"].items()]
    return recs


def as_needles(needles) -> list[Needle]:
    if needles and all(isinstance(n, Needle) for n in needles):
        return list(needles)
    return select_needles(list(needles) if needles else None)


def top_heads(scores: torch.Tensor, k: int) -> list[HeadId]:
    flat = scores.flatten().argsort(descending=True)[:k]
    H = scores.shape[1]
    return [HeadId(int(i) // H, int(i) % H) for i in flat]
