"""The ACT calibration file and its use at inference, on a headwise ``Model`` or a plain HF model.

A calibration file is JSON (``format: headwise.calibration``): the model id and weights hash it
was made for, the heads, beta, tau and the sink rule, the task it was searched on and the
figures of that search. Applying it is one call; the edit is the engine's ``SinkCalibration``
(forward and ``generate``); a file made for other weights is refused with ``ModelMismatchError``.

>>> from probe import load_model
>>> m = load_model("tiny-llama")
>>> c = Calibration.from_heads(m, ["L1H0"], beta=0.5)
>>> handle = apply_calibration(m, c)
>>> handle.remove()
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


from probe import InterventionSpec, SinkCalibration, apply
from probe.atomic import read_json, write_json
from probe.errors import CorruptFileError, ModelMismatchError
from probe.heads import HeadId

FORMAT = "headwise.calibration"


@dataclass(frozen=True)
class Calibration:
    """What to calibrate (heads, beta, sink rule) and for which model; ``figures`` record the search."""

    model_id: str
    weights_hash: str
    heads: tuple[str, ...]
    beta: float = 0.4
    tau: float = 0.1
    rule: str = "tau"
    alpha: float = 5.0
    min_queries: int = 1
    keep_first: bool = True
    task: str | None = None
    figures: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(str(HeadId.parse(h) if isinstance(h, str) else HeadId(*h))
                                                for h in self.heads))
        self.spec()  # beta in (0, 1] and the rule, checked by the engine's edit

    def spec(self) -> InterventionSpec:
        """The engine's intervention for this calibration (empty when no head was kept)."""
        edit = SinkCalibration(heads=self.heads, beta=self.beta, tau=self.tau, rule=self.rule, alpha=self.alpha,
                               min_queries=self.min_queries, keep_first=self.keep_first)
        return InterventionSpec([edit] if self.heads else [])

    @classmethod
    def from_heads(cls, model, heads, **settings) -> "Calibration":
        return cls(model.model_id, model.weights_hash, tuple(str(h) for h in heads), **settings)

    @classmethod
    def from_search(cls, result) -> "Calibration":
        """The calibration a :class:`~analyses.sinks.search.SearchResult` selected."""
        c = result.config
        return cls(result.model_id, result.weights_hash, tuple(result.selected), beta=c["beta"], tau=c["tau"],
                   rule=c["rule"], alpha=c["alpha"], min_queries=c["min_queries"], keep_first=c["keep_first"],
                   task=result.task, figures=result.figures())

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, **asdict(self), "heads": list(self.heads),
                "spec": self.spec().to_dict()}

    def save(self, path) -> Path:
        return write_json(path, self.to_dict())


def load_calibration(path) -> Calibration:
    """Read a calibration file (typed errors for a missing, corrupt or foreign file, or a bad beta)."""
    d = read_json(path, "calibration file")
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not a headwise calibration file (no format {FORMAT!r}): "
                               "make one with `headwise calibrate`")
    keys = {f for f in Calibration.__dataclass_fields__}
    try:
        return Calibration(**{k: v for k, v in d.items() if k in keys})
    except TypeError as exc:
        raise CorruptFileError(f"{path}: calibration file is missing fields ({exc}); regenerate it") from exc


def check_model(model, calib: Calibration) -> None:
    """Refuse a calibration made for other weights (compares the weights hash)."""
    from probe.models import weights_fingerprint

    found = getattr(model, "weights_hash", None) or weights_fingerprint(getattr(model, "hf", model))
    if found != calib.weights_hash:
        name = getattr(model, "model_id", None) or getattr(getattr(model, "config", None), "name_or_path", "?")
        raise ModelMismatchError(
            f"this calibration was made for {calib.model_id} (weights {calib.weights_hash}) but the model is "
            f"{name} (weights {found}): run `headwise calibrate` for this model")


