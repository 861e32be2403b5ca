"""The attention function headwise registers with transformers, and the context managers on it.

``install(hf_model)`` registers the function ``"headwise"`` with ``AttentionInterface`` and
switches the model to it. While nothing is active it simply calls PyTorch SDPA, so a plain
model runs as before. Inside :func:`intervene`, :func:`collect_stats` or :func:`tap` it runs
:func:`probe.eager.attend` (chunked over query rows) with the active edits and observers, in
``forward`` and in ``generate`` (each decode step is one query row against the KV cache).
Any Hugging Face model whose attention goes through ``AttentionInterface`` works; no bridge.

>>> from probe import load_model, ZeroAblate, InterventionSpec
>>> m = load_model("tiny-llama")
>>> ids = m.encode("hello")
>>> with intervene(m, InterventionSpec([ZeroAblate(heads=["L0H1"])])):
...     edited = m.hf(ids).logits
>>> bool((edited != m.hf(ids).logits).any())
True
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch

from . import allocator, eager
from .checks import context_length
from .errors import InputError
from .heads import HeadLayout
from .interventions import InterventionSpec, PatternEcho
from .stats import StatsCollector, StatsRequest

ATTN_NAME = "headwise"
DEFAULT_BUDGET = 96 * 2**20  # bytes of scores per attention call (chunked over rows)
_registered = False
_kernel_failed = False  # set when the fused kernel raised once: the eager engine is used from then on


class Tap(Protocol):
    """An observer of attention. Implement either method; ``layers=None`` means every layer."""

    layers: set[int] | None

    def on_probs(self, layer: int, q_pos: torch.Tensor, probs: torch.Tensor) -> None: ...
    # ``probs`` lives in a reused buffer: copy (``.clone()``) whatever you keep beyond the call.
    def on_output(self, layer: int, q_pos: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None: ...


class Runtime:
    """Per-model state read by the attention function: active spec, collectors, taps, budget."""

    def __init__(self, layout: HeadLayout):
        self.layout = layout
        self.specs: list[InterventionSpec] = []
        self.collectors: list[StatsCollector] = []
        self.taps: list[Tap] = []
        self.budget = DEFAULT_BUDGET
        self._plans: dict[tuple[int, bool], eager.LayerPlan] = {}
        self._echo: dict[tuple[int, int], torch.Tensor] = {}
        self.scratch = eager.Scratch()

    @property
    def idle(self) -> bool:
        return not (self.specs or self.collectors or self.taps)

    @property
    def spec(self) -> InterventionSpec:
        return sum(self.specs, InterventionSpec())

    def changed(self) -> None:
        self._plans.clear()
        self._echo.clear()

    def chunk_rows(self, batch: int, n_heads: int, n_keys: int, n_rows: int) -> int:
        per_row = batch * n_heads * n_keys * 4 * 3  # scores, probs and one temporary in fp32
        return int(max(1, min(n_rows, self.budget // max(per_row, 1))))

    def attend(self, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        layer = int(module.layer_idx)
        Tq, K = query.shape[2], key.shape[2]
        decoding = K > Tq
        plan = self._plan(layer, decoding)
        q_pos = torch.arange(K - Tq, K, device=query.device)
        if self._unobserved(layer, decoding, plan):
            if _fused_ok(query, plan, []):  # on CUDA the kernel runs every head of the layer at once
                out = _attend_fused(layer, query, key, value, attention_mask, scaling, plan, [], q_pos)
                if out is not None:
                    return out
            n_edited = max(1, len(plan.heads()))
            return _attend_subset(module, query, key, value, attention_mask, scaling, plan, q_pos,
                                  self.chunk_rows(query.shape[0], n_edited, K, Tq))
        echo = {h: self._echo[src] for h, src in plan.echo.items()}
        sources = self._echo_sources(layer, decoding)
        stores = {h: torch.zeros(query.shape[0], Tq, K, device=query.device) for h in sources}
        watchers = [c for c in self.collectors if c.wants(layer)]
        probe_taps = [t for t in self.taps if hasattr(t, "on_probs") and _wants(t, layer)]

        def on_chunk(pos, probs, scores=None):
            rows = slice(int(pos[0]) - (K - Tq), int(pos[-1]) - (K - Tq) + 1)
            for h, store in stores.items():
                store[:, rows] = probs[:, h]
            for c in watchers:
                c.on_chunk(layer, pos, probs, scores)
            for t in probe_taps:
                t.on_probs(layer, pos, probs)

        needs_cb = bool(stores or watchers or probe_taps)
        output_taps = [t for t in self.taps if hasattr(t, "on_output") and _wants(t, layer)]
        if not (plan or needs_cb or output_taps):  # nothing to do here: the fast path, exactly as idle
            return _sdpa(module, query, key, value, attention_mask, scaling)
        out = None
        if not (stores or probe_taps or echo) and _fused_ok(query, plan, watchers):
            out = _attend_fused(layer, query, key, value, attention_mask, scaling, plan, watchers, q_pos)
        if out is None:
            allocator.tune()
            chunk = self.chunk_rows(query.shape[0], query.shape[1], K, Tq)
            out = eager.attend(query, key, value, scale=scaling, q_pos=q_pos, mask=attention_mask, plan=plan,
                               chunk=chunk, echo=echo, on_chunk=on_chunk if needs_cb else None,
                               scratch=self.scratch)
        for h, store in stores.items():
            self._echo[(layer, h)] = store
        for t in output_taps:
            edited = t.on_output(layer, q_pos, out)
            out = out if edited is None else edited
        return out

    def _plan(self, layer: int, decoding: bool) -> eager.LayerPlan:
        key = (layer, decoding)
        if key not in self._plans:
            self._plans[key] = eager.compile_plan(self.spec, layer, decoding)
        return self._plans[key]

    def _unobserved(self, layer: int, decoding: bool, plan: eager.LayerPlan) -> bool:
        """True when nothing watches this layer's pattern or output and no echo reads or writes it."""
        return not (plan.echo or self._echo_sources(layer, decoding) or any(c.wants(layer) for c in self.collectors)
                    or any(_wants(t, layer) for t in self.taps))

    def _echo_sources(self, layer: int, decoding: bool) -> set[int]:
        return {e.source.head for e in self.spec.edits
                if isinstance(e, PatternEcho) and e.active(decoding) and e.source.layer == layer}


