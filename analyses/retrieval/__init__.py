"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality",
arXiv 2404.15574; reference code nightdessert/Retrieval_Head, ``retrieval_head_detection.py``).

Needle-in-a-haystack prompts over a length x depth grid; at each decode step a head makes a
copy-paste event when its argmax key lies in the answer span and holds the emitted token; a
sample's score is events/|span|, a head's score the mean over samples the model answers
(ROUGE-1 recall > 0.5); retrieval heads score > 0.1. The masking experiment makes the top-K
heads (vs K random heads from outside the top set, several seeds) uniform during decoding.
See :mod:`.scoring` for which attention row is used (the reference's: the row producing w_t), and
:mod:`.stats` for the intervals (sparsity, top-K vs random-K masking). Method: docs/methods.md §1.

>>> from probe import load_model
>>> from analyses import run
>>> res = run(RETRIEVAL, load_model("tiny-llama"), RetrievalConfig(cells=(("code", 220, 50.0),), k=2, mask=False,
...           max_new_tokens=3), progress=False)
>>> res.scores.shape, len(res.samples), res.masking.empty      # [layer, head]; one sample; no masking run
((2, 4), 1, True)
"""
from .harness import Needle, build_prompt, load_needles, locate_span, rouge1_recall
from .result import RetrievalResult
from .run import DEFAULT_DEPTHS, DEFAULT_LENGTHS, RETRIEVAL, RetrievalConfig, run_masked, run_sample
from .scoring import head_scores, sample_events

ANALYSIS = RETRIEVAL

__all__ = ["ANALYSIS", "RETRIEVAL", "RetrievalConfig", "DEFAULT_LENGTHS", "DEFAULT_DEPTHS", "RetrievalResult",
           "Needle", "build_prompt", "load_needles", "locate_span", "rouge1_recall", "run_sample", "run_masked",
           "sample_events", "head_scores"]