def apply_calibration(model, calibration):
    """Apply a calibration (path or :class:`Calibration`) until ``handle.remove()``; forward and generate.

    ``model`` is a headwise ``Model`` or a plain Hugging Face model, e.g.
    ``h = apply_calibration(AutoModelForCausalLM.from_pretrained(folder), "calib.json")``.

    >>> from probe import load_model
    >>> m = load_model("tiny-llama")
    >>> handle = apply_calibration(m, Calibration.from_heads(m, ["L1H0", "L1H3"], beta=0.4))
    >>> out = m.hf.generate(m.encode("ab"), max_new_tokens=2, do_sample=False)
    >>> handle.remove()
    """
    calib = calibration if isinstance(calibration, Calibration) else load_calibration(calibration)
    check_model(model, calib)
    return apply(model, calib.spec())


def calibrate(model, task: str, *, shots: int = 0, out=None, work_dir=None, progress: bool = True,
              **settings) -> Calibration:
    """Search the heads for ``task`` (see :func:`~analyses.sinks.search.search_act`) and return, and
    with ``out`` save atomically, the calibration file. ``settings``: any :class:`SearchConfig` field.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from probe import load_model
    >>> m = load_model("tiny-llama")
    >>> path = Path(tempfile.mkdtemp()) / "calib.json"
    >>> c = calibrate(m, "sentiment", out=path, first_layer=0, last_layer=0, n_random=1, progress=False)
    >>> load_calibration(path) == c, c.task
    (True, 'sentiment')
    """
    from .search import SearchConfig, search_act
    from .tasks import load_task

    load_task(task)  # unknown task: a typed error before any work
    cfg = SearchConfig(shots=shots, **settings)
    search_out = None
    if work_dir is not None or out is not None:
        base = Path(work_dir) if work_dir is not None else Path(out).parent
        search_out = base / f".act-search-{task}-{shots}shot-{model.weights_hash}.json"
    calib = Calibration.from_search(search_act(model, task, cfg, out=search_out, progress=progress))
    if out is not None:
        calib.save(out)
    return calib


# ----------------------------------------------------------------------------- CLI

def add_cli(sub) -> None:
    """``headwise calibrate`` (``headwise generate --calibration`` lives in :mod:`analyses.generate`)."""
    s = sub.add_parser("calibrate", help="ACT: search the heads whose sink calibration helps a task; write calib.json")
    s.add_argument("--model", default=None)
    s.add_argument("--task", required=True, help="sentiment, topic or qtype (data/sinks/)")
    s.add_argument("--out", required=True)
    s.add_argument("--shots", type=int, default=0)
    s.add_argument("--beta", type=float, default=0.4)
    s.add_argument("--tau", type=float, default=0.1)
    s.add_argument("--rule", choices=("tau", "alpha"), default="tau")
    s.add_argument("--alpha", type=float, default=5.0)
    s.add_argument("--min-queries", type=int, default=1)
    s.add_argument("--first-layer", type=int, default=2, help="first candidate layer (reference: 2)")
    s.add_argument("--last-layer", type=int, default=None, help="last candidate layer (default L-2)")
    s.add_argument("--seeds", type=int, default=5, help="random-head control: number of seeds")
    s.set_defaults(run=_calibrate_cmd)


def _load(name):
    from probe import DEFAULT_MODEL, load_model

    return load_model(name or DEFAULT_MODEL)


def _calibrate_cmd(args) -> int:
    from .tasks import load_task

    load_task(args.task)
    m = _load(args.model)
    c = calibrate(m, args.task, shots=args.shots, out=args.out, beta=args.beta, tau=args.tau, rule=args.rule,
                  alpha=args.alpha, min_queries=args.min_queries, first_layer=args.first_layer,
                  last_layer=args.last_layer, n_random=args.seeds)
    f = c.figures
    rnd = f["heldout_random_accuracy"]
    control = "no random control: no head kept" if rnd["n"] == 0 else \
        f"random heads {rnd['mean']:.3f} +- {rnd['std']:.3f} over {rnd['n']} seeds"
    print(f"wrote {args.out}: {len(c.heads)} heads {list(c.heads)}; held-out accuracy "
          f"{f['heldout_plain']['accuracy']:.3f} -> {f['heldout_calibrated']['accuracy']:.3f} ({control})")
    return 0