def _fused_ok(query, plan: eager.LayerPlan, watchers: list[StatsCollector]) -> bool:
    """Use the fused Triton kernel: CUDA (see probe.kernels), supported plan, no gradients, one stats request."""
    from . import kernels

    if _kernel_failed or kernels.kernel_backend(query, plan) is None:
        return False
    if torch.is_grad_enabled() and query.requires_grad:  # the kernel has no backward
        return False
    return len({(w.request.groups, w.request.from_pos, w.request.received) for w in watchers}) <= 1


def _attend_fused(layer, query, key, value, mask, scaling, plan, watchers, q_pos) -> torch.Tensor | None:
    """Kernel path of :meth:`Runtime.attend`: row statistics go to ``StatsCollector.on_stats``."""
    from . import kernels

    req = watchers[0].request if watchers else None
    groups = [(g.start, g.stop) for g in req.groups] if req else ()
    row0 = max(0, req.from_pos - int(q_pos[0])) if req else 0
    if watchers and query.shape[0] != 1:
        raise InputError("streaming statistics take one sequence at a time (batch size 1)")
    global _kernel_failed
    try:
        out, stats, col = kernels.fused_attend(query, key, value, scale=scaling, mask=mask, plan=plan, groups=groups,
                                               stats=bool(watchers), received=bool(req and req.received),
                                               received_from=min(row0, query.shape[2]))
    except InputError:
        return None
    except Exception as exc:  # a kernel that fails to compile here must not break the probe: use eager
        _kernel_failed = True
        warnings.warn(f"fused Triton attention failed ({type(exc).__name__}: {exc}); using the eager engine "
                      "from now on (set HEADWISE_KERNELS=0 to silence)", RuntimeWarning, stacklevel=2)
        return None
    for c in watchers:
        c.on_stats(layer, q_pos, stats, col)
    return out


def _wants(tap, layer: int) -> bool:
    layers = getattr(tap, "layers", None)
    return layers is None or layer in layers


