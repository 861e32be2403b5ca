"""Run the NIAH grid: per-sample retrieval events, head scores, and the masking experiment.

Each finished grid cell is one JSON file under ``out/samples`` (``out/masking`` for masked runs),
written atomically and skipped on rerun, so an interrupted scan resumes where it stopped.
Prefill runs on the fast path (no patterns); only the last prefill row and the decode rows go
through the streaming statistics (``generate_with_stats(stats_in_prefill="last")``).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from probe import HeadId, InterventionSpec, KeyGroup, generate_with_stats
from probe.atomic import read_json, write_json
from probe.errors import InputError
from probe.interventions import Uniform

from .harness import Needle, build_prompt, rouge1_recall, select_needles
from .scoring import sample_events

SUCCESS_RECALL = 0.5


def run_sample(model, needle: Needle, length: int, depth: float, *, max_new_tokens: int = 50,
               row: str = "producing", lead: bool = True, seed: int = 0) -> dict:
    """One unmasked NIAH sample: response, ROUGE-1 recall and per-head events/|span|."""
    p = build_prompt(model, needle, length, depth, max_new_tokens=max_new_tokens, lead=lead, seed=seed)
    gen = generate_with_stats(model, p.ids, max_new_tokens=max_new_tokens, stats_in_prefill="last",
                              groups=[KeyGroup("answer", p.start, p.stop)], stop_at_newline=True)
    new = gen.new_ids[0].tolist()
    st = gen.stats
    ev = sample_events(st.argmax, st.query_pos, p.ids[0].tolist(), new, (p.start, p.stop), row=row)
    mass = st.mass("answer").double().mean(-1)  # mean attention mass on the span over recorded rows
    return _record(model, p, new) | {"events": ev.tolist(), "span_mass": mass.tolist(), "row": row}


def run_masked(model, needle: Needle, length: int, depth: float, heads: list[HeadId], *,
               max_new_tokens: int = 50, lead: bool = True, seed: int = 0) -> dict:
    """One NIAH sample with ``heads`` made uniform (query := 0) during decoding only."""
    p = build_prompt(model, needle, length, depth, max_new_tokens=max_new_tokens, lead=lead, seed=seed)
    spec = InterventionSpec([Uniform(heads=heads, phase="decode")]) if heads else None
    gen = generate_with_stats(model, p.ids, max_new_tokens=max_new_tokens, decode_spec=spec,
                              stop_at_newline=True, layers=[0])
    return _record(model, p, gen.new_ids[0].tolist()) | {"heads": [repr(h) for h in heads]}


def _record(model, p, new: list[int]) -> dict:
    response = model.tokenizer.decode(new, skip_special_tokens=True).strip()
    recall = rouge1_recall(p.needle.answer, response)
    return {"needle": p.needle.name, "length": p.length, "depth": p.depth, "prompt_len": int(p.ids.shape[1]),
            "span": [p.start, p.stop], "response": response, "recall": recall,
            "success": recall > SUCCESS_RECALL, "weights_hash": model.weights_hash}


def grid(needles, lengths, depths):
    return [(n, int(L), float(d)) for n in needles for L in lengths for d in depths]


def cell_name(prefix: str, needle: Needle, length: int, depth: float) -> str:
    return f"{prefix}_{needle.name}_L{length}_D{depth:g}.json"


def cached(path: Path, model, compute) -> dict:
    """Load a finished unit if it exists (same weights), else compute and write it atomically."""
    if path.exists():
        rec = read_json(path, "retrieval sample")
        if rec.get("weights_hash") == model.weights_hash:
            return rec
    rec = compute()
    if path.parent != Path("."):
        write_json(path, rec)
    return rec


def scan_samples(model, cells, out: Path | None, *, desc="retrieval", progress=True, **kw) -> list[dict]:
    recs = []
    for n, L, d in tqdm(cells, desc=desc, disable=not progress):
        path = Path(out) / "samples" / cell_name("sample", n, L, d) if out else Path(cell_name("x", n, L, d))
        recs.append(cached(path, model, lambda: run_sample(model, n, L, d, **kw)))
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
    recs = []
    units = [(c, cell) for c in conditions for cell in cells]
    for cond, (n, L, d) in tqdm(units, desc="masking", disable=not progress):
        path = Path(out) / "masking" / cell_name(cond, n, L, d) if out else Path(cell_name("x", n, L, d))
        rec = cached(path, model, lambda: run_masked(model, n, L, d, conditions[cond], **kw))
        recs.append(rec | {"condition": cond})
    return recs


def as_needles(needles) -> list[Needle]:
    if needles and all(isinstance(n, Needle) for n in needles):
        return list(needles)
    return select_needles(list(needles) if needles else None)


def top_heads(scores: torch.Tensor, k: int) -> list[HeadId]:
    flat = scores.flatten().argsort(descending=True)[:k]
    H = scores.shape[1]
    return [HeadId(int(i) // H, int(i) % H) for i in flat]
