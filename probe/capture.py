"""Capture full attention patterns of a short input: through the TransformerLens bridge, or the engine.

Two sources give the same :class:`AttentionRecord`: the bridge's ``hook_pattern`` hooks (a
``TransformerBridge`` over a weight-sharing twin of the model), and the engine's own observer (a
:func:`probe.tap` ``on_probs`` observer on the model itself). The bridge does not know every
architecture; where it cannot boot a model, ``source="auto"`` captures through the observer and
``meta`` says so (``source``, and ``bridge_refused`` with the bridge's reason). Full patterns cost
``layers x heads x T x T``; the estimate is checked against a budget before anything runs, and
over-budget requests are pointed to the streaming statistics instead.
"""
from __future__ import annotations

import torch

from .errors import InputError, UnsupportedModelError
from .memory import DEFAULT_CAPTURE_BUDGET, capture_estimate, check_budget
from .records import AttentionRecord, run_metadata

SOURCES = ("auto", "bridge", "observer")


def capture(model, text: str | torch.Tensor, *, layers=None, heads=None, budget: int = DEFAULT_CAPTURE_BUDGET,
            source: str = "auto") -> AttentionRecord:
    """Full patterns ``[layer, head, T, T]`` (float32) for ``text`` (a string or ``[1, T]`` ids).

    ``source``: ``"bridge"`` (TransformerLens hooks), ``"observer"`` (the engine's ``on_probs``), or
    ``"auto"``: the bridge, or the observer where the bridge cannot boot the model.

    >>> from probe import load_model
    >>> rec = capture(load_model("tiny-llama"), "hey", layers=[1], heads=[0, 2])
    >>> tuple(rec.patterns.shape), rec.meta["source"]
    ((1, 2, 3, 3), 'bridge.hook_pattern')
    """
    if source not in SOURCES:
        raise InputError(f"unknown capture source {source!r}: use one of {SOURCES}")
    ids = model.encode(text) if isinstance(text, str) else _check_ids(model, text)
    layers = sorted({model.layout.check_layer(l) for l in (range(model.n_layers) if layers is None else layers)})
    heads = sorted({model.layout.check((0, h)).head for h in (range(model.n_heads) if heads is None else heads)})
    est = capture_estimate(len(layers), model.n_heads, ids.shape[1])
    check_budget(est, budget, "Use probe.stream_stats (per-head statistics without T x T memory), "
                              "fewer layers, a shorter text, or raise the budget.")
    meta = {}
    bridge = None
    if source != "observer":
        bridge, refused = _bridge(model)
        if bridge is None and source == "bridge":
            raise UnsupportedModelError(f"the TransformerLens bridge cannot boot {model.model_id}: {refused}. "
                                        "Use capture(..., source='observer') (the engine's own patterns)")
        meta = {"bridge_refused": refused} if refused else {}
    if bridge is not None:
        pats, meta["source"] = _from_bridge(bridge, ids, layers, heads), "bridge.hook_pattern"
    else:
        pats, meta["source"] = _from_observer(model, ids, layers, heads), "observer.on_probs"
    return AttentionRecord(model_id=model.model_id, token_ids=tuple(ids[0].tolist()), tokens=tuple(model.str_tokens(ids)),
                           layers=tuple(layers), heads=tuple(heads), patterns=pats,
                           meta=run_metadata(weights_hash=model.weights_hash, **meta))


def _bridge(model):
    """``(bridge, None)``, or ``(None, reason)`` when TransformerLens cannot boot this architecture."""
    try:
        return model.bridge, None
    except Exception as exc:  # the bridge refuses architectures it has no adapter for, in its own words
        return None, f"{type(model.hf).__name__}: {type(exc).__name__}: {exc}"


def _from_bridge(bridge, ids, layers, heads) -> torch.Tensor:
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0, heads] for l in layers]).float().cpu()


class _Patterns:
    """``on_probs`` observer copying the rows of ``heads`` into ``out [layer, head, T, T]`` (float32, host)."""

    def __init__(self, layers, heads, T: int):
        self.layers, self.heads, self.row = set(layers), list(heads), {l: i for i, l in enumerate(layers)}
        self.out = torch.zeros(len(layers), len(heads), T, T)
        self.seen = torch.zeros(len(layers), T, dtype=torch.bool)

    def on_probs(self, layer, q_pos, probs):  # probs [B, H, rows, K]; K = T without a cache
        i, rows = self.row[layer], q_pos.cpu()
        self.out[i, :, rows] = probs[0, self.heads].float().cpu()
        self.seen[i, rows] = True


def _from_observer(model, ids, layers, heads) -> torch.Tensor:
    from .runtime import tap

    obs = _Patterns(layers, heads, ids.shape[1])
    with torch.no_grad(), tap(model, obs):
        model.hf(ids, use_cache=False)
    if not bool(obs.seen.all()):
        raise UnsupportedModelError(f"{model.model_id}: the engine did not see every attention row of layers "
                                    f"{layers}; this model's attention does not route through headwise")
    return obs.out


def _check_ids(model, ids: torch.Tensor) -> torch.Tensor:
    from .errors import ContextLengthError, InputError

    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1 or ids.shape[1] == 0:
        raise InputError(f"expected token ids of shape [1, T] with T >= 1, got {tuple(ids.shape)}")
    if ids.shape[1] > model.n_ctx:
        raise ContextLengthError(f"{ids.shape[1]} tokens exceed {model.model_id}'s context of {model.n_ctx}")
    return ids.to(model.device)
