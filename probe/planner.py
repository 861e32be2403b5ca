"""Time estimates made before a long run, calibrated on this machine (never hard-coded figures).

A forward costs ``a T + L (c T + b T^2)``: the linear part (projections, MLP, norms) and, per layer,
the attention (causal, ``~T^2 / 2`` scores per head, plus a per-row part). The statistics pass adds
``L (r T + s T^2)`` (one more causal pass over the scores). Calibration measures each part once per
process, at the sizes that isolate it:

- ``b, c`` and ``s, r``: the model's attention shape (heads, KV heads, head size) on random tensors
  at the two sizes of :data:`ATTN_TOKENS`: one flash call, and one :func:`probe.fast.stats_attend`
  call (for ``output="pass"``, the pass building its own output, at :data:`PASS_TOKENS`: :func:`calibrate_pass`);
  the line through both sizes (a per-row and a per-score cost) extrapolates to long inputs
  better than ``t / T^2`` at one size (which charges the per-row cost as if it grew with ``T^2``);
- ``a``: a plain forward of the model at :data:`FORWARD_TOKENS` tokens minus its attention share.

The estimate is as good as the machine is steady: on a shared machine it reads the load at calibration.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from .compat import last_logits_only

FORWARD_TOKENS = 128
ATTN_TOKENS = (512, 2048)
PASS_TOKENS = (2048, 4096)


@dataclass(frozen=True)
class TimeModel:
    """Seconds per token (``linear``), per squared token per layer (``attention``, ``stats``) and per
    token per layer (``attention_rows``, ``stats_rows``: what a call costs per query row)."""

    linear: float
    attention: float
    stats: float
    n_layers: int
    attention_rows: float = 0.0
    stats_rows: float = 0.0
    pass_stats: float | None = None       # the same two costs for ``output="pass"`` (the pass builds the
    pass_stats_rows: float | None = None  # output, no flash call); None: not calibrated (calibrate_pass)

    def plain(self, n_tokens: int) -> float:
        return self.linear * n_tokens + self.n_layers * (self.attention_rows * n_tokens + self.attention * n_tokens ** 2)

    def stream(self, n_tokens: int, output: str = "model") -> float:
        """A prefill with streaming statistics on every layer (the fast statistics path; ``output``: see
        :class:`probe.stats.StatsRequest`)."""
        rows, square = self.stats_rows, self.stats
        if output == "pass" and self.pass_stats is not None:
            rows, square = self.pass_stats_rows, self.pass_stats
        return self.plain(n_tokens) + self.n_layers * (rows * n_tokens + square * n_tokens ** 2)


def fit_rows_and_squares(t1: float, t2: float, n1: int, n2: int) -> tuple[float, float]:
    """``(per_row, per_square)`` of ``t = per_row n + per_square n^2`` through ``(n1, t1)`` and ``(n2, t2)``.

    Both are kept >= 0 (timing noise can tilt the line): a negative slope falls back to ``t2 / n2^2``
    alone, a negative intercept to the line through the origin and the larger size.

    >>> fit_rows_and_squares(1 * 10 + 2 * 100, 1 * 20 + 2 * 400, 10, 20)
    (1.0, 2.0)
    """
    square = (t2 / n2 - t1 / n1) / (n2 - n1)
    if square <= 0:
        return 0.0, max(t2, 0.0) / n2 ** 2
    rows = t1 / n1 - square * n1
    if rows < 0:
        return 0.0, max(t2, 0.0) / n2 ** 2
    return rows, square


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
    key = (model.weights_hash, torch.get_num_threads())
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    H, KV, D = model.n_heads, model.n_kv_heads, model.d_head
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        flash_s, stats_s = zip(*(_time_attention(H, KV, D, n, g) for n in ATTN_TOKENS))
        ids = torch.randint(0, model.hf.config.vocab_size, (1, FORWARD_TOKENS), generator=g)
        t_fwd = _median_of(lambda: model.hf(ids, use_cache=False, **last_logits_only(model.hf)))
    n1, n2 = ATTN_TOKENS
    att_rows, att = fit_rows_and_squares(*flash_s, n1, n2)
    stats_rows, stats = fit_rows_and_squares(*(max(s - f, 0.0) for s, f in zip(stats_s, flash_s)), n1, n2)
    attn_fwd = model.n_layers * (att_rows * FORWARD_TOKENS + att * FORWARD_TOKENS ** 2)
    linear = max(t_fwd - attn_fwd, 0.0) / FORWARD_TOKENS
    tm = TimeModel(linear=linear, attention=att, stats=stats, n_layers=model.n_layers,
                   attention_rows=att_rows, stats_rows=stats_rows)
    _CALIBRATED[key] = tm
    return tm


def calibrate_pass(model) -> TimeModel:
    """:func:`calibrate` plus the costs of ``output="pass"`` (measured only when asked; cached per process).

    The pass building its own output costs little more than a flash call at 2k tokens and grows faster
    than ``T^2`` beyond (its keys and values leave the cache), so it is timed at :data:`PASS_TOKENS`,
    nearer the long runs it predicts.
    """
    tm = calibrate(model)
    key = ("pass", model.weights_hash, torch.get_num_threads())
    if key not in _CALIBRATED:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            times = [_time_attention(model.n_heads, model.n_kv_heads, model.d_head, n, g, own_output=True)
                     for n in PASS_TOKENS]
        rows, square = fit_rows_and_squares(*(max(p - f, 0.0) for f, p in times), *PASS_TOKENS)
        _CALIBRATED[key] = dataclasses.replace(tm, pass_stats=square, pass_stats_rows=rows)
    return _CALIBRATED[key]


def _time_attention(H: int, KV: int, D: int, n: int, g: torch.Generator, own_output: bool = False
                    ) -> tuple[float, float]:
    """``(flash, flash + statistics)`` seconds of one layer's attention at ``n`` tokens, random tensors
    (``own_output``: the statistics pass building the output instead, ``output="pass"``)."""
    from . import fast
    from .call import AttentionCall
    from .eager import LayerPlan, Scratch

    q = torch.randn(1, H, n, D, generator=g)
    k, v = torch.randn(1, KV, n, D, generator=g), torch.randn(1, KV, n, D, generator=g)
    call, scratch = AttentionCall.plain(D ** -0.5, n, n), Scratch()
    groups = [(0, 1), (n // 2, n // 2 + 32)]
    return (_median_of(lambda: fast.flash(q, k, v, call.scaling)),
            _median_of(lambda: fast.stats_attend(q, k, v, call, LayerPlan(), groups, scratch=scratch,
                                                 own_output=own_output)))


def human_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"
