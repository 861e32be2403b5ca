"""Checks on the circuits analysis' saved task units (``Stage.check``): logit differences and head
effects finite, effects one per head of the model, accuracies in ``[0, 1]``.

Methods: docs/methods.md §3.
"""
from __future__ import annotations

import numpy as np

from ..units import first_problem, out_of_range


def check_task(model, cfg, payload: dict) -> str | None:
    heads = model.n_layers * model.n_heads
    acc = payload["accuracy"]
    found = [out_of_range(f"accuracy[{k!r}]", acc[k], 0, 1) for k in acc if k.endswith("_accuracy")]
    found += [out_of_range("ld_clean", payload["ld_clean"]), out_of_range("ld_corr", payload["ld_corr"])]
    for k, v in payload.items():
        if k.startswith("effect_"):
            size = np.asarray(v).size
            found += [out_of_range(k, v), None if size and size % heads == 0 else
                      f"{k} holds {size} values, not a multiple of the model's {heads} heads"]
    return first_problem(*found)
