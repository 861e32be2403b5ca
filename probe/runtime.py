"""The attention function headwise registers with transformers, and the context managers on it.

``install(hf)`` records the attention implementation the model had, registers ``"headwise_<impl>"``
with ``AttentionInterface`` and switches the model to it (see :mod:`probe.native`). While nothing
is active it calls the model's own function with every argument, so a wrapped model computes
exactly what it computed before. Inside :func:`intervene`, :func:`collect_stats` or :func:`tap`
each layer's call is parsed once (:func:`probe.call.parse_call`) and :meth:`Runtime.choose_path`
picks how it runs: the model's own function, the fused Triton kernel or the eager engine
:func:`probe.eager.attend` (chunked over query rows), with the active edits and observers, in
``forward`` and in ``generate`` (each decode step is one query row against the KV cache).
Any Hugging Face model whose attention goes through ``AttentionInterface`` works; others are refused.

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

from . import allocator, eager, native
from .call import AttentionCall, parse_call
from .checks import context_length
from .errors import InputError, UnsupportedModelError
from .heads import HeadLayout
from .interventions import InterventionSpec, PatternEcho
from .stats import StatsCollector, StatsRequest

DEFAULT_BUDGET = 96 * 2**20  # bytes of scores per attention call (chunked over rows)
_kernel_failed = False  # set when the fused kernel raised once: the eager engine is used from then on


class Tap(Protocol):
    """An observer of attention. Implement either method; ``layers=None`` means every layer.

    ``q_pos [c]`` are the token positions of the rows (of the first sequence); ``probs`` is the final
    pattern ``[B, H, c, K]`` over the call's keys (with a learned sink its rows sum to 1 - sink mass).
    """

    layers: set[int] | None

    def on_probs(self, layer: int, q_pos: torch.Tensor, probs: torch.Tensor) -> None: ...
    # ``probs`` lives in a reused buffer: copy (``.clone()``) whatever you keep beyond the call.
    def on_output(self, layer: int, q_pos: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None: ...


class Runtime:
    """Per-model state read by the attention function: active spec, collectors, taps, budget.

    ``native`` (the implementation the model had) and ``refusal`` (why the eager engine cannot run
    this model, or None) are fixed at install.
    """

    def __init__(self, layout: HeadLayout, native_impl: str):
        self.layout = layout
        self.native = native_impl
        self.name = native.name_for(native_impl)
        self.refusal: str | None = None
        self.specs: list[InterventionSpec] = []
        self.collectors: list[StatsCollector] = []
        self.taps: list[Tap] = []
        self.budget = DEFAULT_BUDGET
        self._plans: dict[tuple[int, bool], eager.LayerPlan] = {}
        self._echo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
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

    def attend(self, module, query, key, value, mask, kwargs: dict) -> torch.Tensor:
        """One layer's attention while something is active: ``out [B, Tq, H, D]``."""
        layer = int(module.layer_idx)
        if not self._touched(layer):  # nothing edits or watches this layer: the model's own call, unparsed
            out = self._native(module, query, key, value, mask, kwargs)
        else:
            call = parse_call(module, query, key, mask, kwargs)
            plan = self._plan(layer, call.decoding)
            path = self.choose_path(layer, call, plan, query)
            out = self._run(path, module, query, key, value, mask, kwargs, call, plan)
        for t in self.taps:
            if hasattr(t, "on_call"):
                t.on_call(module, query, key, value, mask, kwargs, out)
        return out

    def choose_path(self, layer: int, call: AttentionCall, plan: eager.LayerPlan, query: torch.Tensor) -> str:
        """How this layer's attention runs (the one place that decides):

        ``"native"``  the model's own function: nothing edits or watches the layer   out [B, Tq, H, D]
        ``"subset"``  native for every head, edited heads recomputed alone           out[:, :, edited]
        ``"fused"``   the Triton kernel: CUDA, plan and call it implements           out, stats [B, H, Tq]
        ``"eager"``   the chunked engine (defines every edit and statistic)          probs [B, H, c, K]
        """
        watchers = [c for c in self.collectors if c.wants(layer)]
        if self._unobserved(layer, call.decoding, plan):
            return "subset" if plan else "native"
        if not (self._echo_sources(layer, call.decoding) or plan.echo or self._probe_taps(layer)) and \
                _fused_ok(query, plan, call, watchers):
            return "fused"
        return "eager"

    def _run(self, path, module, query, key, value, mask, kwargs, call, plan) -> torch.Tensor:
        layer = call.layer
        if path == "native":
            return self._native(module, query, key, value, mask, kwargs)
        if path == "subset":
            return self._subset(module, query, key, value, mask, kwargs, call, plan)
        out = None
        watchers = [c for c in self.collectors if c.wants(layer)]
        if path == "fused":
            out = _attend_fused(query, key, value, call, plan, watchers)
        if out is None:
            out = self._eager(query, key, value, call, plan, watchers)
        for t in self.taps:
            if hasattr(t, "on_output") and _wants(t, layer):
                edited = t.on_output(layer, call.q_pos[0], out)
                out = out if edited is None else edited
        return out

    def _native(self, module, query, key, value, mask, kwargs) -> torch.Tensor:
        fn = native.native_function(module, self.native)
        return fn(module, query, key, value, mask, **kwargs)[0]

    def _eager(self, query, key, value, call: AttentionCall, plan, watchers) -> torch.Tensor:
        """The eager engine with every observer: echo stores, collectors, pattern taps."""
        layer, Tq, K = call.layer, call.n_queries, call.n_keys
        echo = {h: call.align(*(t.to(query.device) for t in self._echo[src]))   # the source layer may sit on
                for h, src in plan.echo.items()}                                   # another device of a split
        stores = {h: torch.zeros(query.shape[0], Tq, K, device=query.device)
                  for h in self._echo_sources(layer, call.decoding)}
        probe_taps = self._probe_taps(layer)

        def on_chunk(chunk: eager.Chunk):
            for h, store in stores.items():
                store[:, chunk.rows] = chunk.probs[:, h]
            for c in watchers:
                c.on_chunk(layer, call, chunk)
            for t in probe_taps:
                t.on_probs(layer, chunk.q_pos[0], chunk.probs)

        allocator.tune()
        out = eager.attend(query, key, value, call=call, plan=plan, echo=echo, scratch=self.scratch,
                           chunk=self.chunk_rows(query.shape[0], query.shape[1], K, Tq),
                           on_chunk=on_chunk if (stores or watchers or probe_taps) else None)
        for h, store in stores.items():
            self._echo[(layer, h)] = (store, call.k_pos)
        return out

    def _subset(self, module, query, key, value, mask, kwargs, call: AttentionCall, plan) -> torch.Tensor:
        """An edited, unobserved layer: the model's own output for every head, edited heads recomputed alone.

        Edits are per head, so each edited head runs (with its own KV head) under a plan re-indexed
        to the subset; unedited heads keep the output of the plain model, bit for bit.
        """
        out = self._native(module, query, key, value, mask, kwargs).clone()
        if plan.heads() == plan.zero | set(plan.mean):  # output edits only: nothing to recompute
            eager._edit_outputs(out.transpose(1, 2), plan, call.q_pos)
            return out
        heads = sorted(plan.heads())
        group = query.shape[1] // key.shape[1]
        idx = torch.tensor(heads, device=query.device)
        kv = torch.tensor([h // group for h in heads], device=query.device)
        q, k, v = query[:, idx], key[:, kv], value[:, kv]
        sub_call, sub_plan = call.for_heads(heads), plan.reindexed(heads)
        sub = _attend_fused(q, k, v, sub_call, sub_plan, []) if _fused_ok(q, sub_plan, sub_call, []) else None
        if sub is None:
            sub = eager.attend(q, k, v, call=sub_call, plan=sub_plan,
                               chunk=self.chunk_rows(query.shape[0], len(heads), call.n_keys, call.n_queries))
        out[:, :, idx] = sub.to(out.dtype)
        return out

    def _plan(self, layer: int, decoding: bool) -> eager.LayerPlan:
        key = (layer, decoding)
        if key not in self._plans:
            self._plans[key] = eager.compile_plan(self.spec, layer, decoding)
        return self._plans[key]

    def _touched(self, layer: int) -> bool:
        """Whether anything may edit or watch ``layer`` in either phase (else no call needs parsing)."""
        return bool(self._plan(layer, False) or self._plan(layer, True)) or not (
            self._unobserved(layer, False, None) and self._unobserved(layer, True, None))

    def _unobserved(self, layer: int, decoding: bool, plan: eager.LayerPlan | None) -> bool:
        """True when nothing watches this layer's pattern or output and no echo reads or writes it."""
        return not ((plan is not None and plan.echo) or self._echo_sources(layer, decoding)
                    or any(c.wants(layer) for c in self.collectors)
                    or any(_wants(t, layer) for t in self.taps if not hasattr(t, "on_call")))

    def _probe_taps(self, layer: int) -> list:
        return [t for t in self.taps if hasattr(t, "on_probs") and _wants(t, layer)]

    def _echo_sources(self, layer: int, decoding: bool) -> set[int]:
        return {e.source.head for e in self.spec.edits
                if isinstance(e, PatternEcho) and e.active(decoding) and e.source.layer == layer}


def _fused_ok(query, plan: eager.LayerPlan, call: AttentionCall, watchers: list[StatsCollector]) -> bool:
    """Use the fused Triton kernel: CUDA (see probe.kernels), supported plan and call, no gradients, one request."""
    from . import kernels

    if _kernel_failed or kernels.kernel_backend(query, plan, call) is None:
        return False
    if torch.is_grad_enabled() and query.requires_grad:  # the kernel has no backward
        return False
    if watchers and query.shape[0] != 1:
        return False
    return len({(w.request.groups, w.request.from_pos, w.request.received) for w in watchers}) <= 1


def _attend_fused(query, key, value, call: AttentionCall, plan, watchers) -> torch.Tensor | None:
    """Kernel path: row statistics go to ``StatsCollector.on_stats``; None when the kernel declines or fails."""
    from . import kernels

    req = watchers[0].request if watchers else None
    rows = torch.nonzero(call.q_pos[0] >= req.from_pos).flatten() if req else None
    row0 = (int(rows[0]) if rows.numel() else call.n_queries) if req else 0
    global _kernel_failed
    try:
        out, stats, col = kernels.fused_attend(query, key, value, call=call, plan=plan,
                                               groups=[(g.start, g.stop) for g in req.groups] if req else (),
                                               stats=bool(watchers), received=bool(req and req.received),
                                               received_from=row0)
    except InputError:
        return None
    except Exception as exc:  # a kernel that fails to compile here must not break the probe: use eager
        _kernel_failed = True
        warnings.warn(f"fused Triton attention failed ({type(exc).__name__}: {exc}); using the eager engine "
                      "from now on (set HEADWISE_KERNELS=0 to silence)", RuntimeWarning, stacklevel=2)
        return None
    for c in watchers:
        c.on_stats(call.layer, call, stats, col)
    return out


def _wants(tap, layer: int) -> bool:
    layers = getattr(tap, "layers", None)
    return layers is None or layer in layers


def headwise_attention(module, query, key, value, attention_mask, *, _headwise_native: str = "sdpa", **kwargs):
    """The registered attention function: the model's own while idle, headwise's engine while anything is active."""
    rt: Runtime | None = getattr(module, "_headwise_rt", None)
    if rt is None or rt.idle:
        fn = native.native_function(module, rt.native if rt is not None else _headwise_native)
        return fn(module, query, key, value, attention_mask, **kwargs)
    return rt.attend(module, query, key, value, attention_mask, kwargs), None


def _layout(hf) -> HeadLayout:
    cfg = hf.config
    return HeadLayout(cfg.num_hidden_layers, cfg.num_attention_heads,
                      getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def install(hf) -> Runtime:
    """Route ``hf``'s attention through headwise (idempotent); returns its :class:`Runtime`.

    Raises :class:`UnsupportedModelError` when the model does not compute its attention through
    ``AttentionInterface`` (checked on a few tokens, see :func:`probe.native.verify`).
    """
    rt = getattr(hf, "_headwise_rt", None)
    if rt is not None:
        if hf.config._attn_implementation != rt.name:  # switched away (e.g. to eager for a reference): back
            hf.set_attn_implementation(rt.name)
        return rt
    impl = native.native_of(hf.config._attn_implementation)
    native.guard(hf, impl)
    rt = Runtime(_layout(hf), impl)
    native.register(impl, headwise_attention)
    tagged = [m for m in hf.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        hf.set_attn_implementation(rt.name)
        for mod in tagged:
            mod._headwise_rt = rt
        hf._headwise_rt = rt
        native.verify(hf, rt)
    except Exception:
        for mod in tagged + [hf]:
            mod.__dict__.pop("_headwise_rt", None)
        if hf.config._attn_implementation == rt.name:
            hf.set_attn_implementation(impl)
        raise
    return rt


def _engine(model) -> Runtime:
    """The model's runtime, refusing now (before any work) when its eager engine was refused at install."""
    rt = install(_hf(model))
    if rt.refusal:
        raise UnsupportedModelError(rt.refusal)
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
    rt = _engine(hf)
    spec.validate(rt.layout, n_ctx=context_length(hf.config))
    try:
        with _attached(rt, rt.specs, spec):
            yield spec
    finally:
        if not str(previous).startswith(native.PREFIX) and rt.idle:
            hf.set_attn_implementation(previous)


@contextmanager
def collect_stats(model, request: StatsRequest | None = None) -> Iterator[StatsCollector]:
    """Collect :class:`HeadStats` from every forward (and decode step) run inside the block."""
    hf = _hf(model)
    rt = _engine(hf)
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
    rt = _engine(model)
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
