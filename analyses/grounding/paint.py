"""PAINT as its paper and code state it, for a text model: boost the *passage* tokens only.

PAINT ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language
Model", arXiv 2501.12206; code hasanar1f/PAINT, ``modPAI/attention.py`` and
``llava/model/multimodal_encoder/clip_encoder.py``) edits pre-softmax scores of the **last query
row** in layers ``2..L-1`` (every head): ``z' = z + alpha |z|`` with ``alpha = 0.7`` on the most
relevant context tokens and ``0.3`` on "summary" tokens. In the code the context is the image
tokens, and the two sets come from the vision encoder's attention of its CLS query:

* top: the 25% of image tokens most attended in the encoder's **first** layer (heads summed);
* summary: the tokens whose attention in the encoder's **second-to-last** layer is an outlier
  (``> Q3 + 1.5 IQR``); top := top minus summary; tokens in neither set are not boosted.

For a text model the context is the source **passage** (never the instructions, the question or
the answer header), and the LM itself plays the encoder: its last prompt row plays the CLS query.
``reading="code"`` (default) follows the code with the LM's layer 0 and layer ``L-2``;
``reading="rest"`` is the simpler reading of the paper's sentence: the top 25% of passage tokens
by last-row attention averaged over layers ``2..L-1`` (heads summed) get 0.7, every other passage
token 0.3. The sets are chosen once, from the unedited prompt, and kept for the whole generation
(PAINT computes them once per image). See docs/methods.md §5.

>>> select_tokens(torch.tensor([[[0., 5, 1, 4, 0]], [[0., 1, 1, 1, 0]], [[0., 0, 9, 0, 0]]]), [1, 2, 3],
...               top_frac=0.34)          # layer 0 ranks 1 first; layer L-2 = 1 has no outlier
([1], [])
"""
from __future__ import annotations

import math

import numpy as np
import torch

from probe import InterventionSpec, SpanBoost, tap
from probe.errors import InputError
from probe.heads import HeadId

READINGS = ("code", "rest")
ALPHA_TOP, ALPHA_REST = 0.7, 0.3


def passage_positions(tokenizer, text: str, span: tuple[int, int]) -> list[int]:
    """Token positions (as :meth:`probe.Model.encode` tokenizes ``text``) lying wholly inside characters ``span``."""
    a, b = span
    if not 0 <= a < b <= len(text):
        raise InputError(f"passage span {span} is empty or outside the {len(text)}-character prompt")
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    pos = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s >= a and e <= b]
    if not pos:
        raise InputError(f"no token lies inside the passage characters {span}: give a longer passage")
    return pos


class _LastRow:
    """on_probs observer keeping each layer's last-row attention ``[H, K]`` (batch row 0)."""

    layers = None

    def __init__(self, last: int):
        self.last, self.rows = last, {}

    def on_probs(self, layer, q_pos, probs):
        if int(q_pos[-1]) == self.last:
            self.rows[layer] = probs[0, :, -1].detach().float().clone()


@torch.no_grad()
def last_row_attention(model, ids: torch.Tensor) -> torch.Tensor:
    """``[layer, head, key]`` attention of the prompt's last query row (plain model)."""
    rec = _LastRow(ids.shape[1] - 1)
    with tap(model, rec):
        model.hf(input_ids=ids, logits_to_keep=1)
    return torch.stack([rec.rows[l] for l in range(model.n_layers)])


def _outliers(x: np.ndarray) -> np.ndarray:
    q1, q3 = np.percentile(x, [25, 75])
    return x > q3 + 1.5 * (q3 - q1)


def select_tokens(attn: torch.Tensor, passage: list[int], *, reading: str = "code", top_frac: float = 0.25,
                  top_layer: int = 0, summary_layer: int | None = None) -> tuple[list[int], list[int]]:
    """``(alpha-0.7 positions, alpha-0.3 positions)`` among ``passage`` from last-row attention ``[L, H, K]``.

    ``code``: top = the ``top_frac`` most attended in ``top_layer`` minus the summary tokens
    (IQR outliers in ``summary_layer``, default ``L-2``); ``rest``: top by the mean over layers
    ``2..L-1``, every other passage token gets 0.3.
    """
    if reading not in READINGS:
        raise InputError(f"PAINT reading must be one of {READINGS}, not {reading!r}")
    if not passage:
        raise InputError("no passage tokens to boost")
    L = attn.shape[0]
    summed = attn.double().sum(1)                                          # [L, K] heads summed
    idx = np.asarray(sorted(set(passage)))
    k = max(1, math.floor(len(idx) * top_frac))
    if reading == "rest":
        score = summed[2:L].mean(0) if L > 2 else summed.mean(0)
        top = idx[np.argsort(-score[idx].numpy(), kind="stable")[:k]]
        return sorted(top.tolist()), sorted(set(idx.tolist()) - set(top.tolist()))
    top = idx[np.argsort(-summed[top_layer, idx].numpy(), kind="stable")[:k]]
    sl = L - 2 if summary_layer is None else summary_layer
    summary = idx[_outliers(summed[max(sl, 0), idx].numpy())]
    return sorted(set(top.tolist()) - set(summary.tolist())), sorted(summary.tolist())


def _runs(positions) -> tuple[tuple[int, int], ...]:
    """Half-open ranges covering ``positions`` exactly."""
    out, ps = [], sorted(set(int(p) for p in positions))
    for p in ps:
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return tuple((a, b) for a, b in out)


def paint_heads(model, heads=None) -> list[HeadId]:
    """Every head of layers ``2..L-1`` (PAINT's layers), or the given heads."""
    if heads is not None:
        return list(heads)
    if model.n_layers < 3:
        raise InputError(f"PAINT edits layers 2..L-1; {getattr(model, 'model_id', 'the model')} has only "
                         f"{model.n_layers} layers: give the heads explicitly")
    return [HeadId(l, h) for l in range(2, model.n_layers) for h in range(model.n_heads)]


def paint_spec(heads, top, rest, alpha_top: float = ALPHA_TOP, alpha_rest: float = ALPHA_REST) -> InterventionSpec:
    """Two last-row boosts on ``heads``: ``alpha_top`` on ``top`` positions, ``alpha_rest`` on ``rest``."""
    if set(top) & set(rest):
        raise InputError("a token cannot get both boosts: the top and rest sets must be disjoint")
    edits = [SpanBoost(heads=tuple(heads), spans=_runs(p), alpha=a, rows="last")
             for p, a in ((top, alpha_top), (rest, alpha_rest)) if len(p)]
    if not edits or not heads:
        raise InputError("nothing to boost: PAINT needs heads and at least one passage token")
    return InterventionSpec(edits)


def paint_for(model, prompt: str, passage: tuple[int, int], *, reading: str = "code", heads=None,
              top_frac: float = 0.25) -> tuple[torch.Tensor, InterventionSpec, dict]:
    """Ids, the PAINT spec and the chosen positions for ``prompt`` whose passage is characters ``passage``."""
    ids = model.encode(prompt)
    pos = passage_positions(model.tokenizer, prompt, passage)
    top, rest = select_tokens(last_row_attention(model, ids), pos, reading=reading, top_frac=top_frac)
    return ids, paint_spec(paint_heads(model, heads), top, rest), {"passage": pos, "top": top, "rest": rest}
