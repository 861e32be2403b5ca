"""Benchmark: our retrieval scan vs the reference approach on the same small NIAH grid; prints JSON.

Reference approach (as nightdessert/Retrieval_Head scores): Hugging Face ``generate`` with eager
attention and ``output_attentions=True`` at every step; for each step, layer and head, the last row
of the returned attention is ``topk(1)``-ed and an event counted when the key is in the answer span and
its prompt token equals the emitted token (``+= 1/|span|``; every emitted token is scored, the stop
token included, as the authors' loop does). Ours: fused prefill, decode rows through the streaming
statistics (:func:`analyses.retrieval.run.run_sample`). Both greedy, same prompts, same stop tokens.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/retrieval_scan.py [--lengths 500,1000,2000] [--repeats 3]
    PYTHONPATH=$PWD python bench/retrieval_scan.py --quick     # tiny model, one cell: a smoke run

Per cell the two run alternately (``--repeats``, medians of wall and of process CPU time; on a shared
machine the CPU-time ratio, ``speedup_cpu``, is the steadier figure); ``ours_phases`` splits one of
our runs into prompt building, prefill and decode, the profile that says where the time goes.
``prefill_bound_cpu`` is the reference's CPU time over our prefill's alone: the speedup the scan
would reach if decoding with statistics cost nothing (every cell must prefill its whole prompt once).

The reference holds every returned pattern (layers x heads x T x T floats for the prefill step), so
its cost and memory grow with T^2 (about 17 GB at T=4096 for SmolLM2); ours holds none. The prefill
(equal work for both apart from attention) dominates at short T, so the speedup grows with T: measured
on 1 thread, about 1.3x at 500 tokens, 2x at 1000, 2.5-3.6x at 2000, 4x at 3000.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from probe import stop_ids
from analyses.retrieval.decode import prefill
from analyses.retrieval.harness import build_prompt, select_needles
from analyses.retrieval.run import run_sample
from probe import install, load_model


def reference_scores(model, p, max_new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Per-head events/|span| from ``generate(output_attentions=True)`` with eager attention."""
    hf, (s, e) = model.hf, (p.start, p.stop)
    prompt = p.ids[0]
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf.generate(p.ids, attention_mask=torch.ones_like(p.ids), max_new_tokens=max_new_tokens,
                              do_sample=False, output_attentions=True, return_dict_in_generate=True,
                              eos_token_id=sorted(stop_ids(model, newline=True)), pad_token_id=model.tokenizer.eos_token_id)
    finally:
        install(hf)
    new = out.sequences[0, p.ids.shape[1]:].tolist()
    score = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for step, w in enumerate(new):
        for layer in range(model.n_layers):
            rows = out.attentions[step][layer][0, :, -1]  # [heads, keys]
            for head in range(model.n_heads):
                _, idx = rows[head].topk(1)
                i = int(idx[0])
                if s <= i < e and w == int(prompt[i]):
                    score[layer, head] += 1 / (e - s)
    eos = stop_ids(model, newline=True)
    return score, [w for w in new if w not in eos]


def ours_phases(model, needle, length: int, depth: float, max_new_tokens: int) -> dict:
    """Where our time goes on one cell: prompt building, the SDPA prefill, the decode steps with statistics."""
    from analyses.retrieval.decode import decode

    t0 = time.perf_counter()
    p = build_prompt(model, needle, length, depth, max_new_tokens=max_new_tokens)
    t1 = time.perf_counter()
    past = prefill(model, p.ids)
    t2 = time.perf_counter()
    new, _ = decode(model, p.ids, past, max_new_tokens=max_new_tokens, span=(p.start, p.stop))
    t3 = time.perf_counter()
    return {"build_s": round(t1 - t0, 3), "prefill_s": round(t2 - t1, 3), "decode_s": round(t3 - t2, 3),
            "new_tokens": len(new), "decode_per_token_s": round((t3 - t2) / max(len(new), 1), 3)}


