"""Range checks on the grounding analysis' saved units (``Stage.check``): every answer token's
lookback ratios lie in ``[0, 1]``, one per head of the model.

Methods: docs/methods.md §5.
"""
from __future__ import annotations

from ..units import first_problem, out_of_range


def check_items(model, cfg, payload: dict) -> str | None:
    n = model.n_layers * model.n_heads
    for i, row in enumerate(payload["rows"]):
        lr = row["row_lr"]
        if len(lr) % n:
            return f"rows[{i}].row_lr holds {len(lr)} values, not a multiple of the model's {n} heads"
        problem = first_problem(out_of_range(f"rows[{i}].row_lr (lookback ratios)", lr, 0, 1))
        if problem:
            return problem
    return None
