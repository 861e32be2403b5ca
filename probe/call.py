"""One attention call, parsed: every argument transformers passes is read here, in one place.

Hugging Face attention functions are called as ``f(module, query, key, value, attention_mask, **kwargs)``.
:func:`parse_call` turns that into an :class:`AttentionCall`, the only description of the call that
the eager engine, the fused kernels and the statistics read:

====================  ======================================================================================
argument              meaning
====================  ======================================================================================
``scaling``           scores are ``scaling * q.k`` (None: ``d_head ** -0.5``, as the eager functions do)
``attention_mask``    the truth about which keys each query sees: bool, or additive float (finite non-zero
                      values are a score bias). None means what SDPA does without a mask: causal, aligned
                      lower-right for one query row, upper-left otherwise (keys past the queries unused)
``softcap``           ``cap * tanh(s / cap)`` after scaling, before bias and mask (Gemma2's order)
``s_aux``             learned sinks: one extra logit per head in the softmax denominator (gpt-oss)
``position_bias``     an additive score bias ``[B|1, H|1, Tq, K]``
``dropout``           must be 0: a model in training mode is refused
``is_causal``         False with no mask: every key is visible
``sliding_window``    read, not applied: the mask carries the window
``position_ids``      token positions of the queries (``cache_position`` when there are none)
====================  ======================================================================================

Every other argument must be None or in :data:`PASSIVE` (arguments with no attention semantics);
anything else raises :class:`~probe.errors.UnsupportedModelError` naming the model, the argument and
what to do. Nothing is ever dropped silently.

**Positions.** A query's own key is the last key it sees (causal, sliding-window and chunked masks
all include the query itself). That fixes how the key array is laid out (a dynamic cache ends at the
last query; a sliding-window cache keeps only the last keys; a static cache has free slots after
it), and with the queries' position ids it maps key ``j`` of batch row ``b`` to its token position
``j - offset[b]`` (pads of a left-padded row get negative positions). Key groups, spans, argmax,
received columns and every position-indexed edit use these positions.

>>> import torch
>>> q, k = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 3, 4)      # one decode row, 3 cached keys
>>> class Attn(torch.nn.Module): layer_idx = 0
>>> call = parse_call(Attn(), q, k, None, {"position_ids": torch.tensor([[9]]), "use_cache": True})
>>> call.k_pos.tolist(), call.decoding      # a sliding-window cache holding the last 3 tokens
([[7, 8, 9]], True)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError

# Arguments transformers passes that carry no attention semantics (documented allow-list).
PASSIVE = frozenset({"use_cache", "output_attentions", "output_hidden_states", "output_router_logits",
                     "return_dict", "num_items_in_batch", "head_mask", "layer_head_mask"})
PARSED = frozenset({"scaling", "dropout", "softcap", "s_aux", "position_bias", "is_causal", "sliding_window",
                    "position_ids", "cache_position"})
_SCAN = 1 << 22  # mask elements scanned at once when locating each query's own key


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """What one attention call computes. Shapes: ``B`` batch (or 1, broadcast), ``Tq`` queries, ``K`` keys.

    ``diag`` is the key index of query 0's own key (query ``i`` owns key ``diag + i``); with no
    ``mask``, key ``j`` is visible to query ``i`` iff ``j <= diag + i`` (every key if ``all_visible``).
    """

    model: str                       # the attention module's class, for messages
    layer: int
    scaling: float
    n_queries: int
    n_keys: int
    q_pos: torch.Tensor              # [B|1, Tq] long: token positions of the queries
    k_pos: torch.Tensor              # [B|1, K]  long: token positions of the keys
    diag: int
    mask: torch.Tensor | None = None     # [B|1, 1|H, Tq, K] bool: visible keys
    all_visible: bool = False
    softcap: float | None = None
    sinks: torch.Tensor | None = None    # [H] float32: learned sink logits
    bias: torch.Tensor | None = None     # [B|1, 1|H, Tq, K] float32: added to the scores

    @classmethod
    def plain(cls, scale: float, n_queries: int, n_keys: int, mask: torch.Tensor | None = None,
              q_pos: torch.Tensor | None = None, device=None) -> "AttentionCall":
        """A call with index positions: causal by ``q_pos`` (default: the last ``n_queries`` keys) or ``mask``."""
        diag = n_keys - n_queries if q_pos is None else int(q_pos.flatten()[0])
        device = device or (mask.device if mask is not None else None)
        vis, bias = (None, None) if mask is None else _read_mask("tensor", mask, n_queries, n_keys)
        return cls("tensor", 0, float(scale), n_queries, n_keys,
                   (torch.arange(n_queries, device=device) + diag)[None], torch.arange(n_keys, device=device)[None],
                   diag, vis, bias=bias)

    @property
    def decoding(self) -> bool:
        """True when keys from earlier forwards exist (a decode step or a later prefill chunk)."""
        return self.diag > 0

    @property
    def lower_right(self) -> bool:
        """Plain causal attention with the queries at the end of the keys (what the fused kernel assumes)."""
        return self.mask is None and not self.all_visible and self.diag == self.n_keys - self.n_queries

    @property
    def shared_keys(self) -> bool:
        """Every batch row maps key indices to the same positions."""
        return self.k_pos.shape[0] == 1 or bool((self.k_pos == self.k_pos[:1]).all())

    def visible(self, rows: slice) -> torch.Tensor:
        """``[B|1, 1|H, c, K]`` bool: the keys each query row in ``rows`` sees."""
        if self.mask is not None:
            return self.mask[:, :, rows]
        keys = torch.arange(self.n_keys, device=self.k_pos.device)
        if self.all_visible:
            return torch.ones(1, 1, len(range(*rows.indices(self.n_queries))), self.n_keys, dtype=torch.bool,
                              device=keys.device)
        own = torch.arange(*rows.indices(self.n_queries), device=keys.device) + self.diag
        return (keys[None, :] <= own[:, None])[None, None]

    def visible_counts(self, row0: int = 0) -> torch.Tensor:
        """``[B|1, K]``: how many query rows from ``row0`` on see each key (the sink column-mean denominator)."""
        n = self.n_queries - row0
        if self.mask is None:
            keys = torch.arange(self.n_keys, device=self.k_pos.device)
            if self.all_visible:
                return torch.full((1, self.n_keys), float(max(n, 0)), device=keys.device)
            first = (keys - self.diag).clamp(min=row0)  # first row that sees key j
            return (self.n_queries - first).clamp(min=0).float()[None]
        out = torch.zeros(self.mask.shape[0], self.n_keys, device=self.mask.device)
        step = max(1, _SCAN // max(1, self.mask.shape[0] * self.n_keys))
        for r0 in range(row0, self.n_queries, step):
            out += self.mask[:, 0, r0:r0 + step].sum(1)
        return out

    def key_mask(self, spans) -> torch.Tensor:
        """``[B|1, K]`` bool: keys whose token position falls in any ``(start, stop)`` span (stop None: open)."""
        out = torch.zeros(self.k_pos.shape, dtype=torch.bool, device=self.k_pos.device)
        for start, stop in spans:
            out |= (self.k_pos >= start) & (True if stop is None else self.k_pos < stop)
        return out

    def for_heads(self, heads: list[int]) -> "AttentionCall":
        """The same call for the sub-tensor holding only ``heads`` (per-head mask, bias and sinks sliced)."""
        def pick(t):
            return t if t is None or t.shape[1] == 1 else t[:, heads]
        return dataclasses.replace(self, mask=pick(self.mask), bias=pick(self.bias),
                                   sinks=None if self.sinks is None else self.sinks[heads])

    def align(self, pattern: torch.Tensor, src_pos: torch.Tensor) -> torch.Tensor:
        """A pattern ``[B, Tq, K_src]`` over keys at positions ``src_pos [B|1, K_src]``, placed on this call's keys.

        Raises when the pattern has mass on a position this call's keys do not hold (a sliding-window
        layer in decode no longer holds what a full layer attends to).
        """
        if pattern.shape[-1] == self.n_keys and torch.equal(src_pos, self.k_pos):
            return pattern
        idx = self.k_pos - src_pos[:, :1]                               # [B|1, K]: source index of each key
        ok = (idx >= 0) & (idx < pattern.shape[-1])
        out = pattern.gather(-1, idx.clamp(0, pattern.shape[-1] - 1)[:, None, :].expand(pattern.shape[0], -1, -1))
        out = out * ok[:, None, :]
        if not torch.allclose(out.sum(-1), pattern.sum(-1), atol=1e-5):
            raise UnsupportedModelError(f"PatternEcho into layer {self.layer}: its keys do not hold every token the "
                                        "source head attends to (a sliding-window layer in decode); echo into a "
                                        "full layer")
        return out

    def bias_rows(self, rows: slice, heads=None) -> torch.Tensor | None:
        if self.bias is None:
            return None
        b = self.bias[:, :, rows]
        return b[:, heads] if heads is not None and b.shape[1] > 1 else b


def parse_call(module, query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict) -> AttentionCall:
    """Read one attention call (see the module docstring); raises UnsupportedModelError on what it cannot compute."""
    name = type(module).__name__
    unknown = sorted(k for k, v in kwargs.items() if k not in PARSED and k not in PASSIVE and v is not None)
    if unknown:
        raise UnsupportedModelError(
            f"{name} passes the attention argument {unknown[0]!r}, which headwise's engine does not implement, so "
            "statistics and edits on this model would be wrong. Run it without headwise (plain forward works), or "
            "add the argument's meaning to probe/call.py and probe/eager.py (see the docstrings)")
    dropout = kwargs.get("dropout") or 0.0
    if float(dropout) != 0.0:
        raise UnsupportedModelError(f"{name} applies attention dropout p={float(dropout)} (the model is in training "
                                    "mode): call model.eval() before collecting statistics or editing heads")
    B, H, Tq, _ = query.shape
    K = key.shape[2]
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    vis, bias = _read_mask(name, attention_mask, Tq, K)
    bias = _add_bias(name, bias, kwargs.get("position_bias"), H, Tq, K)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    all_visible = vis is None and not causal
    diag = _diagonal(name, vis, Tq, K) if vis is not None else (K - Tq if Tq == 1 or all_visible else 0)
    q_pos, k_pos = _positions(name, kwargs, vis, diag, Tq, K, query.device)
    return AttentionCall(name, int(getattr(module, "layer_idx", 0) or 0), scaling, Tq, K, q_pos, k_pos, diag, vis,
                         all_visible, _softcap(kwargs.get("softcap")), _sinks(name, kwargs.get("s_aux"), H), bias)


def _softcap(value) -> float | None:
    return None if value is None or float(value) == 0.0 else float(value)


def _sinks(name: str, s_aux, H: int) -> torch.Tensor | None:
    if s_aux is None:
        return None
    s = torch.as_tensor(s_aux).detach().float().flatten()
    if s.numel() != H:
        raise UnsupportedModelError(f"{name} passes s_aux with {s.numel()} values for {H} query heads: headwise "
                                    "implements one learned sink logit per head")
    return s


def _read_mask(name: str, mask, Tq: int, K: int):
    """``(visible bool [B|1, 1|H, Tq, K] | None, additive bias | None)`` from the mask the model passes."""
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        raise UnsupportedModelError(f"{name} passes a {type(mask).__name__} attention mask (flex attention): "
                                    "headwise's engine reads sdpa and eager masks; load the model with "
                                    "attn_implementation='sdpa'")
    if mask.dim() != 4 or mask.shape[-2] not in (1, Tq) or mask.shape[-1] < K:
        raise UnsupportedModelError(f"{name} passes an attention mask of shape {tuple(mask.shape)} for {Tq} queries "
                                    f"and {K} keys (a flash-attention 2D mask?): load the model with "
                                    "attn_implementation='sdpa' or 'eager'")
    mask = mask[..., :K].expand(*mask.shape[:2], Tq, K)
    if mask.dtype == torch.bool:
        return mask, None
    vis = mask > torch.finfo(mask.dtype).min / 2
    extra = mask.float().masked_fill(~vis, 0.0)
    return vis, (extra if bool((extra != 0).any()) else None)


def _add_bias(name: str, bias, position_bias, H: int, Tq: int, K: int):
    if position_bias is None:
        return bias
    pb = position_bias
    if pb.dim() != 4 or pb.shape[1] not in (1, H) or pb.shape[-2] not in (1, Tq) or pb.shape[-1] < K:
        raise UnsupportedModelError(f"{name} passes position_bias of shape {tuple(pb.shape)}; headwise reads an "
                                    f"additive bias [B|1, 1|{H}, {Tq}, {K}]")
    pb = pb[..., :K].float()
    return pb if bias is None else pb + bias


def _diagonal(name: str, vis: torch.Tensor, Tq: int, K: int) -> int:
    """Key index of query 0's own key: the largest ``last visible key - row`` over rows that see a key."""
    rows = vis.any(1)  # [B, Tq, K]: visible to any head
    keys = torch.arange(K, device=vis.device)
    best = None
    step = max(1, _SCAN // max(1, rows.shape[0] * K))
    for r0 in range(0, Tq, step):
        last = torch.where(rows[:, r0:r0 + step], keys, -1).amax(-1)  # [B, c]
        if not bool((last >= 0).any()):
            continue
        lead = last - torch.arange(r0, r0 + last.shape[1], device=vis.device)
        m = int(lead.masked_fill(last < 0, -(K + Tq)).max())
        best = m if best is None else max(best, m)
    if best is None:  # no row sees any key (an all-padding batch): nothing to place
        return K - Tq
    if best + Tq > K:
        raise UnsupportedModelError(f"{name} passes a mask in which queries see keys after their own (bidirectional or "
                                    "block attention): headwise's engine computes causal attention only")
    if best < 0:
        raise UnsupportedModelError(f"{name} passes a mask in which no query sees its own key: headwise cannot tell "
                                    "where the queries sit among the keys")
    return best


def _positions(name: str, kwargs: dict, vis, diag: int, Tq: int, K: int, device):
    """``(q_pos [B|1, Tq], k_pos [B|1, K])`` token positions (see the module docstring)."""
    own = torch.arange(Tq, device=device) + diag  # key index of each query's own key
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = kwargs.get("cache_position")
    if pos is None:
        if kwargs.get("sliding_window") is not None:
            raise UnsupportedModelError(f"{name} passes a sliding window but no position_ids: headwise cannot tell "
                                        "which tokens a sliding-window cache still holds")
        if vis is not None and bool((~vis.any(1).any(1))[:, :diag + Tq].any()):  # a past key no query sees: padding
            raise UnsupportedModelError(f"{name} gets a padded batch but no position_ids: headwise cannot tell which "
                                        "token position each key holds; pass position_ids (or upgrade transformers)")
        return own[None], torch.arange(K, device=device)[None]
    pos = torch.as_tensor(pos, device=device).long()
    pos = pos[None] if pos.dim() == 1 else pos
    if pos.dim() != 2 or pos.shape[-1] != Tq:
        raise UnsupportedModelError(f"{name} passes position_ids of shape {tuple(pos.shape)} for {Tq} queries: "
                                    "headwise reads one position per query ([batch, query])")
    lead = own[None] - pos                                   # [B, Tq]: key index minus token position
    if vis is None and Tq == 1:                              # one row (decoding): its own key fixes the offset
        return pos, torch.arange(K, device=device)[None] - lead
    if vis is None:
        real = torch.ones_like(lead, dtype=torch.bool)
    else:
        B = max(vis.shape[0], pos.shape[0])
        real = vis.any(1).expand(B, Tq, K).gather(-1, own.clamp(max=K - 1)[None, :, None].expand(B, Tq, 1))[..., 0]
        lead = lead.expand(B, Tq)
    big = torch.iinfo(torch.long).max
    hi = torch.where(real, lead, -big).amax(-1)
    lo = torch.where(real, lead, big).amin(-1)
    if bool(((hi != lo) & real.any(-1)).any()):
        raise UnsupportedModelError(f"{name} gets position_ids that are not consecutive within a sequence (packed "
                                    "sequences?): headwise maps keys to positions one sequence per batch row")
    offset = torch.where(real.any(-1), hi, torch.full_like(hi, diag))  # [B]
    return pos.expand(offset.shape[0], Tq), torch.arange(K, device=device)[None] - offset[:, None]
