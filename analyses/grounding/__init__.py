"""Hallucination grounding from attention: Lookback Lens detector, guided decoding, PAINT-style boost.

Lookback Lens (Chuang et al., EMNLP 2024, arXiv 2407.07071; code voidism/Lookback-Lens): the
lookback ratio ``A_ctx / (A_ctx + A_new)`` of every head at every generated token, averaged over
a span, feeds a logistic-regression detector of ungrounded spans; guided decoding keeps the
sampled chunk the detector finds most grounded. PAINT (arXiv 2501.12206): boosting pre-softmax
scores on context tokens (``z + alpha|z|``) in layers ``2..L-1`` on the last row; :mod:`.paint` does it as
stated (passage tokens only, 0.7 / 0.3). Honest baselines: :mod:`.baselines`. See docs/methods.md §5.

The analysis (:data:`GROUNDING`, stages in :mod:`.run`): counterfactual passages → greedy answers
with lookback ratios from the streaming statistics → automatic labels → detector (held-out AUROC
with a bootstrap interval vs the mean-ratio baseline and a permutation null) → mitigation on
held-out items (grounded rate before/after). Every unit is stored; a rerun resumes.

>>> from analyses.grounding.lookback import ratio
>>> import torch
>>> float(ratio(torch.tensor(1.0), torch.tensor(0.0), 4, 2))   # only looks at the context
1.0
"""
from .data import Item, build_items, item_regions, label
from .detector import Detector, evaluate, features, fit, fit_detectors, heldout_roc
from .lookback import ratio, ratios_from_stats, regions, span_feature
from .mitigate import boost_heads, boost_spec, guided_generate, guided_view
from .result import GroundingResult, GuidedPrompt, token_scores, token_view_html
from .run import GROUNDING, GroundingConfig

ANALYSIS = GROUNDING

__all__ = ["ANALYSIS", "GROUNDING", "GroundingConfig", "GroundingResult", "GuidedPrompt", "Detector", "Item",
           "build_items", "item_regions", "label", "evaluate", "features", "fit", "fit_detectors", "heldout_roc",
           "ratio", "ratios_from_stats", "regions", "span_feature", "boost_heads", "boost_spec", "guided_generate",
           "guided_view", "token_scores", "token_view_html"]
