"""headwise probe: load a model, collect per-head attention, apply per-head edits.

>>> from probe import load_model, capture
>>> m = load_model("tiny-llama")
>>> rec = capture(m, "abc")
>>> tuple(rec.patterns.shape)
(2, 4, 3, 3)
"""
__version__ = "0.1.0"

from .errors import (ContextLengthError, CorruptFileError, HeadOutOfRangeError, HeadwiseError, InputError,  # noqa: F401
                     MemoryBudgetError, ModelLoadError, ModelMismatchError, UnknownModelError, UnsupportedModelError)
from .heads import HeadId, HeadLayout, as_heads, kv_group  # noqa: F401
from .interventions import (InterventionSpec, MeanAblate, PatternEcho, SinkCalibration, SpanBoost,  # noqa: F401
                            SpanKnockout, Temperature, Uniform, ZeroAblate)
from .models import DEFAULT_MODEL, Model, list_models, load_model  # noqa: F401
from .records import AttentionRecord  # noqa: F401
from .runtime import apply, collect_stats, install, intervene, memory_budget, tap  # noqa: F401
from .stats import HeadStats, KeyGroup, StatsRequest  # noqa: F401
from .capture import capture  # noqa: F401
from .streaming import generate_with_stats, stream_stats  # noqa: F401
from .decoding import greedy, stop_ids  # noqa: F401
from . import families  # noqa: F401
