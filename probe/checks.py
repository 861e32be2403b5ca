"""Range and integrity checks: for the numbers probe loads from files, and for limits before work.

A loaded file is checked field by field (finite values, probabilities in ``[0, 1]``, shapes
against each other and against the metadata); the first failure raises
:class:`~probe.errors.CorruptFileError` naming the file, the field and what was found.
:func:`check_generation` refuses a decode that would run past the model's context before any
token is computed.

>>> import torch
>>> c = FileCheck("demo.safetensors")
>>> c.probabilities("max_prob", torch.tensor([0.2, 1.0]))
>>> c.probabilities("max_prob", torch.tensor([0.2, float("nan")]))
Traceback (most recent call last):
...
probe.errors.CorruptFileError: demo.safetensors: max_prob holds 1 non-finite value (nan): the file is damaged; regenerate it
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ContextLengthError, CorruptFileError, InputError

TOL = 1e-3  # float32 sums of probabilities may exceed 1 by rounding


@dataclass(frozen=True)
class FileCheck:
    """Checks on the contents of one file; each raises :class:`CorruptFileError` naming ``path``."""

    path: object
    fix: str = "regenerate it"

    def fail(self, what: str) -> None:
        raise CorruptFileError(f"{self.path}: {what}: the file is damaged; {self.fix}")

    def shape(self, name: str, t: torch.Tensor, want: Sequence[int | None]) -> None:
        """``t`` has ``len(want)`` dims and every non-None entry of ``want``."""
        got = tuple(t.shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = tuple("*" if w is None else w for w in want)
            self.fail(f"{name} has shape {got}, expected {shown}")

    def finite(self, name: str, t: torch.Tensor) -> None:
        if t.is_floating_point():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                self.fail(f"{name} holds {int(bad.sum())} non-finite value ({t[bad].flatten()[0].item()})")

    def between(self, name: str, t: torch.Tensor, lo: float | None, hi: float | torch.Tensor | None,
                tol: float = TOL) -> None:
        """Finite and within ``[lo - tol, hi + tol]`` (``hi`` may be a broadcastable tensor)."""
        self.finite(name, t)
        if not t.numel():
            return
        x = t.double()
        if lo is not None and bool((x < lo - tol).any()):
            self.fail(f"{name} holds {x.min().item():g}, below {lo:g}")
        if hi is not None:
            over = x > torch.as_tensor(hi, dtype=torch.float64) + tol
            if bool(over.any()):
                self.fail(f"{name} holds {x[over].max().item():g}, above its bound")

    def probabilities(self, name: str, t: torch.Tensor) -> None:
        self.between(name, t, 0.0, 1.0)

    def integers(self, name: str, t: torch.Tensor) -> None:
        if t.is_floating_point() or t.dtype == torch.bool:
            self.fail(f"{name} has dtype {t.dtype}, expected integers")

    def increasing(self, name: str, values: Sequence[int], lo: int = 0) -> None:
        """Strictly increasing integers ``>= lo`` (no repeats, no swaps)."""
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
            self.fail(f"{name} {_short(list(values))} are not all integers")
        vals = [int(v) for v in values]
        if vals and vals[0] < lo:
            self.fail(f"{name} start at {vals[0]}, below {lo}")
        for a, b in zip(vals, vals[1:]):
            if b <= a:
                self.fail(f"{name} {_short(vals)} are {'repeated' if a == b else 'out of order'} at {a}, {b}")

    def unique_strings(self, name: str, values: Sequence) -> None:
        if any(not isinstance(v, str) for v in values):
            self.fail(f"{name} {_short(list(values))} are not all strings")
        if len(set(values)) != len(values):
            self.fail(f"{name} {_short(list(values))} hold a repeated name")


def _short(vals: list) -> str:
    return str(vals) if len(vals) <= 8 else f"[{', '.join(map(str, vals[:8]))}, ...]"


def meta_list(check: FileCheck, meta: dict, key: str) -> list:
    """``meta[key]`` as a list (missing or not a list: the file is damaged)."""
    if key not in meta:
        check.fail(f"the metadata has no {key!r}")
    value = meta[key]
    if not isinstance(value, list):
        check.fail(f"the metadata's {key!r} is {type(value).__name__}, expected a list")
    return value


def check_token_ids(check: FileCheck, ids: Sequence) -> tuple[int, ...]:
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        check.fail("token_ids are not all non-negative integers")
    return tuple(ids)


# ----------------------------------------------------------------------------- limits before work

def check_generation(model, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse a decode of ``max_new_tokens`` after ``n_prompt`` tokens that cannot fit the model's context.

    >>> from probe import load_model
    >>> check_generation(load_model("tiny-llama"), 250, 10)
    Traceback (most recent call last):
    ...
    probe.errors.ContextLengthError: the prompt is 250 tokens and max_new_tokens is 10: 260 tokens pass tiny-llama's context of 256; shorten the prompt or ask for at most 6 new tokens
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    n_ctx = getattr(model, "n_ctx", None) or context_length(getattr(model, "hf", model).config)
    total = int(n_prompt) + max_new_tokens
    if n_ctx is not None and total > n_ctx:
        room = n_ctx - int(n_prompt)
        fix = f" or ask for at most {room} new tokens" if room > 0 else f" to under {n_ctx} tokens"
        name = getattr(model, "model_id", None) or "the model"
        raise ContextLengthError(f"the prompt is {n_prompt} tokens and max_new_tokens is {max_new_tokens}: "
                                 f"{total} tokens pass {name}'s context of {n_ctx}; shorten the prompt{fix}")


def context_length(config) -> int | None:
    """The longest sequence a Hugging Face config allows (``max_position_embeddings``/``n_positions``)."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if n else None
