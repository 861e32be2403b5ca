"""Attention sinks and training-free calibration (ACT): Yu et al., ICML 2024, "Unveiling and Harnessing
Hidden Attention Sinks" (arXiv 2406.15765; reference code GATECH-EIC/ACT). Method: docs/methods.md §2.

* :mod:`.profile`: which keys act as sinks per head (column-mean rule) and by token type.
* :mod:`.search`: the head search (each candidate alone on a calibration split, kept heads
  together on held-out data, random-head control) on the tasks of :mod:`.tasks`.
* :mod:`.calibration`: the calibration file, applying it to a model, the CLI commands.
* :mod:`.items` / :mod:`.power`: the generated >= 200-item splits (``load_task("sentiment@large")``)
  and the held-out judgement: both selection rules, paired intervals and tests, random heads
  drawn outside the selected set (a gain must beat the control's upper bound).

The calibration itself is the engine's ``probe.SinkCalibration`` edit; nothing here re-implements it.
"""
from .calibration import Calibration, add_cli, apply_calibration, calibrate, load_calibration  # noqa: F401
from .profile import SinkProfile, profile_sinks, token_type  # noqa: F401
from .search import SearchConfig, SearchResult, candidate_heads, search_act  # noqa: F401
from .tasks import TASKS, load_task  # noqa: F401
