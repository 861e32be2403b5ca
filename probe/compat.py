"""Differences between transformers releases, detected from the installed library (never from version strings).

transformers 5 renamed the model argument ``past_key_values`` to ``cache`` (the old name is deprecated
and removed in 5.40), and model outputs carry the cache under the new name. Every decode loop in
headwise passes and reads the cache through these two functions, so it works on either side.

>>> from probe.models.tiny import tiny_llama
>>> cache_arg(tiny_llama()) in ("cache", "past_key_values")
True
"""
from __future__ import annotations

import inspect
from functools import lru_cache

from .errors import UnsupportedModelError


@lru_cache(maxsize=None)
def _cache_arg(cls) -> str:
    params = inspect.signature(cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise UnsupportedModelError(f"{cls.__name__}.forward takes neither 'cache' nor 'past_key_values': headwise "
                                "cannot decode with a KV cache on it")


def cache_arg(hf) -> str:
    """The keyword the model's ``forward`` takes its KV cache as (``"cache"`` or ``"past_key_values"``)."""
    return _cache_arg(type(hf))


def with_cache(hf, cache) -> dict:
    """Keyword arguments handing ``cache`` to ``hf``'s forward: ``hf(ids, **with_cache(hf, past), use_cache=True)``."""
    return {cache_arg(hf): cache}


def output_cache(out):
    """The KV cache a model output carries, under whichever name this transformers uses."""
    for name in ("cache", "past_key_values"):
        if name in out.keys():
            return out[name]
    return None


@lru_cache(maxsize=None)
def _keeps_logits(cls) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def last_logits_only(hf) -> dict:
    """``{"logits_to_keep": 1}`` where the model's ``forward`` takes it (full logits cost ``T x vocab`` floats)."""
    return {"logits_to_keep": 1} if _keeps_logits(type(hf)) else {}
