"""Family-agnostic access to a causal LM's parts: one small declarative mapping per family.

Hugging Face families name the same parts differently (``model.layers`` / ``transformer.h``,
``self_attn`` / ``attn`` / ``attention``, ``norm`` / ``ln_f`` / ``final_layer_norm``) and some add a
step on the way to the logits (Gemma2/3's final logit softcap, Cohere2's logit scale, Granite's logit
divisor, OPT's output projection). A :class:`Family` says how, in a few fields (pyvene's idea); nothing
else in headwise names those modules. Where HF's own accessors are reliable they are used:
``get_decoder()`` (the module that owns the blocks), ``get_input_embeddings()`` (what ``inputs_embeds``
replaces, Gemma's embedding scale included) and ``get_output_embeddings()`` (the unembedding). An
architecture the mapping does not know is refused with :class:`~probe.errors.UnsupportedModelError`.

**Run from layer l.** :func:`record` runs one reference forward and keeps, for every block from
``start`` on, exactly what the decoder passed to it (the residual stream, position embeddings, the
per-layer mask, every kwarg), caught by forward pre-hooks. :meth:`Resume.run` then reruns blocks
``l..L-1``, the final norm and the unembedding as the model's own forward does, on the recorded
input of block ``l`` or on a replacement: the same logits without rerunning layers ``< l`` and without
touching the shared model (no module is swapped). The hooks exist only during the reference forward,
are removed in ``finally`` and act only for the calling context (a ``ContextVar``): a forward running
at the same time in another thread passes through them untouched.

>>> import torch
>>> from probe import load_model
>>> m = load_model("tiny-gpt2")
>>> family(m).name, len(blocks(m)), type(attention(m, 0)).__name__
('gpt2', 2, 'GPT2Attention')
>>> ids = m.encode("hello")
>>> r = record(m, ids, start=1)
>>> torch.equal(r.run(1), m.hf(ids).logits)   # layer 0 is not rerun
True
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from .errors import InputError, UnsupportedModelError

LOGIT_STEPS = ("softcap", "scale", "divide")


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts (attribute names) and what it does after the unembedding."""

    name: str                            # HF ``config.model_type``
    blocks: str = "layers"               # ModuleList of decoder blocks, on ``get_decoder()``
    attention: str = "self_attn"         # the attention module, on each block
    attention_out: str = "o_proj"        # its output projection: input = head outputs, heads concatenated
    # on the attention module: the modules whose outputs are the queries, keys and values of every head
    # (heads concatenated, before RoPE, nothing mixing heads after them); None where q/k/v are one fused matrix
    head_inputs: tuple[str, str, str] | None = ("q_proj", "k_proj", "v_proj")
    final_norm: str | None = "norm"      # on the decoder, after the last block (absent when None or unset)
    project_out: str | None = None       # on the decoder, after the final norm (OPT with word_embed_proj_dim)
    logit_steps: tuple[tuple[str, str], ...] = ()  # after the unembedding: (step, config field), in order

    def __post_init__(self):
        bad = [s for s, _ in self.logit_steps if s not in LOGIT_STEPS]
        if bad:
            raise InputError(f"unknown logit step(s) {bad}: use {LOGIT_STEPS}")


_SOFTCAP = (("softcap", "final_logit_softcapping"),)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama"), Family("mistral"), Family("qwen2"), Family("qwen3"), Family("stablelm"), Family("gpt_oss"),
    Family("helium"),
    Family("phi3", head_inputs=None),                                       # fused qkv_proj
    Family("olmo2", head_inputs=("q_norm", "k_norm", "v_proj")),  # its q/k norms span all heads: after them
    Family("gemma2", logit_steps=_SOFTCAP),
    Family("gemma3_text", logit_steps=_SOFTCAP),
    Family("granite", logit_steps=(("divide", "logits_scaling"),)),
    Family("cohere2", logit_steps=(("scale", "logit_scale"),)),
    Family("gpt2", blocks="h", attention="attn", attention_out="c_proj", final_norm="ln_f", head_inputs=None),
    Family("gpt_neox", attention="attention", attention_out="dense", final_norm="final_layer_norm", head_inputs=None),
    Family("opt", attention_out="out_proj", final_norm="final_layer_norm", project_out="project_out"),
)}  # what each one's test model exercises: the README's table of supported families

REFUSED: dict[str, str] = {
    "falcon": "its attention does not go through transformers' AttentionInterface",
    "bloom": "its attention (ALiBi) does not go through transformers' AttentionInterface",
    "mpt": "its attention does not go through transformers' AttentionInterface",
}


def _hf(model) -> torch.nn.Module:
    return getattr(model, "hf", model)


