"""The head atlas and the cross-analysis study: which heads do what, and does one role predict another.

Two layers. :mod:`.grid` is the atlas grid: every saved result's ``head_scores()`` and ``roles()`` on
one layer x head map (the dashboard's first page). :data:`ATLAS` (``headwise scan atlas --out DIR
--results RESULTS``; stages in :mod:`.run`) is the study built on it:

1. **Score agreement** (:mod:`.agreement`): every pair of per-head scores of the saved analyses
   (:mod:`.scores`: retrieval score, sink mass, ACT selection and gain, circuit importance per task,
   similarity to the next layer, echo cost and family, Lookback Lens weight) and of the study's own
   induction / previous-token / duplicate-token scores from streaming statistics (:mod:`.repeats`):
   Spearman with intervals over the items behind the scores and permutation nulls, top-k overlap
   against a null that keeps each layer's share.
2. **Causal transfer** (:mod:`.knockouts`, :mod:`.tasks`, :mod:`.transfer`): knock out the heads of
   role X with that analysis' own method and measure every task Y against layer-matched random heads.
3. **Head cards** (:mod:`.card`): every score and rank, the roles, the transfer cells and a sample
   pattern of one head; ``headwise head L18H6``.

Method: docs/methods.md §7.

>>> from probe import load_model
>>> from analyses import run
>>> cfg = AtlasConfig(analyses=None, transfer=False, n_sequences=3, seq_len=4, n_boot=20, n_perm=20)
>>> res = run(ATLAS, load_model("tiny-llama"), cfg, progress=False)
>>> sorted(res.head_scores()), len(res.agreement)         # 4 streaming scores, 6 pairs
(['duplicate_token', 'first_token_mass', 'induction', 'previous_token'], 6)
"""
from .card import HeadCard, head_card, saved_card
from .grid import LABELS, Atlas, HeadGrid, atlas, head_grid, merge_roles, result_scores, score_grid
from .result import AtlasResult
from .run import ATLAS, AtlasConfig
from .scores import Score

ANALYSIS = ATLAS

__all__ = ["ANALYSIS", "ATLAS", "AtlasConfig", "AtlasResult", "HeadCard", "head_card", "saved_card", "Score",
           "LABELS", "Atlas", "HeadGrid", "atlas", "head_grid", "merge_roles", "result_scores", "score_grid"]
