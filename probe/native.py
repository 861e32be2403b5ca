"""The model's own attention, recorded at install, and the check that every layer really routes through headwise.

:func:`probe.runtime.install` records the attention implementation a model had (``"sdpa"``,
``"eager"``, ``"flex_attention"``...) and switches it to ``"headwise_<impl>"``, registered here with
transformers' ``AttentionInterface`` (headwise's function) and ``AttentionMaskInterface`` (the
original's mask function, so the model builds exactly the masks it built before). While nothing is
active, headwise's function calls :func:`native_function` with every argument: a wrapped model
computes bit for bit what it computed unwrapped. ``"eager"`` means each family's own
``eager_attention_forward`` (found from the attention module's class module), as transformers resolves it.

:func:`verify` then runs a few tokens through the model: every layer must call headwise exactly once
with the configured head counts (a model that computes attention itself, like Falcon, Bloom or MPT,
is refused), and the eager engine must reproduce each layer's own output (when it cannot, the engine,
not the model, is refused: plain forwards stay exact, statistics and edits raise).
"""
from __future__ import annotations

import sys
from collections import Counter
from functools import partial
from typing import Callable

import torch

from .errors import UnsupportedModelError
from .models.placement import input_device

PREFIX = "headwise_"
ENGINE_NATIVES = ("sdpa", "eager")  # implementations whose masks the eager engine reads
CHECK_TOKENS = 8
# config flags under which a family computes attention outside AttentionInterface for one implementation
OUTSIDE_INTERFACE = {("eager", "reorder_and_upcast_attn"): "GPT-2's upcast-and-reorder attention (eager only)"}


def name_for(native: str) -> str:
    return PREFIX + native


def native_of(impl: str | None) -> str:
    """The original implementation behind ``impl`` (a copied headwise config keeps its original)."""
    impl = impl or "sdpa"
    return impl[len(PREFIX):] if impl.startswith(PREFIX) else impl


def native_function(module, native: str) -> Callable:
    """The function the unwrapped model calls for ``native`` in ``module`` (transformers' own resolution)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if native != "eager" and native in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[native]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no eager_attention_forward in its modeling file "
                                    f"and {native!r} is not a registered attention function")
    return fn


def register(native: str, attention: Callable) -> str:
    """Register ``headwise_<native>`` (headwise's function, the native mask function); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = name_for(native)
    AttentionInterface.register(name, partial(attention, _headwise_native=native))
    if native in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:  # else the model builds no mask, as before
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[native])
    return name


def guard(hf, native: str) -> None:
    """Refuse configurations in which the family bypasses AttentionInterface for this implementation."""
    for (impl, flag), what in OUTSIDE_INTERFACE.items():
        if impl == native and getattr(hf.config, flag, False):
            raise UnsupportedModelError(f"{type(hf).__name__} with {flag}=True computes attention outside "
                                        f"AttentionInterface under {native!r} ({what}): load it with "
                                        "attn_implementation='sdpa'")


class _Check:
    """Observer used once by :func:`verify`: counts calls per layer and compares the engine with the native output."""

    layers = None

    def __init__(self, rt, tol: float):
        self.rt, self.tol = rt, tol
        self.calls: Counter = Counter()
        self.problems: list[str] = []
        self.refusal: str | None = None
        self.worst = 0.0

    def on_call(self, module, query, key, value, mask, kwargs, out) -> None:
        from . import eager
        from .call import parse_call

        layer, name, lay = getattr(module, "layer_idx", None), type(module).__name__, self.rt.layout
        self.calls[layer] += 1
        if (query.shape[1], key.shape[1]) != (lay.n_heads, lay.n_kv_heads):
            self.problems.append(f"layer {layer} has {query.shape[1]} query and {key.shape[1]} key/value heads, the "
                                 f"config {lay.n_heads} and {lay.n_kv_heads}")
        if self.refusal is not None:
            return
        if self.rt.native not in ENGINE_NATIVES:
            self.refusal = (f"{name} runs {self.rt.native!r} attention, whose masks headwise's engine does not read: "
                            "load the model with attn_implementation='sdpa' or 'eager' for statistics and edits")
            return
        try:
            mine = eager.attend(query, key, value, call=parse_call(module, query, key, mask, kwargs))
        except UnsupportedModelError as exc:
            self.refusal = str(exc)
            return
        err = float((mine.float() - out.float()).abs().max() / out.float().abs().max().clamp(min=1e-6))
        self.worst = max(self.worst, err)
        if not err <= self.tol:
            self.refusal = (f"headwise's engine does not reproduce {name}'s attention in layer {layer} (largest "
                            f"relative difference {err:.2g}): the family computes something its attention "
                            "arguments do not describe, so statistics and edits on it are refused")


def verify(hf, rt, watch: Callable) -> str | None:
    """Run :data:`CHECK_TOKENS` tokens through ``hf`` (installed) with the check active (``watch(check)``, a
    context manager): raise if a layer bypasses headwise; return why the eager engine cannot reproduce the
    model, or None (see the module docstring)."""
    half = next(hf.parameters()).dtype in (torch.float16, torch.bfloat16)
    check = _Check(rt, 5e-2 if half else 1e-4)
    vocab = int(getattr(hf.config, "vocab_size", 0) or 0) or 2
    ids = ((torch.arange(1, CHECK_TOKENS + 1) * 31) % vocab)[None].to(input_device(hf))
    was = hf.training
    try:
        hf.eval()
        with torch.no_grad(), watch(check):
            hf(input_ids=ids, use_cache=False)
    finally:
        hf.train(was)
    model, L = type(hf).__name__, rt.layout.n_layers
    missing = [l for l in range(L) if check.calls[l] == 0]
    if missing:
        raise UnsupportedModelError(
            f"{model} computes attention without AttentionInterface (no call reached headwise from layers "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}): headwise would see and edit nothing there. "
            "Use a family whose modeling code calls ALL_ATTENTION_FUNCTIONS (the README lists them)")
    odd = sorted(str(l) for l, n in check.calls.items() if n != 1 or not (isinstance(l, int) and 0 <= l < L))
    if odd or check.problems:
        why = "; ".join(check.problems) or "layers called twice or unknown: " + ", ".join(odd)
        raise UnsupportedModelError(f"{model}'s attention calls do not map one to one onto its {L} layers ({why}): "
                                    "headwise addresses heads as (layer, head) and cannot address this model")
    return check.refusal