def family(model) -> Family:
    """The :class:`Family` of a headwise ``Model`` or a Hugging Face model; refuses unknown architectures."""
    hf = _hf(model)
    kind = getattr(getattr(hf, "config", None), "model_type", None)
    if kind in FAMILIES:
        return FAMILIES[kind]
    name = type(hf).__name__
    why = REFUSED.get(kind, "probe/families.py has no mapping for it")
    raise UnsupportedModelError(
        f"{name} (model_type {kind!r}) is not supported: {why}. Supported families: {', '.join(sorted(FAMILIES))}. "
        "To add a family, give it a Family entry in probe/families.py and run tests/test_family_access.py on it")


def decoder(model) -> torch.nn.Module:
    """The module that owns the blocks and the final norm (HF ``get_decoder()``)."""
    hf, fam = _hf(model), family(model)
    dec = hf.get_decoder()
    if not isinstance(getattr(dec, fam.blocks, None), torch.nn.ModuleList):
        raise UnsupportedModelError(f"{type(hf).__name__}.get_decoder() returned {type(dec).__name__}, which has no "
                                    f"block list {fam.blocks!r}: this {fam.name} variant is not supported")
    return dec


def blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks, in order."""
    return getattr(decoder(model), family(model).blocks)


def block(model, layer: int) -> torch.nn.Module:
    return blocks(model)[_layer(model, layer)]


def attention(model, layer: int) -> torch.nn.Module:
    """The attention module of block ``layer``."""
    return getattr(block(model, layer), family(model).attention)


def attention_out(model, layer: int) -> torch.nn.Module:
    """The output projection of block ``layer``'s attention; its input is ``[B, T, heads * d_head]``."""
    return getattr(attention(model, layer), family(model).attention_out)


def head_input(model, layer: int, channel: str) -> torch.nn.Module:
    """The module of block ``layer`` whose output is every head's ``channel`` (``"q"``, ``"k"`` or ``"v"``):
    ``[B, T, heads * d_head]`` (KV heads for k/v), before RoPE. Refused where the family fuses q/k/v."""
    fam = family(model)
    if channel not in ("q", "k", "v"):
        raise InputError(f"channel must be 'q', 'k' or 'v', not {channel!r}")
    if fam.head_inputs is None:
        raise UnsupportedModelError(f"{type(_hf(model)).__name__} ({fam.name}) computes queries, keys and values in "
                                    "one fused projection: its heads' q/k/v cannot be read or replaced one by one")
    return getattr(attention(model, layer), fam.head_inputs["qkv".index(channel)])


def final_norm(model) -> torch.nn.Module | None:
    """The norm after the last block (``None`` for the few variants without one, e.g. OPT-350m)."""
    name = family(model).final_norm
    return getattr(decoder(model), name, None) if name else None


def embedding(model) -> torch.nn.Module:
    """Token embeddings: what ``hf(inputs_embeds=...)`` replaces (HF ``get_input_embeddings()``)."""
    return _hf(model).get_input_embeddings()


def unembedding(model) -> torch.nn.Module:
    """The unembedding (``lm_head`` or its equivalent; HF ``get_output_embeddings()``)."""
    out = _hf(model).get_output_embeddings()
    if out is None:
        raise UnsupportedModelError(f"{type(_hf(model)).__name__} has no output embeddings: load it as a causal LM")
    return out


