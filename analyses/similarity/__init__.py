"""Attention similarity across layers and heads, and the cost of sharing it (EchoAtt).

Rajabzadeh et al. 2024, "EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language
Models" (arXiv 2409.14595): inner layers of LLMs have highly similar attention maps, so a block
of layers can share one layer's attention. Related: LiSA (Mu et al. 2024, arXiv 2408.01890):
sharing needs head realignment across layers, and shallow layers are fragile. See docs/methods.md §4.

The analysis (:data:`SIMILARITY`, stages in :mod:`.run`) measures layer x layer (head-averaged,
causal lower-triangle maps) and head x head similarity over a prompt set (cosine and row-wise
Jensen–Shannon, from one forward per prompt, block by block, :mod:`.measure`), matches heads between adjacent
layers (Hungarian) and clusters heads into families; then on held-out text it reuses layer l's
pattern in layer l+1 (``PatternEcho``; same-index, matched and random-permutation heads) and
measures the loss increase, rank-correlates it with similarity, and grows a sharing plan greedily
under a loss budget, measuring its total cost (:mod:`.echo`).

>>> from probe import load_model
>>> from analyses import run
>>> r = run(SIMILARITY, load_model("tiny-llama"), SimilarityConfig(n_prompts=1, n_heldout=1, max_tokens=8,
...         variants=("same",), max_trials=1), progress=False)
>>> sorted(r.to_frame().scope.unique()), r.layer_cos.shape
(['echo', 'family', 'head', 'layer', 'match'], (2, 2))
"""
from .data import load_texts
from .echo import greedy_plan, mean_loss, plan_spec
from .measure import Accumulator, accumulate_prompt, head_families, js_rows, match_heads
from .result import SimilarityResult
from .run import SIMILARITY, SimilarityConfig, tokenize

ANALYSIS = SIMILARITY

__all__ = ["ANALYSIS", "SIMILARITY", "SimilarityConfig", "SimilarityResult", "load_texts", "greedy_plan", "mean_loss",
           "plan_spec", "Accumulator", "accumulate_prompt", "head_families", "js_rows", "match_heads", "tokenize"]
