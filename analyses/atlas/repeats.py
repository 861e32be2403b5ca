"""Induction, previous-token and duplicate-token scores from streaming statistics (docs/methods.md §7).

A sequence is ``n`` random tokens (distinct, drawn from ``token_range``) followed by the same ``n``
tokens again, ``[prefix] x_1 .. x_n x_1 .. x_n``; the prefix is what the tokenizer puts before a
text (``bos="auto"``: nothing for SmolLM2), the BOS token (``"yes"``, TransformerLens'
``prepend_bos``) or nothing (``"no"``). With ``o`` prefix tokens, the second copy is rows
``i in [o+n, o+2n)``. For query row ``i`` and key ``j`` with attention ``A[i, j]`` (Olsson et al.
2022, "In-context Learning and Induction Heads"; Wang et al. 2022 for the classes):

* *previous-token* = mean over rows ``i >= 1`` of ``A[i, i-1]``;
* *duplicate-token* = mean over the second copy of ``A[i, i-n]`` (the earlier copy of the current
  token);
* *induction* = mean over the second copy of ``A[i, i-n+1]`` (the token after the earlier copy);
* *first-token mass* = mean over rows ``i >= 1`` of ``A[i, 0]`` (the sink mass on these inputs).

Without a prefix they are the definitions :func:`analyses.circuits.roles.repeated_token_roles`
computes from full patterns; here no ``T x T`` pattern is kept: :func:`probe.stream_stats` measures the mass
of every row on *single-key groups* ``[j, j+1)``, i.e. the column ``A[:, j]``; ``2n - 1`` keys are
needed (``T - 1`` in all), at most 16 groups per pass, so a sequence takes ``ceil((T-1)/16)`` streamed forwards
(memory ``O(L H T 16)``, through whichever path the engine picks: the fused kernels on CUDA).
Each sequence is one item, so every score has per-item values to bootstrap over.

>>> from probe import load_model
>>> m = load_model("tiny-llama")
>>> s = sequence_scores(m, repeated_sequence(m, 6, seed=0, index=0), 6)
>>> sorted(s), s["induction"].shape
(['duplicate_token', 'first_token_mass', 'induction', 'previous_token'], (2, 4))
"""
from __future__ import annotations

import numpy as np
import torch

from probe import KeyGroup, stream_stats
from probe.errors import InputError
from probe.stats import MAX_GROUPS

from ..circuits.tasks import token_range as default_range

SCORES = ("induction", "previous_token", "duplicate_token", "first_token_mass")
LABELS = {"induction": "induction (A[i, i-n+1])", "previous_token": "previous-token (A[i, i-1])",
          "duplicate_token": "duplicate-token (A[i, i-n])", "first_token_mass": "first-token mass (A[i, 0])"}


def token_ids(model, token_range: tuple[int, ...] | None) -> tuple[int, int]:
    """``[low, high)`` of the random tokens: ``token_range`` or 1000..20000 clipped to the vocabulary."""
    if token_range is None:
        return default_range(model)
    if len(token_range) != 2 or not 0 <= token_range[0] < token_range[1] <= len(model.tokenizer):
        raise InputError(f"token_range {list(token_range)} must be two ids low,high with 0 <= low < high <= "
                         f"{len(model.tokenizer)} (the vocabulary size)")
    return int(token_range[0]), int(token_range[1])


def prefix_ids(model, bos: str = "auto") -> list[int]:
    """Token ids put before a sequence: the tokenizer's own (``auto``), its BOS (``yes``) or none (``no``)."""
    tok = model.tokenizer
    if bos == "no":
        return []
    if bos == "yes":
        if tok.bos_token_id is None:
            raise InputError(f"{model.model_id}'s tokenizer has no BOS token: use bos='auto' or 'no'")
        return [int(tok.bos_token_id)]
    if bos != "auto":
        raise InputError(f"bos must be 'auto', 'yes' or 'no', not {bos!r}")
    with_, without = tok("x").input_ids, tok("x", add_special_tokens=False).input_ids
    return list(with_[:len(with_) - len(without)]) if with_[len(with_) - len(without):] == without else []


def repeated_sequence(model, n: int, *, seed: int, index: int, token_range=None, bos: str = "auto") -> torch.Tensor:
    """Sequence ``index`` of a seed: the prefix, ``n`` distinct random tokens, the same ``n`` again ``[1, o+2n]``."""
    low, high = token_ids(model, token_range)
    if high - low < n:
        raise InputError(f"only {high - low} token ids in [{low}, {high}) for {n} distinct tokens per copy: "
                         "use a shorter seq_len or a wider token_range")
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    first = torch.randperm(high - low, generator=g, device="cpu")[:n] + low
    return torch.cat([torch.tensor(prefix_ids(model, bos), dtype=torch.long, device="cpu"), first, first])[None].to(model.device)


def sequence_scores(model, ids: torch.Tensor, n: int) -> dict[str, np.ndarray]:
    """The four scores ``[layer, head]`` of one sequence ``ids [1, o+2n]`` whose last ``2n`` tokens repeat."""
    T = ids.shape[1]
    o = T - 2 * n
    if n < 2 or o < 0 or not torch.equal(ids[0, o:o + n], ids[0, o + n:]):
        raise InputError(f"a repeated sequence ends in two equal copies of n >= 2 tokens; got {T} tokens, n={n}")
    cols = _columns(model, ids)                                           # [L, H, T (rows), T-1 (keys 0..T-2)]
    rows = torch.arange(1, T, device="cpu")
    second = torch.arange(o + n, T, device="cpu")
    return {"previous_token": cols[:, :, rows, rows - 1].mean(-1).numpy(),
            "duplicate_token": cols[:, :, second, second - n].mean(-1).numpy(),
            "induction": cols[:, :, second, second - n + 1].mean(-1).numpy(),
            "first_token_mass": cols[:, :, rows, 0].mean(-1).numpy()}


def _columns(model, ids: torch.Tensor) -> torch.Tensor:
    """``A[l, h, i, j]`` for every row ``i`` and keys ``j < T - 1``, from single-key group masses."""
    T = ids.shape[1]
    keys = list(range(T - 1))
    parts = []
    for start in range(0, len(keys), MAX_GROUPS):
        groups = [KeyGroup(f"k{j}", j, j + 1) for j in keys[start:start + MAX_GROUPS]]
        st = stream_stats(model, ids, groups=groups, received=False, verbose=False)
        if st.query_pos.tolist() != list(range(T)):
            raise RuntimeError("the streaming statistics did not return one row per position")
        parts.append(st.group_mass.double().cpu())                             # [L, H, T, G]
    return torch.cat(parts, dim=-1)
