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
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

import torch

from . import active as active_state
from . import allocator, eager, fast, native
from .call import AttentionCall, parse_call
from .checks import context_length
from .errors import InputError, UnsupportedModelError
from .heads import HeadLayout
from .interventions import InterventionSpec, PatternEcho
from .stats import StatsCollector, StatsRequest

DEFAULT_BUDGET = active_state.DEFAULT_BUDGET
_KERNEL_WARNED: ContextVar[bool] = ContextVar("headwise_kernel_warned", default=False)


class Tap(Protocol):
    """An observer of attention. Implement either method; ``layers=None`` means every layer.

    ``q_pos [c]`` are the token positions of the rows (of the first sequence); ``probs`` is the final
    pattern ``[B, H, c, K]`` over the call's keys (with a learned sink its rows sum to 1 - sink mass).
    """

    layers: set[int] | None

    def on_probs(self, layer: int, q_pos: torch.Tensor, probs: torch.Tensor) -> None: ...
    # ``probs`` lives in a reused buffer: copy (``.clone()``) whatever you keep beyond the call.
    def on_output(self, layer: int, q_pos: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None: ...


@dataclass(frozen=True, eq=False)
class Runtime:
    """A model's immutable headwise configuration, fixed at install (see :mod:`probe.active` for the rest).

    ``native``: the implementation the model had; ``refusal``: why the eager engine cannot run this
    model, or None. What is active (specs, collectors, taps, budget) is per calling context, never here.
    """

    layout: HeadLayout
    native: str
    refusal: str | None = None

    @property
    def name(self) -> str:
        return native.name_for(self.native)

    def active(self) -> active_state.Active:
        """What the calling thread or task has active on this model (an empty snapshot when nothing)."""
        return active_state.current(self) or active_state.Active()

    @property
    def idle(self) -> bool:
        """Nothing active on this model in the calling context."""
        return self.active().idle


def chunk_rows(budget: int, batch: int, n_heads: int, n_keys: int, n_rows: int) -> int:
    """Query rows per chunk so that scores, probabilities and one temporary (fp32) fit ``budget`` bytes."""
    per_row = batch * n_heads * n_keys * 4 * 3
    return int(max(1, min(n_rows, budget // max(per_row, 1))))


class Engine:
    """One attention call under what the calling context has active (built per call, never stored)."""

    def __init__(self, rt: Runtime, act: active_state.Active):
        self.rt, self.act = rt, act
        self.specs, self.collectors, self.taps = act.specs, act.collectors, act.taps

    @property
    def spec(self) -> InterventionSpec:
        return sum(self.specs, InterventionSpec())

    @property
    def scratch(self) -> eager.Scratch:
        return self.act.work.local("scratch", eager.Scratch)

    @property
    def _echo(self) -> dict:
        return self.act.work.local("echo", dict)

    def chunk_rows(self, batch: int, n_heads: int, n_keys: int, n_rows: int) -> int:
        return chunk_rows(self.act.budget, batch, n_heads, n_keys, n_rows)

    def attend(self, module, query, key, value, mask, kwargs: dict) -> torch.Tensor:
        """One layer's attention while something is active: ``out [B, Tq, H, D]``."""
        layer = int(module.layer_idx)
        if not self._touched(layer):  # nothing edits or watches this layer: the model's own call, unparsed
            out = self._native(module, query, key, value, mask, kwargs)
        else:
            call = parse_call(module, query, key, mask, kwargs)
            plan = self._plan(layer, call.decoding)
            path = self.choose_path(layer, call, plan, query, key, value)
            out = self._run(path, module, query, key, value, mask, kwargs, call, plan)
        for t in self.taps:
            if hasattr(t, "on_call"):
                t.on_call(module, query, key, value, mask, kwargs, out)
        return out

    def choose_path(self, layer: int, call: AttentionCall, plan: eager.LayerPlan, query: torch.Tensor,
                    key: torch.Tensor, value: torch.Tensor) -> str:
        """How this layer's attention runs (the one place that decides):

        ``"native"``  the model's own function: nothing edits or watches the layer   out [B, Tq, H, D]
        ``"subset"``  native for every head, edited heads recomputed alone           out[:, :, edited]
        ``"fused"``   the Triton kernel: CUDA, plan and call it implements           out, stats [B, H, Tq]
        ``"stats"``   CPU flash + one causal pass (probe.fast): a plain prefill     out, stats [B, H, Tq]
        ``"eager"``   the chunked engine (defines every edit and statistic)          probs [B, H, c, K]
        """
        watchers = [c for c in self.collectors if c.wants(layer)]
        if self._unobserved(layer, call.decoding, plan):
            return "subset" if plan else "native"
        if self._echo_sources(layer, call.decoding) or plan.echo or self._probe_taps(layer):
            return "eager"
        if _fused_ok(query, plan, call, watchers):
            return "fused"
        if watchers and _one_request(watchers) and fast.supported(query, key, value, call, plan):
            return "stats"
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
        elif path == "stats":
            out = self._fast_stats(query, key, value, call, plan, watchers)
        if out is None:
            out = self._eager(query, key, value, call, plan, watchers)
        for t in self.taps:
            if hasattr(t, "on_output") and _wants(t, layer):
                edited = t.on_output(layer, call.q_pos[0], out)
                out = out if edited is None else edited
        return out

    def _fast_stats(self, query, key, value, call: AttentionCall, plan, watchers) -> torch.Tensor:
        req = watchers[0].request
        out, stats, col = fast.stats_attend(query, key, value, call, plan, [(g.start, g.stop) for g in req.groups],
                                            received=req.received, received_from=req.from_pos,
                                            chunk=self.chunk_rows(1, query.shape[1], call.n_keys, call.n_queries),
                                            scratch=self.scratch, own_output=req.output == "pass")
        for c in watchers:
            c.on_stats(call.layer, call, stats, col)
        return out.to(query.dtype)

    def _native(self, module, query, key, value, mask, kwargs) -> torch.Tensor:
        fn = native.native_function(module, self.rt.native)
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
        if sub is None and fast.act_supported(q, k, v, sub_call, sub_plan):
            sub = fast.act_attend(q, k, v, sub_call, sub_plan, scratch=self.scratch,
                                  chunk=self.chunk_rows(1, len(heads), call.n_keys, call.n_queries))
        if sub is None:
            sub = eager.attend(q, k, v, call=sub_call, plan=sub_plan,
                               chunk=self.chunk_rows(query.shape[0], len(heads), call.n_keys, call.n_queries))
        out[:, :, idx] = sub.to(out.dtype)
        return out

    def _plan(self, layer: int, decoding: bool) -> eager.LayerPlan:
        plans = self.act.work.plans
        key = (layer, decoding)
        if key not in plans:
            plans[key] = eager.compile_plan(self.spec, layer, decoding)
        return plans[key]

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
        if not self.specs:
            return set()
        return {e.source.head for e in self.spec.edits
                if isinstance(e, PatternEcho) and e.active(decoding) and e.source.layer == layer}


def _fused_ok(query, plan: eager.LayerPlan, call: AttentionCall, watchers: list[StatsCollector]) -> bool:
    """Use the fused Triton kernel: CUDA (see probe.kernels), supported plan and call, no gradients, one request."""
    from . import kernels

    if kernels.kernel_backend(query, plan, call) is None:
        return False
    if torch.is_grad_enabled() and query.requires_grad:  # the kernel has no backward
        return False
    if watchers and query.shape[0] != 1:
        return False
    return _one_request(watchers)


def _one_request(watchers: list[StatsCollector]) -> bool:
    """Every watcher asks for the same groups, rows and columns (one pass serves them all)."""
    return len({(w.request.groups, w.request.from_pos, w.request.received, w.request.output)
                for w in watchers}) <= 1


def _attend_fused(query, key, value, call: AttentionCall, plan, watchers) -> torch.Tensor | None:
    """Kernel path: row statistics go to ``StatsCollector.on_stats``; None when the kernel declines or fails."""
    from . import kernels

    req = watchers[0].request if watchers else None
    rows = torch.nonzero(call.q_pos[0] >= req.from_pos).flatten() if req else None
    row0 = (int(rows[0]) if rows.numel() else call.n_queries) if req else 0
    try:
        out, stats, col = kernels.fused_attend(query, key, value, call=call, plan=plan,
                                               groups=[(g.start, g.stop) for g in req.groups] if req else (),
                                               stats=bool(watchers), received=bool(req and req.received),
                                               received_from=row0)
    except InputError:
        return None
    except Exception as exc:  # a kernel that fails here must not break the probe: this call runs eager
        if not _KERNEL_WARNED.get():  # once per calling context (thread or task)
            _KERNEL_WARNED.set(True)
            warnings.warn(f"fused Triton attention failed ({type(exc).__name__}: {exc}); these calls use the "
                          "eager engine (set HEADWISE_KERNELS=0 to skip the kernel)", RuntimeWarning, stacklevel=2)
        return None
    for c in watchers:
        c.on_stats(call.layer, call, stats, col)
    return out


def _wants(tap, layer: int) -> bool:
    layers = getattr(tap, "layers", None)
    return layers is None or layer in layers


def headwise_attention(module, query, key, value, attention_mask, *, _headwise_native: str = "sdpa", **kwargs):
    """The registered attention function: the model's own unless the calling context has something active."""
    rt: Runtime | None = getattr(module, "_headwise_rt", None)
    act = active_state.current(rt) if rt is not None else None
    if act is None or act.idle:
        fn = native.native_function(module, rt.native if rt is not None else _headwise_native)
        return fn(module, query, key, value, attention_mask, **kwargs)
    return Engine(rt, act).attend(module, query, key, value, attention_mask, kwargs), None


def _layout(hf) -> HeadLayout:
    cfg = hf.config
    return HeadLayout(cfg.num_hidden_layers, cfg.num_attention_heads,
                      getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def install(hf) -> Runtime:
    """Route ``hf``'s attention through headwise (idempotent); returns its immutable :class:`Runtime`.

    Raises :class:`UnsupportedModelError` when the model does not compute its attention through
    ``AttentionInterface`` (checked on a few tokens, see :func:`probe.native.verify`); the engine's
    refusal (or None) is recorded in the runtime once, here.
    """
    rt = getattr(hf, "_headwise_rt", None)
    if rt is not None:
        if hf.config._attn_implementation != rt.name:  # switched away (e.g. to eager for a reference): back
            hf.set_attn_implementation(rt.name)
        return rt
    impl = native.native_of(hf.config._attn_implementation)
    native.guard(hf, impl)
    allocator.tune()
    rt = Runtime(_layout(hf), impl)
    native.register(impl, headwise_attention)
    tagged = [m for m in hf.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        hf.set_attn_implementation(rt.name)
        _tag(tagged + [hf], rt)
        rt = replace(rt, refusal=native.verify(hf, rt, lambda check: active_state.attached(rt, "taps", check)))
        _tag(tagged + [hf], rt)
    except Exception:
        for mod in tagged + [hf]:
            mod.__dict__.pop("_headwise_rt", None)
        if hf.config._attn_implementation == rt.name:
            hf.set_attn_implementation(impl)
        raise
    return rt


def _tag(modules, rt: Runtime) -> None:
    for mod in modules:
        mod._headwise_rt = rt


def _engine(model) -> Runtime:
    """The model's runtime, refusing now (before any work) when its eager engine was refused at install."""
    rt = install(_hf(model))
    if rt.refusal:
        raise UnsupportedModelError(rt.refusal)
    return rt


def _hf(model):
    return getattr(model, "hf", model)


@contextmanager
def intervene(model, spec: InterventionSpec) -> Iterator[InterventionSpec]:
    """Apply ``spec`` to a headwise ``Model`` or a plain HF model, in the calling thread or task only; removed on exit.

    >>> import torch
    >>> from probe import InterventionSpec, Uniform, load_model
    >>> m = load_model("tiny-llama")
    >>> ids = m.encode("hello")
    >>> with intervene(m, InterventionSpec([Uniform(heads=["L1H0", "L1H1"])])):
    ...     edited = m.hf(ids).logits
    >>> torch.equal(edited, m.hf(ids).logits)   # edited inside the block, plain again after it
    False
    """
    rt = _engine(model)
    spec.validate(rt.layout, n_ctx=context_length(_hf(model).config))
    with active_state.attached(rt, "specs", spec):
        yield spec


@contextmanager
def collect_stats(model, request: StatsRequest | None = None) -> Iterator[StatsCollector]:
    """Collect :class:`HeadStats` from every forward (and decode step) the calling context runs in the block."""
    hf = _hf(model)
    rt = _engine(hf)
    request = request or StatsRequest()
    for layer in request.layers or ():
        rt.layout.check_layer(layer)
    collector = StatsCollector(request, rt.layout.n_layers, rt.layout.n_heads,
                               getattr(model, "model_id", hf.config.name_or_path))
    with active_state.attached(rt, "collectors", collector):
        yield collector


def paused(model, collector: StatsCollector):
    """A context manager that pauses ``collector`` for its block (e.g. a fast prefill before decoding)."""
    return active_state.detached(install(_hf(model)), "collectors", collector)


@contextmanager
def tap(model, observer: Tap) -> Iterator[Tap]:
    """Attach an observer (see :class:`Tap`) for the duration of the block, in the calling context."""
    rt = _engine(model)
    with active_state.attached(rt, "taps", observer):
        yield observer


def memory_budget(model, budget_bytes: int):
    """Cap the scores one attention call holds (sets the query-chunk size) in the calling context's block."""
    return active_state.budget(install(_hf(model)), budget_bytes)


class Applied:
    """Handle for a spec applied in the calling thread or task until :meth:`remove` (calibration at inference)."""

    def __init__(self, model, spec: InterventionSpec):
        self._rt = _engine(model)
        spec.validate(self._rt.layout, n_ctx=context_length(_hf(model).config))
        self._spec: InterventionSpec | None = spec
        active_state.add(self._rt, "specs", spec)

    @property
    def active(self) -> bool:
        """Whether the spec is active in the calling context."""
        return self._spec is not None and self._rt.active().holds("specs", self._spec)

    def remove(self) -> None:
        """Remove the spec (idempotent); it must be called from the context that applied it."""
        if self._spec is None:
            return
        if not active_state.remove(self._rt, "specs", self._spec):
            raise InputError("this calibration was applied in another thread or task: call remove() there "
                             "(apply() acts only in the context that called it)")
        self._spec = None

    def __enter__(self) -> "Applied":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(model, spec: InterventionSpec) -> Applied:
    """Apply ``spec`` (forward and ``generate``) in the calling thread or asyncio task until ``.remove()``.

    Like every headwise state, an applied spec belongs to the calling context, not to the model:
    other threads (a second dashboard session, a server's other requests) keep the plain model;
    asyncio tasks created afterwards inherit it; a new thread does not (wrap its target in
    ``contextvars.copy_context().run`` to carry it over). A web app applies it per request or
    session (``with apply(model, spec): ...``), never once for everyone.

    >>> from probe import InterventionSpec, ZeroAblate, load_model
    >>> m = load_model("tiny-llama")
    >>> handle = apply(m, InterventionSpec([ZeroAblate(heads=["L0H0"])]))
    >>> out = m.hf.generate(m.encode("ab"), max_new_tokens=2, do_sample=False)
    >>> handle.remove()
    """
    return Applied(model, spec)
