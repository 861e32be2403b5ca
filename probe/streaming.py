"""High-level streaming runs: statistics of a long prefill, and greedy decoding with statistics.

>>> from probe import load_model, KeyGroup
>>> m = load_model("tiny-llama")
>>> st = stream_stats(m, "hello world", groups=[KeyGroup("first", 0, 1)])
>>> tuple(st.entropy.shape), st.group_names
((2, 4, 11), ('first',))
"""
from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from .capture import _check_ids
from .compat import last_logits_only, output_cache
from .checks import check_generation
from .decoding import greedy, stop_ids
from .interventions import InterventionSpec
from .memory import Estimate, activation_bytes, stream_estimate
from .planner import calibrate, calibrate_pass, human_seconds
from .records import run_metadata
from .runtime import chunk_rows, collect_stats, install, intervene, memory_budget, paused
from .stats import HeadStats, StatsRequest

ANNOUNCE_FROM = 2048  # print the memory estimate before runs at least this long


def stream_stats(model, text: str | torch.Tensor, *, groups=(), layers=None, spec: InterventionSpec | None = None,
                 budget: int | None = None, received: bool = True, verbose: bool = True, output: str = "model"
                 ) -> HeadStats:
    """Per-head statistics of one prefill, computed chunk by chunk (never ``T x T`` per head).

    ``output="pass"``: each layer's attention output comes from the statistics pass itself (no second
    attention call on the CPU path: 1.25-1.31x a plain forward at 8k tokens instead of 1.6x), equal
    to the model's own to float32 rounding but not bit for bit; ``"model"`` (default) keeps it bit for bit.

    >>> from probe import KeyGroup, load_model
    >>> st = stream_stats(load_model("tiny-llama"), "abcd", groups=[KeyGroup("first", 0, 1)])
    >>> tuple(st.max_prob.shape)            # [layer, head, query]
    (2, 4, 4)
    >>> float(st.mass("first")[0, 0, 0])    # the first query can only see the first key
    1.0
    """
    ids = model.encode(text) if isinstance(text, str) else _check_ids(model, text)
    request = StatsRequest(layers=None if layers is None else tuple(layers), groups=tuple(groups), received=received,
                           output=output)
    rt = install(model.hf)
    with ExitStack() as stack:
        if budget:
            stack.enter_context(memory_budget(model, budget))
        _announce(model, rt, ids.shape[1], len(request.groups), verbose, output=output)
        collector = stack.enter_context(collect_stats(model, request))
        if spec:
            stack.enter_context(intervene(model, spec))
        with torch.no_grad():
            model.hf(ids, use_cache=False, **last_logits_only(model.hf))
    return collector.result(ids[0].tolist(), run_metadata(weights_hash=model.weights_hash, phase="prefill",
                                                                 attention_output=output))


@dataclass(frozen=True)
class Generation:
    prompt_ids: torch.Tensor     # [1, T]
    new_ids: torch.Tensor        # [1, n]
    stats: HeadStats | None

    @property
    def n_new(self) -> int:
        return self.new_ids.shape[1]


