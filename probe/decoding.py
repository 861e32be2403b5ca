"""Greedy decoding with the KV cache, and the tokens that stop it: the one loop every analysis uses.

:func:`greedy` continues from the logits of the last position and a cache: take the argmax,
stop at a stop token or after ``max_new_tokens``, else feed the token and repeat. Statistics and
interventions apply to whatever the caller has active (``collect_stats``, ``intervene``): each
fed token is one decode row. :func:`stop_ids` lists the tokens that end an answer.

>>> import torch
>>> from probe import load_model
>>> from probe.compat import output_cache
>>> m = load_model("tiny-llama")
>>> ids = m.encode("abc")
>>> out = m.hf(ids, use_cache=True)
>>> new = greedy(m, out.logits[0, -1], output_cache(out), max_new_tokens=3, stop=set())
>>> ref = m.hf.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
>>> new == ref[0, 3:].tolist()
True
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .compat import output_cache, with_cache


def stop_ids(model, newline: bool = False) -> set[int]:
    """EOS and end-of-turn token ids; with ``newline`` also every token whose text holds a newline."""
    tok = model.tokenizer
    return set(_stop_ids(tok, newline))


@lru_cache(maxsize=8)
def _stop_ids(tok, newline: bool) -> frozenset[int]:
    """Memoised: a pure function of the tokenizer (``get_vocab`` alone costs tens of ms a call, once per sample)."""
    stop = {i for i in (tok.eos_token_id,) if i is not None}
    vocab = tok.get_vocab()
    for special in ("<|im_end|>", "<|endoftext|>"):
        if special in vocab:
            stop.add(vocab[special])
    return frozenset(stop | _newline_ids(tok) if newline else stop)


@lru_cache(maxsize=8)
def _newline_ids(tok) -> frozenset[int]:
    """Token ids whose text holds a newline (a pure function of the tokenizer, memoised: ~0.2 s a vocabulary)."""
    return frozenset(i for t, i in tok.get_vocab().items() if "\n" in tok.convert_tokens_to_string([t]))


@torch.no_grad()
def greedy(model, logits: torch.Tensor, past, *, max_new_tokens: int, stop: set[int]) -> list[int]:
    """New token ids, greedily from ``logits`` (``[vocab]``, the last position's) and the cache ``past``.

    The last new token is not fed back (nothing would read its row), so a run of ``n`` tokens costs
    ``n - 1`` forwards after the caller's own.
    """
    new: list[int] = []
    while len(new) < max_new_tokens:
        nxt = int(logits.argmax())
        if nxt in stop:
            break
        new.append(nxt)
        if len(new) == max_new_tokens:
            break
        out = model.hf(torch.tensor([[nxt]], device=logits.device), **with_cache(model.hf, past), use_cache=True)
        logits, past = out.logits[0, -1], output_cache(out)
    return new
