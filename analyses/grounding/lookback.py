"""Lookback ratio per layer and head at every generated token (Lookback Lens, Chuang et al. 2024).

For a decode row with query position ``p`` and context keys ``[c0, c1)``:
``A_ctx = mass_ctx / N_ctx`` and ``A_new = mass_new / N_new`` (means, not sums) and
``LR = A_ctx / (A_ctx + A_new)``. The masses come from the streaming statistics
(``KeyGroup`` masses), so no ``T x T`` pattern is ever kept.

Two readings of "new tokens" (``reading``):

* ``"code"`` (default, voidism/Lookback-Lens ``step01_extract_attns.py``): the context ends where
  the response header begins (``context_length = K - extra_prompt_length``); every key after it
  (the response header, e.g. ``"\\nAnswer:"``, plus the generated tokens) counts as new, so
  ``N_new >= 1`` from the first row on.
* ``"paper"``: new = generated tokens only (keys ``>= T_prompt``). The row that produces the first
  token sees none; there ``A_new`` is taken as 0, so ``LR = 1`` (``empty_new="one"``), or the row
  gets NaN and is skipped by span averaging (``empty_new="nan"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from probe.shapes import FeatureVector, RowRatios

from probe.errors import InputError
from probe.stats import HeadStats, KeyGroup

READINGS = ("code", "paper")


@dataclass(frozen=True)
class Regions:
    """Key regions of one prompt: context ``[ctx_start, ctx_stop)``; new keys from ``new_start``."""

    ctx_start: int
    ctx_stop: int
    new_start: int
    prompt_len: int

    def __post_init__(self):
        if not 0 <= self.ctx_start < self.ctx_stop:
            raise InputError(f"empty context span [{self.ctx_start}, {self.ctx_stop}): "
                             "give a context with at least one token before the question/answer header")
        if self.new_start < self.ctx_stop or self.new_start > self.prompt_len or self.ctx_stop > self.prompt_len:
            raise InputError(f"bad regions {self}: need ctx_stop <= new_start <= prompt_len")

    def groups(self) -> list[KeyGroup]:
        return [KeyGroup("ctx", self.ctx_start, self.ctx_stop), KeyGroup("new", self.new_start)]


def regions(prompt_len: int, ctx_start: int, ctx_stop: int, reading: str = "code") -> Regions:
    """Regions for a prompt whose context is ``[ctx_start, ctx_stop)`` (see the module docstring)."""
    if reading not in READINGS:
        raise InputError(f"reading must be one of {READINGS}, not {reading!r}")
    return Regions(ctx_start, ctx_stop, ctx_stop if reading == "code" else prompt_len, prompt_len)


def ratio(mass_ctx: torch.Tensor, mass_new: torch.Tensor, n_ctx, n_new, empty_new: str = "one") -> torch.Tensor:
    """Lookback ratio from group masses and key counts (broadcast over layer/head/row).

    >>> ratio(torch.tensor([0.6]), torch.tensor([0.2]), 3, 1)   # A_ctx=0.2, A_new=0.2
    tensor([0.5000])
    """
    n_ctx = torch.as_tensor(n_ctx, dtype=torch.float32, device=mass_ctx.device)
    n_new = torch.as_tensor(n_new, dtype=torch.float32, device=mass_ctx.device)
    if bool((n_ctx <= 0).any()):
        raise InputError("a row sees no context keys: the context span must start before the query")
    a_ctx = mass_ctx.float() / n_ctx
    a_new = torch.where(n_new > 0, mass_new.float() / n_new.clamp(min=1), torch.zeros_like(mass_new.float()))
    lr = a_ctx / (a_ctx + a_new).clamp(min=1e-12)
    if empty_new == "nan":
        lr = torch.where(n_new > 0, lr, torch.full_like(lr, float("nan")))
    elif empty_new != "one":
        raise InputError(f"empty_new must be 'one' or 'nan', not {empty_new!r}")
    return lr


def ratios_from_stats(stats: HeadStats, reg: Regions, empty_new: str = "one") -> RowRatios:
    """``[rows, layers, heads]`` lookback ratios of every row in ``stats`` (rows in ``stats.query_pos``)."""
    visible = stats.query_pos.float() + 1  # keys 0..p
    n_ctx = visible.clamp(max=reg.ctx_stop) - reg.ctx_start
    n_new = (visible - reg.new_start).clamp(min=0)
    lr = ratio(stats.mass("ctx"), stats.mass("new"), n_ctx, n_new, empty_new)  # [L, H, Q]
    return lr.permute(2, 0, 1).contiguous()


def span_feature(lr: RowRatios, start: int = 0, stop: int | None = None) -> FeatureVector:
    """Mean lookback ratio over rows ``[start, stop)`` (NaN rows skipped): the ``L*H`` span feature.

    >>> span_feature(torch.tensor([[[0.0]], [[1.0]], [[float('nan')]]])).tolist()
    [0.5]
    """
    rows = lr[start:stop]
    if rows.shape[0] == 0:
        raise InputError("the span has no generated tokens: generate at least one token before scoring")
    ok = ~torch.isnan(rows)
    if not bool(ok.any(0).all()):
        raise InputError("every row of the span lacks a ratio (no new tokens visible): use empty_new='one'")
    return (torch.where(ok, rows, torch.zeros_like(rows)).sum(0) / ok.sum(0)).flatten()