def generate_with_stats(model, text: str | torch.Tensor, *, max_new_tokens: int = 50, groups=(), layers=None,
                        prefill_spec: InterventionSpec | None = None, decode_spec: InterventionSpec | None = None,
                        stats_in_prefill: bool | str = False, stop_at_newline: bool = False,
                        budget: int | None = None, verbose: bool = False) -> Generation:
    """Greedy decoding with the KV cache; statistics on decode rows (and prefill rows if asked).

    The prefill runs on the fast path unless it needs statistics or ``prefill_spec``; every decode
    step is one query row through the streaming engine with ``decode_spec`` applied.
    ``stats_in_prefill="last"`` adds the last prefill row (the query that produced the first new
    token), ``True`` every prefill row.

    >>> from probe import load_model
    >>> g = generate_with_stats(load_model("tiny-llama"), "abc", max_new_tokens=3, stats_in_prefill="last")
    >>> g.n_new, g.stats.query_pos.tolist()    # rows: the last prompt row, then the decode steps
    (3, [2, 3, 4])
    """
    ids = model.encode(text) if isinstance(text, str) else _check_ids(model, text)
    check_generation(model, ids.shape[1], max_new_tokens)  # before any work
    from_pos = ids.shape[1] - 1 if stats_in_prefill == "last" else 0
    request = StatsRequest(layers=None if layers is None else tuple(layers), groups=tuple(groups), from_pos=from_pos)
    rt = install(model.hf)
    _announce(model, rt, ids.shape[1] + max_new_tokens, len(request.groups), verbose, timed=False)
    eos = stop_ids(model, newline=stop_at_newline)
    with ExitStack() as stack:
        if budget:
            stack.enter_context(memory_budget(model, budget))
        collector = stack.enter_context(collect_stats(model, request))
        with torch.no_grad():
            with (ExitStack() if stats_in_prefill else paused(model, collector)), _maybe_spec(model, prefill_spec):
                out = model.hf(ids, use_cache=True, **last_logits_only(model.hf))
            with _maybe_spec(model, decode_spec):
                new = greedy(model, out.logits[0, -1], output_cache(out), max_new_tokens=max_new_tokens, stop=eos)
    stats = None
    if collector.has_rows:
        stats = collector.result(ids[0].tolist() + new, run_metadata(weights_hash=model.weights_hash))
    return Generation(ids, torch.tensor([new], dtype=torch.long), stats)


def _maybe_spec(model, spec):
    return intervene(model, spec) if spec else ExitStack()


@dataclass(frozen=True)
class StreamPlan:
    """What a streaming run will cost, said before it starts: memory, time (calibrated here), one line."""

    memory: Estimate
    seconds: float | None  # None: not estimated (decoding)

    @property
    def line(self) -> str:
        if self.seconds is None:
            return str(self.memory)
        return f"{self.memory}, ~{human_seconds(self.seconds)} (time calibrated on this machine)"


def plan_stream(model, n_tokens: int, n_groups: int, rt=None, timed: bool = True, output: str = "model"
                ) -> StreamPlan:
    """The estimate of a prefill with statistics on every layer (:mod:`probe.planner` for the time model).

    ``timed=False`` skips the time (and its calibration): decoding's per-step cost is not modelled.
    """
    from . import fast

    rt = rt or install(model.hf)
    chunk = chunk_rows(rt.active().budget, 1, model.n_heads, n_tokens, n_tokens)
    chunk = min(chunk, fast.cache_rows(model.n_heads, n_tokens))  # the fast path's cache-sized chunks
    est = stream_estimate(model.n_layers, model.n_heads, n_tokens, chunk, n_groups, d_head=model.d_head,
                          activations=activation_bytes(model.hf.config, n_tokens))
    if not timed:
        return StreamPlan(est, None)
    return StreamPlan(est, (calibrate_pass if output == "pass" else calibrate)(model).stream(n_tokens, output))


def _announce(model, rt, n_tokens: int, n_groups: int, verbose: bool, timed: bool = True, output: str = "model"
              ) -> None:
    if verbose and n_tokens >= ANNOUNCE_FROM:
        plan = plan_stream(model, n_tokens, n_groups, rt, timed, output)
        print(f"headwise: {plan.line}{_split_note(model, plan.memory)}", file=sys.stderr, flush=True)


def _split_note(model, est) -> str:
    """For a model split over devices: what each device needs (working set + paged-in weights; results on the CPU)."""
    if getattr(model, "device_map", None) is None:
        return ""
    from .memory import human
    from .models.placement import memory_plan

    plan = memory_plan(model.hf, est.work, est.bytes - est.work)
    return "; split: " + ", ".join(f"{dev} ~{human(n)}" for dev, n in plan.items())
