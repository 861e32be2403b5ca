"""Hallucination grounding from attention: Lookback Lens detector, guided decoding, PAINT-style boost.

Lookback Lens (Chuang et al., EMNLP 2024, arXiv 2407.07071; code voidism/Lookback-Lens): the
lookback ratio ``A_ctx / (A_ctx + A_new)`` of every head at every generated token, averaged over
a span, feeds a logistic-regression detector of ungrounded spans; guided decoding keeps the
sampled chunk the detector finds most grounded. PAINT (arXiv 2501.12206): boosting pre-softmax
scores on context tokens (``z + alpha|z|``) in layers ``2..L-1`` on the last row; :mod:`.paint` does it as
stated (passage tokens only, 0.7 / 0.3). Honest baselines: :mod:`.baselines`. See docs/methods.md §5.

The pipeline (:func:`run_grounding`): counterfactual passages → greedy answers with lookback
ratios from the streaming statistics → automatic labels → detector (held-out AUROC with a
bootstrap interval vs the mean-ratio baseline and a permutation null) → mitigation on held-out
items (grounded rate before/after). Every stage writes its own files and is skipped on rerun.

>>> from analyses.grounding.lookback import ratio
>>> import torch
>>> float(ratio(torch.tensor(1.0), torch.tensor(0.0), 4, 2))   # only looks at the context
1.0
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data import build_items, generate_dataset, item_regions, label  # noqa: F401
from .detector import Detector, evaluate, fit  # noqa: F401
from .lookback import ratio, ratios_from_stats, regions, span_feature  # noqa: F401
from .mitigate import boost_heads, boost_spec, guided_generate  # noqa: F401
from .result import GroundingResult, token_scores, token_view, token_view_html  # noqa: F401
from .run import add_cli, features, heldout_roc, mitigation, run_grounding, saved_dataset  # noqa: F401

__all__ = ["run_grounding", "heldout_roc", "saved_dataset", "GroundingResult", "Detector", "guided_generate", "ratio", "ratios_from_stats",
           "span_feature", "boost_spec", "boost_heads", "token_view", "token_view_html", "add_cli"]
