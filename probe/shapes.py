"""The shape vocabulary of headwise, as jaxtyping aliases used on the public interfaces.

One set of axis names for every tensor and array that crosses a module boundary:

``layer`` (transformer block), ``head`` (query head), ``kv_head`` (key/value head under GQA),
``query`` (query position or recorded row), ``key`` (key position), ``d_head`` (head dimension),
``prompt`` (one prompt of a batch of prompts), ``batch`` (rows of one forward), ``feature``
(a flattened ``layer * head`` vector, e.g. a detector's input).

The aliases are plain annotations at run time; the test suite checks them with jaxtyping's
import hook (``tests/test_shapes.py``), so a function annotated ``HeadScores`` that returns a
``[head, layer]`` array fails there.

>>> import numpy as np
>>> isinstance(np.zeros((2, 4)), HeadScores), isinstance(np.zeros(3), HeadScores)
(True, False)
"""
from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

# per-head values of one model: [layer, head]
HeadScores = Float[np.ndarray, "layer head"]
HeadScoresT = Float[torch.Tensor, "layer head"]
HeadFlags = Bool[np.ndarray, "layer head"]

# patterns
Patterns = Float[torch.Tensor, "layer head query key"]        # every head of every layer
LayerPatterns = Float[torch.Tensor, "head query key"]         # one layer
HeadPattern = Float[torch.Tensor, "query key"]                # one head
PatternWindow = Float[np.ndarray, "head query key"]           # pooled or windowed, for plots

# per-row statistics (rows = the recorded query rows)
RowStats = Float[torch.Tensor, "layer head query"]
RowArgmax = Int[torch.Tensor, "layer head query"]
RowRatios = Float[torch.Tensor, "query layer head"]           # e.g. lookback ratio per generated token

# head outputs and per-prompt effects (circuits)
HeadOutputs = Float[torch.Tensor, "layer prompt query head d_head"]
PromptEffects = Float[torch.Tensor, "prompt layer head"]
PromptEffectsNp = Float[np.ndarray, "prompt layer head"]

# flattened per-head features: [feature] = layer * head
Features = Float[np.ndarray, "batch feature"]
FeatureVector = Float[torch.Tensor, "feature"]

__all__ = ["HeadScores", "HeadScoresT", "HeadFlags", "Patterns", "LayerPatterns", "HeadPattern", "PatternWindow",
           "RowStats", "RowArgmax", "RowRatios", "HeadOutputs", "PromptEffects", "PromptEffectsNp", "Features",
           "FeatureVector"]
