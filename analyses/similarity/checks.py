"""Range and shape checks on the similarity analysis' saved units (``Stage.check``).

A prompt unit holds one prompt's cosines (in ``[-1, 1]``, one per layer/head pair) and its
Jensen-Shannon sums (bits, each row in ``[0, 1]``, so a sum lies in ``[0, n_rows]``); a loss unit
one mean loss in nats (finite, >= 0) and its per-text loss sums and token counts. A unit outside
these (a damaged file: a cosine of 333334, a loss of NaN) is recomputed by the runner, so it never reaches the sharing plan.

Methods: docs/methods.md §4.
"""
from __future__ import annotations

from ..units import first_problem, out_of_range, wrong_shape
from .data import load_texts


def check_prompt(model, cfg, payload: dict) -> str | None:
    L, H = model.n_layers, model.n_heads
    n = payload["n_rows"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"n_rows is {n!r}, expected a positive integer"
    js_shape = (L * H, L * H) if cfg.head_js == "all" else (max(L - 1, 0), H, H)
    return first_problem(
        wrong_shape("layer_cos_sum", payload["layer_cos_sum"], (L, L)),
        wrong_shape("head_cos_sum", payload["head_cos_sum"], (L * H, L * H)),
        wrong_shape("layer_js_sum", payload["layer_js_sum"], (L, L)),
        wrong_shape("head_js_sum", payload["head_js_sum"], js_shape),
        out_of_range("layer_cos_sum (cosines)", payload["layer_cos_sum"], -1, 1),
        out_of_range("head_cos_sum (cosines)", payload["head_cos_sum"], -1, 1),
        out_of_range("layer_js_sum", payload["layer_js_sum"], 0, n),
        out_of_range("head_js_sum", payload["head_js_sum"], 0, n))


def check_loss(model, cfg, payload: dict) -> str | None:
    if "texts" not in payload:
        return "no per-text losses (a unit of an older version): it is recomputed"
    n = len(load_texts(cfg.heldout)[:cfg.n_heldout])
    return first_problem(out_of_range("loss", payload["loss"], 0, None),
                         wrong_shape("texts", payload["texts"], (n, 2)),
                         out_of_range("texts (loss sums, token counts)", payload["texts"], 0, None))
