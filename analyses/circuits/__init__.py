"""Circuits across tasks and their overlap — Merullo, Eickhoff, Pavlick, ICLR 2024,
"Circuit Component Reuse Across Tasks in Transformer Language Models" (arXiv 2310.08744;
code: jmerullo/circuit_reuse). Spec: docs/methods.md §3.

Pipeline: :mod:`.tasks` (clean/corrupted prompt pairs) -> :mod:`.patching` (exact per-head activation
patching, EAP, EAP-IG, faithfulness) and :mod:`.path_patching` (the paper's per-stage path patching,
EAP-shortlisted, top ~2% per stage) -> :mod:`.overlap` (circuit rule, Jaccard / overlap coefficient /
Spearman, bootstrap, random null) -> :mod:`.roles` (head roles, cross-task intervention) ->
:mod:`.result` (frozen results with ``to_frame``/``plot``/save/load); :mod:`.scan` runs it all.
"""
from .overlap import jaccard, overlap_coefficient, rank_correlation, select_circuit  # noqa: F401
from .result import CircuitsResult, TaskResult  # noqa: F401
from .scan import add_cli, run_task, scan  # noqa: F401
from .tasks import TASKS, TaskBatch, make_pair, make_task  # noqa: F401