def cell(model, n, L: int, d: float, max_new_tokens: int, repeats: int) -> dict:
    """One grid cell: ours and the reference alternately ``repeats`` times (medians), scores compared."""
    t_ours, t_ref, c_ours, c_ref, c_prefill = [], [], [], [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        rec = run_sample(model, n, L, d, max_new_tokens=max_new_tokens)
        t1, c1 = time.perf_counter(), time.process_time()
        p = build_prompt(model, n, L, d, max_new_tokens=max_new_tokens)
        ref, ref_new = reference_scores(model, p, max_new_tokens)
        t2, c2 = time.perf_counter(), time.process_time()
        prefill(model, p.ids)
        c_prefill.append(time.process_time() - c2)
        t_ours.append(t1 - t0)
        t_ref.append(t2 - t1)
        c_ours.append(c1 - c0)
        c_ref.append(c2 - c1)
    ours = torch.tensor(rec["events"], dtype=torch.float64)
    o, r = statistics.median(t_ours), statistics.median(t_ref)
    co, cr, cp = statistics.median(c_ours), statistics.median(c_ref), statistics.median(c_prefill)
    return {"needle": n.name, "length": L, "depth": d, "prompt_len": rec["prompt_len"], "response": rec["response"],
            "same_tokens": ref_new == list(rec["new_ids"]),
            "ours_s": round(o, 3), "reference_s": round(r, 3), "speedup": round(r / o, 2),
            "ours_cpu_s": round(co, 3), "reference_cpu_s": round(cr, 3), "speedup_cpu": round(cr / co, 2),
            "prefill_cpu_s": round(cp, 3), "prefill_bound_cpu": round(cr / cp, 2),
            "max_abs_diff": float((ours - ref).abs().max()),
            "ours_phases": ours_phases(model, n, L, d, max_new_tokens)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="500,1000,2000")
    ap.add_argument("--depths", default="25,75")
    ap.add_argument("--needles", default="cat")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny model, one 200-token cell, one repeat (a smoke run)")
    a = ap.parse_args(argv)
    if a.quick:
        a.model, a.lengths, a.depths, a.needles, a.max_new_tokens, a.repeats = "tiny-llama", "200", "50", "code", 3, 1
    torch.manual_seed(0)
    model = load_model(a.model)
    needles = select_needles(a.needles.split(","))
    stop_ids(model, newline=True)  # warm the stop-token cache (shared by both)
    run_sample(model, needles[0], min(200, int(a.lengths.split(",")[0])), 50, max_new_tokens=2)  # warm-up
    rows = [cell(model, n, int(L), float(d), a.max_new_tokens, a.repeats)
            for n in needles for L in a.lengths.split(",") for d in a.depths.split(",")]
    by_length, cpu_by_length = {}, {}
    for r in rows:
        o, ref = by_length.setdefault(r["length"], [0.0, 0.0])
        by_length[r["length"]] = [o + r["ours_s"], ref + r["reference_s"]]
        o, ref, pre = cpu_by_length.setdefault(r["length"], [0.0, 0.0, 0.0])
        cpu_by_length[r["length"]] = [o + r["ours_cpu_s"], ref + r["reference_cpu_s"], pre + r["prefill_cpu_s"]]
    ours_t, ref_t = sum(r["ours_s"] for r in rows), sum(r["reference_s"] for r in rows)
    print(json.dumps({"bench": "retrieval_scan", "model": model.model_id,
                      "grid": {"lengths": a.lengths, "depths": a.depths, "needles": a.needles},
                      "threads": torch.get_num_threads(), "repeats": a.repeats, "target_speedup": 3.0,
                      "ours_s": round(ours_t, 3), "reference_s": round(ref_t, 3), "speedup": round(ref_t / ours_t, 2),
                      "speedup_by_length": {L: round(v[1] / v[0], 2) for L, v in by_length.items()},
                      "speedup_cpu_by_length": {L: round(v[1] / v[0], 2) for L, v in cpu_by_length.items()},
                      "prefill_bound_cpu_by_length": {L: round(v[1] / v[2], 2) for L, v in cpu_by_length.items()},
                      "max_abs_diff": max(r["max_abs_diff"] for r in rows), "samples": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
