"""Range and shape checks on the retrieval analysis' saved units (``Stage.check``): per-head
event rates ``[layer, head]`` (copies per needle token: at most one per emitted token, so in
``[0, max_new_tokens]``), ROUGE-1 recalls in ``[0, 1]``. Method: docs/methods.md §1."""
from __future__ import annotations

from ..units import first_problem, out_of_range, wrong_shape


def check_sample(model, cfg, payload: dict) -> str | None:
    return first_problem(wrong_shape("events", payload["events"], (model.n_layers, model.n_heads)),
                         out_of_range("events", payload["events"], 0, cfg.max_new_tokens),
                         out_of_range("recall", payload["recall"], 0, 1))


def check_masking(model, cfg, payload: dict) -> str | None:
    return first_problem(*(out_of_range(f"runs[{c!r}].recall", r["recall"], 0, 1)
                           for c, r in payload["runs"].items()))
