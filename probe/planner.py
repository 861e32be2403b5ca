"""Time estimates made before a long run, calibrated on this machine (never hard-coded figures).

A forward costs ``a T + b T^2``: the linear part (projections, MLP, norms) and the attention
(causal, ``~T^2 / 2`` scores per head). The statistics pass adds ``s T^2`` (one more causal pass
over the scores). Calibration measures each part once per process, at the sizes that isolate it:

- ``b`` and ``s``: the model's attention shape (heads, head size) on random tensors at
  :data:`ATTN_TOKENS`: one flash call, and one :func:`probe.fast.stats_attend` call;
- ``a``: a plain forward of the model at :data:`FORWARD_TOKENS` tokens minus its attention share.

Then ``plain(T) = a T + L b T^2`` and ``stream(T) = plain(T) + L s T^2`` for ``L`` layers. The
estimate is as good as the machine is steady: on a shared machine it reads the load at calibration.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

FORWARD_TOKENS = 128
ATTN_TOKENS = 1024


@dataclass(frozen=True)
class TimeModel:
    """Seconds per token (``linear``) and per squared token per layer (``attention``, ``stats``)."""

    linear: float
    attention: float
    stats: float
    n_layers: int

    def plain(self, n_tokens: int) -> float:
        return self.linear * n_tokens + self.n_layers * self.attention * n_tokens ** 2

    def stream(self, n_tokens: int) -> float:
        """A prefill with streaming statistics on every layer (the fast statistics path)."""
        return self.plain(n_tokens) + self.n_layers * self.stats * n_tokens ** 2


_CALIBRATED: dict[tuple, TimeModel] = {}


def _median_of(fn, repeats: int = 3) -> float:
    """The median wall time of ``repeats`` calls after one warm-up: the machine as a long run will see it
    (a minimum would describe its quietest moment, and under-predict on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(model) -> TimeModel:
    """Measure this machine's :class:`TimeModel` for ``model`` (a headwise ``Model``); cached per process."""
    from . import fast
    from .call import AttentionCall
    from .eager import LayerPlan, Scratch

    key = (model.weights_hash, torch.get_num_threads())
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    H, D, T1 = model.n_heads, model.d_head, ATTN_TOKENS
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T1, D, generator=g) for _ in range(3))
    call = AttentionCall.plain(D ** -0.5, T1, T1)
    scratch = Scratch()
    with torch.no_grad():
        t_flash = _median_of(lambda: fast.flash(q, k, v, call.scaling))
        t_stats = _median_of(lambda: fast.stats_attend(q, k, v, call, LayerPlan(), [(0, 1), (T1 // 2, T1 // 2 + 32)],
                                                     scratch=scratch))
        ids = torch.randint(0, model.hf.config.vocab_size, (1, FORWARD_TOKENS), generator=g)
        kw = {"logits_to_keep": 1} if "logits_to_keep" in _forward_args(model.hf) else {}
        t_fwd = _median_of(lambda: model.hf(ids, use_cache=False, **kw))
    attention = t_flash / T1 ** 2
    linear = max(t_fwd - model.n_layers * attention * FORWARD_TOKENS ** 2, 0.0) / FORWARD_TOKENS
    tm = TimeModel(linear=linear, attention=attention, stats=max(t_stats - t_flash, 0.0) / T1 ** 2,
                   n_layers=model.n_layers)
    _CALIBRATED[key] = tm
    return tm


def _forward_args(hf) -> set[str]:
    import inspect

    return set(inspect.signature(hf.forward).parameters)


def human_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"
