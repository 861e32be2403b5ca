"""Retrieval score of one NIAH sample (Wu et al. 2024, docs/methods.md §1).

A copy-paste event for head (l, h) at decode step t: the argmax key j* of the attention row
inside the answer span [s, e) **and** ``prompt_ids[j*] == w_t`` (token ids compared, as the
reference compares ``inp.item() == prompt_ids[i].item()``). Sample score = #events / |span|.

Which row? The reference (``retrieval_head_detection.py``) prefills ``input_ids[:, :-1]``, feeds
the last prompt token as the first decode input, and in each step sets ``inp`` to the step's
argmax *before* ``retrieval_calculate``: the row scored with w_t is the query row that
**produced** w_t (for the first new token, the last prompt position). That is our default,
``row="producing"``. ``row="consuming"`` is the other reading: the row of the step that takes
w_t as input (position of w_t), which the reference does not use.

The stop token (newline/EOS) is not scored here: it is never part of the answer span's tokens
in our needles, so the reference could only count it in a degenerate case.
"""
from __future__ import annotations

import torch

from probe.shapes import HeadScoresT, RowArgmax

ROWS = ("producing", "consuming")


def sample_events(argmax: RowArgmax, query_pos, prompt_ids, new_ids, span: tuple[int, int],
                  row: str = "producing") -> HeadScoresT:
    """Per-head score ``[layer, head]`` of one sample = copy-paste events / |span|.

    ``argmax``: ``[layer, head, rows]`` argmax key of each recorded query row; ``query_pos``:
    absolute position of each row; ``prompt_ids``/``new_ids``: token id lists.

    >>> am = torch.tensor([[[2, 3]]])  # one layer, one head, two rows
    >>> sample_events(am, [4, 5], [9, 9, 7, 8, 1], [7, 8], (2, 4)).tolist()
    [[1.0]]
    """
    if row not in ROWS:
        from probe.errors import InputError
        raise InputError(f"row must be one of {ROWS}, not {row!r}")
    start, stop = span
    T = len(prompt_ids)
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=argmax.device)
    pos_to_row = {int(p): i for i, p in enumerate(torch.as_tensor(query_pos, device="cpu").tolist())}
    events = torch.zeros(argmax.shape[:2], dtype=torch.float64, device=argmax.device)
    for t, w in enumerate(new_ids):
        pos = T - 1 + t if row == "producing" else T + t
        r = pos_to_row.get(pos)
        if r is None:
            continue
        key = argmax[:, :, r].long()
        inside = (key >= start) & (key < stop)
        match = prompt[key.clamp(0, T - 1)] == int(w)
        events += (inside & match).double()
    return events / (stop - start)


def head_scores(per_sample: list[HeadScoresT], success: list[bool]) -> tuple[HeadScoresT, int]:
    """Mean over *successful* samples (zeros and count 0 when none succeeded)."""
    kept = [s for s, ok in zip(per_sample, success) if ok]
    if not kept:
        shape = per_sample[0].shape if per_sample else (0, 0)
        return torch.zeros(shape, dtype=torch.float64, device="cpu"), 0
    return torch.stack(kept).mean(0), len(kept)
