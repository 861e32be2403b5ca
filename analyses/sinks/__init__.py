"""Attention sinks and training-free calibration (ACT): Yu et al., ICML 2024, "Unveiling and Harnessing
Hidden Attention Sinks" (arXiv 2406.15765; reference code GATECH-EIC/ACT). Method: docs/methods.md §2.

One analysis, :data:`SINKS` (``headwise scan sinks``; stages in :mod:`.run`): profile which keys
act as sinks per head (:mod:`.profile`), search the heads whose lone calibration helps a task
(:mod:`.search`, on the tasks of :mod:`.tasks`, with a random-head control drawn outside the kept
set), evaluate the kept heads together on held-out items, and write the calibration file
(:mod:`.calibration`). :mod:`.items` generates the >= 200-item splits (``load_task("sentiment@large")``);
:mod:`.power` judges a search on them item by item: both selection rules, paired intervals and tests,
random heads drawn outside the selected set (a gain must beat the control's upper bound).

The calibration itself is the engine's ``probe.SinkCalibration`` edit; nothing here re-implements it.

>>> from probe import load_model
>>> from analyses import run
>>> res = run(SINKS, load_model("tiny-llama"), SinksConfig(limit=4, first_layer=0, last_layer=0, n_random=1,
...           n_profile=1), progress=False)
>>> len(res.search.candidates), res.calibration.task
(4, 'sentiment')
"""
from .calibration import Calibration, apply_calibration, load_calibration
from .profile import SinkProfile, profile_sinks, token_type
from .result import SinksResult
from .run import SINKS, SinksConfig
from .search import SearchResult, candidate_heads
from .tasks import TASKS, Task, load_task

ANALYSIS = SINKS

__all__ = ["ANALYSIS", "SINKS", "SinksConfig", "SinksResult", "Calibration", "apply_calibration", "load_calibration",
           "SinkProfile", "profile_sinks", "token_type", "SearchResult", "candidate_heads", "TASKS", "Task",
           "load_task"]