def logits(model, hidden: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """The model's own way from the last block's output ``[B, T, D]`` to logits ``[B, keep or T, V]``.

    Final norm, the family's output projection, the unembedding, then its logit steps (softcap,
    scale, divide), in the order its modeling file applies them. ``keep`` as HF's ``logits_to_keep``.
    """
    hf, fam, dec = _hf(model), family(model), decoder(model)
    norm = final_norm(model)
    if norm is not None:
        hidden = norm(hidden)
    proj = getattr(dec, fam.project_out, None) if fam.project_out else None
    if proj is not None:
        hidden = proj(hidden)
    hidden = hidden[:, slice(-keep, None) if isinstance(keep, int) else keep, :]
    out = unembedding(model)(hidden)
    for step, name in fam.logit_steps:
        value = getattr(hf.config, name, None)
        if value is None:
            continue
        if step == "softcap":
            out = torch.tanh(out / value) * value
        elif step == "scale":
            out = out * value
        else:
            out = out / value
    return out


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream a block receives (its first argument, or ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(out) -> torch.Tensor:
    """The residual stream a block returns (a tensor, or the first item of a tuple in older families)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _layer(model, layer: int) -> int:
    n = len(getattr(decoder(model), family(model).blocks))
    if not 0 <= int(layer) < n:
        from .errors import HeadOutOfRangeError

        raise HeadOutOfRangeError(f"layer {layer} is out of range: this model has layers 0..{n - 1}")
    return int(layer)


# ----------------------------------------------------------------------------- run from layer l

def _is_cache(value) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


_RECORDING: ContextVar[object | None] = ContextVar("headwise_recording", default=None)


@dataclass(frozen=True, eq=False)
class Resume:
    """What one reference forward passed to blocks ``start..L-1``; :meth:`run` reruns them from any layer.

    ``calls[l - start]``: block ``l``'s positional arguments and kwargs (masks, position embeddings, ...;
    the hidden state in them is replaced on a rerun); ``inputs[l]``: the residual stream entering block
    ``l`` ``[B, T, D]`` (detached); ``logits``: the reference forward's logits.
    """

    hf: torch.nn.Module = field(repr=False)
    start: int
    calls: tuple = field(repr=False)
    inputs: dict = field(repr=False)
    logits: torch.Tensor | None = field(default=None, repr=False)

    def hidden(self, layer: int, hidden: torch.Tensor | None = None, stop: int | None = None) -> torch.Tensor:
        """The residual stream after blocks ``layer..stop-1`` (default: to the last block)."""
        n = self.start + len(self.calls)
        stop = n if stop is None else stop
        if not self.start <= layer <= stop <= n:
            raise InputError(f"recorded blocks {self.start}..{n - 1}: cannot run blocks {layer}..{stop - 1}; "
                             f"record with start <= {layer}")
        h = self.inputs.get(layer) if hidden is None else hidden
        if h is None:
            raise InputError(f"no recorded input for layer {layer} (recorded: {sorted(self.inputs)}): pass hidden=")
        mods = blocks(self.hf)
        for l in range(layer, stop):
            args, kwargs = self.calls[l - self.start]
            if args:
                h = layer_output(mods[l](h, *args[1:], **kwargs))
            else:
                h = layer_output(mods[l](**{**kwargs, "hidden_states": h}))
        return h

    def run(self, layer: int, hidden: torch.Tensor | None = None, *, keep: int = 0) -> torch.Tensor:
        """Logits after rerunning blocks ``layer..L-1`` on ``hidden`` (default: block ``layer``'s recorded input),
        on the model's input device (a split model's unembedding may sit on another one)."""
        from .models.placement import input_device

        return logits(self.hf, self.hidden(layer, hidden), keep).to(input_device(self.hf))


def record(model, input_ids: torch.Tensor | None = None, *, start: int = 0, layers=None, **forward) -> Resume:
    """Run ``hf(input_ids, use_cache=False, **forward)`` once and keep what blocks ``start..`` received.

    ``layers``: the layers whose input is kept (default all from ``start``); ``forward``: any other
    argument of the model's forward (``attention_mask``, ``position_ids``, ``inputs_embeds``,
    ``logits_to_keep``). Without a cache the blocks see exactly what they would in a full forward.

    >>> import torch
    >>> from probe import load_model
    >>> m = load_model("tiny-llama")
    >>> ids = m.encode("abc")
    >>> r = record(m, ids, start=1)
    >>> torch.equal(r.run(1, r.inputs[1]), r.logits)
    True
    """
    hf = _hf(model)
    mods = blocks(hf)
    start = _layer(hf, start)
    keep = set(range(start, len(mods)) if layers is None else (_layer(hf, l) for l in layers))
    if min(keep, default=start) < start:
        raise InputError(f"layers {sorted(keep)} start before start={start}")
    if any(_is_cache(v) for v in forward.values()):
        raise InputError("record() runs without a KV cache (a rerun would extend it): drop the cache argument")
    calls: dict[int, tuple] = {}
    inputs: dict[int, torch.Tensor] = {}
    token = object()

    def grab(layer):
        def hook(module, args, kwargs):
            if _RECORDING.get() is not token:   # another context's forward: not ours to record
                return None
            # the hidden state itself is not kept here (only for ``keep`` layers, below)
            calls[layer] = ((None, *args[1:]) if args else (), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if layer in keep:
                inputs[layer] = layer_input(args, kwargs).detach()
            return None
        return hook

    reset = _RECORDING.set(token)
    handles = []
    try:
        handles = [mods[l].register_forward_pre_hook(grab(l), with_kwargs=True) for l in range(start, len(mods))]
        out = hf(input_ids=input_ids, use_cache=False, **forward)
    finally:
        for h in handles:
            h.remove()
        _RECORDING.reset(reset)
    missing = [l for l in range(start, len(mods)) if l not in calls]
    if any(_is_cache(v) for _, kwargs in calls.values() for v in kwargs.values()):
        raise InputError("record() runs without a KV cache (a rerun would extend it): drop the cache argument")
    if missing:
        raise UnsupportedModelError(f"{type(hf).__name__}'s forward did not call blocks {missing}: "
                                    "its decoder loop is not the one probe/families.py expects")
    return Resume(hf, start, tuple(calls[l] for l in range(start, len(mods))), inputs, getattr(out, "logits", None))
