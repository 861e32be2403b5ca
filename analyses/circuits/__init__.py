"""Circuits across tasks and their overlap — Merullo, Eickhoff, Pavlick, ICLR 2024,
"Circuit Component Reuse Across Tasks in Transformer Language Models" (arXiv 2310.08744;
code: jmerullo/circuit_reuse). Spec: docs/methods.md §3.

Pipeline (:data:`CIRCUITS`, stages in :mod:`.run`): :mod:`.tasks` (clean/corrupted prompt pairs) ->
:mod:`.patching` (exact per-head activation patching, EAP, EAP-IG, faithfulness) -> :mod:`.overlap`
(circuit rule, Jaccard / overlap coefficient / Spearman, bootstrap, random null) -> :mod:`.roles`
(head roles, cross-task intervention) -> :mod:`.result` (frozen results with ``to_frame``/``plot``/
save/load). :mod:`.path_patching` holds the paper's per-stage path patching (EAP-shortlisted, top ~2%
per stage) and the overlap of path-patched circuits; it is called directly, not yet a stage.

>>> from probe import load_model
>>> from analyses import run
>>> r = run(CIRCUITS, load_model("tiny-llama"), CircuitsConfig(tasks=("induction",), n=2, ig_steps=1, frac=0.25,
...         n_boot=5), progress=False)
>>> [t.task for t in r.tasks], sorted(r.roles_scores)[:3]
(['induction'], ['duplicate_token', 'induction', 'mover_induction'])
"""
from .overlap import jaccard, overlap_coefficient, rank_correlation, select_circuit
from .result import CircuitsResult, Repair, TaskResult
from .run import CIRCUITS, CircuitsConfig, run_task
from .tasks import TASKS, TaskBatch, make_pair, make_task

ANALYSIS = CIRCUITS

__all__ = ["ANALYSIS", "CIRCUITS", "CircuitsConfig", "CircuitsResult", "Repair", "TaskResult", "run_task", "TASKS",
           "TaskBatch", "make_pair", "make_task", "jaccard", "overlap_coefficient", "rank_correlation",
           "select_circuit"]