def _attend_subset(module, query, key, value, attention_mask, scaling, plan, q_pos, chunk) -> torch.Tensor:
    """Fast path for an unobserved layer: SDPA for every head, the eager engine only for edited heads.

    Edits are per head, so each edited head is recomputed alone (with its own KV head) under a
    plan re-indexed to the subset; unedited heads keep the SDPA output of the plain model.
    """
    out = _sdpa(module, query, key, value, attention_mask, scaling)
    heads = sorted(plan.heads())
    if not heads:
        return out
    group = query.shape[1] // key.shape[1]
    kv = torch.tensor([h // group for h in heads], device=query.device)
    idx = torch.tensor(heads, device=query.device)
    sub = eager.attend(query[:, idx], key[:, kv], value[:, kv], scale=scaling, q_pos=q_pos, mask=attention_mask,
                       plan=plan.reindexed(heads), chunk=chunk)
    out = out.clone()
    out[:, :, idx] = sub.to(out.dtype)
    return out


def headwise_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: SDPA when idle, the eager engine when anything is active."""
    rt: Runtime | None = getattr(module, "_headwise_rt", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if rt is None or rt.idle:
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs), None
    return rt.attend(module, query, key, value, attention_mask, scaling), None


def _sdpa(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)[0]


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, headwise_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def _layout(hf) -> HeadLayout:
    cfg = hf.config
    return HeadLayout(cfg.num_hidden_layers, cfg.num_attention_heads,
                      getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def install(hf) -> Runtime:
    """Route ``hf``'s attention through headwise (idempotent); returns its :class:`Runtime`."""
    rt = getattr(hf, "_headwise_rt", None)
    if rt is not None and hf.config._attn_implementation == ATTN_NAME:
        return rt
    _register()
    hf.set_attn_implementation(ATTN_NAME)
    rt = rt or Runtime(_layout(hf))
    found = 0
    for mod in hf.modules():
        if hasattr(mod, "layer_idx") and type(mod).__name__.endswith("Attention"):
            mod._headwise_rt = rt
            found += 1
    if found != rt.layout.n_layers:
        raise InputError(f"found {found} attention modules with a layer index, expected {rt.layout.n_layers}: "
                         "this architecture does not route attention through AttentionInterface")
    hf._headwise_rt = rt
    return rt


def _hf(model):
    return getattr(model, "hf", model)


@contextmanager
def _attached(rt: Runtime, items: list, item):
    """Put ``item`` on one of the runtime's lists for the duration of the block, whatever happens."""
    items.append(item)
    rt.changed()
    try:
        yield item
    finally:
        items.remove(item)
        rt.changed()


@contextmanager
def intervene(model, spec: InterventionSpec) -> Iterator[InterventionSpec]:
    """Apply ``spec`` to a headwise ``Model`` or a plain HF model; always removed on exit.

    >>> import torch
    >>> from probe import InterventionSpec, Uniform, load_model
    >>> m = load_model("tiny-llama")
    >>> ids = m.encode("hello")
    >>> with intervene(m, InterventionSpec([Uniform(heads=["L1H0", "L1H1"])])):
    ...     edited = m.hf(ids).logits
    >>> torch.equal(edited, m.hf(ids).logits)   # edited inside the block, plain again after it
    False
    """
    hf = _hf(model)
    previous = hf.config._attn_implementation
    rt = install(hf)
    spec.validate(rt.layout, n_ctx=context_length(hf.config))
    try:
        with _attached(rt, rt.specs, spec):
            yield spec
    finally:
        if previous != ATTN_NAME and rt.idle:
            hf.set_attn_implementation(previous)


@contextmanager
def collect_stats(model, request: StatsRequest | None = None) -> Iterator[StatsCollector]:
    """Collect :class:`HeadStats` from every forward (and decode step) run inside the block."""
    hf = _hf(model)
    rt = install(hf)
    request = request or StatsRequest()
    for layer in request.layers or ():
        rt.layout.check_layer(layer)
    collector = StatsCollector(request, rt.layout.n_layers, rt.layout.n_heads,
                               getattr(model, "model_id", hf.config.name_or_path))
    with _attached(rt, rt.collectors, collector):
        yield collector


@contextmanager
def tap(model, observer: Tap) -> Iterator[Tap]:
    """Attach an observer (see :class:`Tap`) for the duration of the block."""
    rt = install(_hf(model))
    with _attached(rt, rt.taps, observer):
        yield observer


@contextmanager
def memory_budget(model, budget_bytes: int) -> Iterator[None]:
    """Cap the scores one attention call holds (sets the query-chunk size)."""
    rt = install(_hf(model))
    old, rt.budget = rt.budget, int(budget_bytes)
    try:
        yield
    finally:
        rt.budget = old


class Applied:
    """Handle for a spec applied until :meth:`remove` (calibration at inference)."""

    def __init__(self, model, spec: InterventionSpec):
        self._cm = intervene(model, spec)
        self._cm.__enter__()

    def remove(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


def apply(model, spec: InterventionSpec) -> Applied:
    """Apply ``spec`` persistently (forward and ``generate``) until ``.remove()`` is called.

    >>> from probe import InterventionSpec, ZeroAblate, load_model
    >>> m = load_model("tiny-llama")
    >>> handle = apply(m, InterventionSpec([ZeroAblate(heads=["L0H0"])]))
    >>> out = m.hf.generate(m.encode("ab"), max_new_tokens=2, do_sample=False)
    >>> handle.remove()
    """
    return Applied(model, spec)
