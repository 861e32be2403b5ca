"""Prefill once on the fused path, then greedy decoding through the streaming engine.

This is the reference's efficient design (nightdessert/Retrieval_Head, ``retrieval_head_detection.py``):
the prompt *minus its last token* is prefilled with SDPA (no attention patterns, only the last
logits), and the last prompt token is the first decode input. Every scored row, including the one
that produces the first new token, is then a single decode row whose per-head argmax comes from the
streaming statistics. Masking is decode-only, so every masking condition of a prompt decodes from a
copy of the one prefilled KV cache (one prefill per prompt, not one per condition). Method (which
row is scored, what masking does): docs/methods.md §1.
"""
from __future__ import annotations

import copy
from contextlib import ExitStack

import torch

from probe import InterventionSpec, KeyGroup, StatsRequest, Uniform, collect_stats, greedy, intervene, stop_ids
from probe.compat import output_cache, with_cache
from probe.records import run_metadata


def prefill(model, ids: torch.Tensor):
    """KV cache of ``ids[:, :-1]`` on the fast path (the registered attention is SDPA while idle)."""
    with torch.no_grad():
        out = model.hf(ids[:, :-1], use_cache=True, logits_to_keep=1)
    return output_cache(out)


def decode(model, ids: torch.Tensor, past, *, max_new_tokens: int = 50, span=None, heads=None):
    """Greedy decode from a prefilled cache; returns ``(new_ids, stats)``.

    ``span``: record statistics (argmax, mass on the span) on every decode row; ``heads``: make these
    heads uniform (query := 0) on decode rows. Decoding extends a copy of ``past``, so the prefilled cache
    is reused as is by every masking condition (cropping it back is impossible once a sliding-window
    layer has dropped keys: Mistral, Gemma2/3, gpt-oss).
    """
    past = copy.deepcopy(past)
    with ExitStack() as stack, torch.no_grad():
        coll = None
        if span is not None:
            req = StatsRequest(groups=(KeyGroup("answer", span[0], span[1]),), received=False)
            coll = stack.enter_context(collect_stats(model, req))
        if heads:
            stack.enter_context(intervene(model, InterventionSpec([Uniform(heads=list(heads), phase="decode")])))
        out = model.hf(ids[:, -1:], **with_cache(model.hf, past), use_cache=True)
        new = greedy(model, out.logits[0, -1], output_cache(out), max_new_tokens=max_new_tokens,
                     stop=stop_ids(model, newline=True))
    stats = coll.result(ids[0].tolist() + new, run_metadata(weights_hash=model.weights_hash)) if coll else None
    return new, stats
