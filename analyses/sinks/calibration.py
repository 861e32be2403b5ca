"""The ACT calibration file and its use at inference, on a headwise ``Model`` or a plain HF model.

A calibration is the engine's own edit, :class:`probe.SinkCalibration` (heads, beta, tau, the sink
rule: the one type that holds ACT's settings), plus where it comes from: the model id and weights
hash it was made for, the task it was searched on and the figures of that search. The file is JSON
(``format: headwise.calibration``). Applying it is one call (forward and ``generate``); a file made
for other weights is refused with ``ModelMismatchError``.

>>> from probe import load_model
>>> m = load_model("tiny-llama")
>>> c = Calibration.from_heads(m, ["L1H0"], beta=0.5)
>>> c.heads, c.edit.beta
((L1H0,), 0.5)
>>> handle = apply_calibration(m, c)
>>> handle.remove()

Methods: docs/methods.md §2.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from probe import InterventionSpec, SinkCalibration, apply
from probe.atomic import read_json, write_json
from probe.errors import CorruptFileError, ModelMismatchError
from probe.heads import HeadId
from probe.interventions import edit_from_dict

FORMAT = "headwise.calibration"
VERSION = 2


@dataclass(frozen=True)
class Calibration:
    """An ACT edit (:class:`probe.SinkCalibration`, heads included) and the model it was made for."""

    model_id: str
    weights_hash: str
    edit: SinkCalibration
    task: str | None = None
    figures: dict = field(default_factory=dict)

    @property
    def heads(self) -> tuple[HeadId, ...]:
        return self.edit.heads

    def spec(self) -> InterventionSpec:
        """The engine's intervention for this calibration (empty when no head was kept)."""
        return InterventionSpec([self.edit] if self.heads else [])

    @classmethod
    def from_heads(cls, model, heads, task: str | None = None, **settings) -> "Calibration":
        """Calibrate ``heads`` of ``model`` with ACT ``settings`` (beta, tau, rule, alpha, min_queries, keep_first)."""
        return cls(model.model_id, model.weights_hash, SinkCalibration(heads=tuple(heads), **settings), task)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model_id": self.model_id, "weights_hash": self.weights_hash,
                "edit": self.edit.to_dict(), "task": self.task, "figures": self.figures, "spec": self.spec().to_dict()}

    def save(self, path) -> Path:
        return write_json(path, self.to_dict())


def load_calibration(path) -> Calibration:
    """Read a calibration file (typed errors for a missing, corrupt or foreign file, or a bad beta)."""
    d = read_json(path, "calibration file")
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not a headwise calibration file (no format {FORMAT!r}): "
                               "make one with `headwise scan sinks`")
    try:
        edit = edit_from_dict(d["edit"]) if d.get("version") == VERSION else _v1_edit(d)
        if not isinstance(edit, SinkCalibration):
            raise CorruptFileError(f"{path}: the calibration's edit is a {type(edit).__name__}, not SinkCalibration")
        return Calibration(d["model_id"], d["weights_hash"], edit, d.get("task"), d.get("figures", {}))
    except (KeyError, TypeError) as exc:
        raise CorruptFileError(f"{path}: calibration file is missing fields ({exc}); regenerate it") from exc


def _v1_edit(d: dict) -> SinkCalibration:
    """Version-1 files kept the edit's fields at the top level."""
    keys = {f.name for f in fields(SinkCalibration)} - {"phase", "sinks"}
    return SinkCalibration(**{k: d[k] for k in keys if k in d})


def check_model(model, calib: Calibration) -> None:
    """Refuse a calibration made for other weights (compares the weights hash)."""
    from probe.models import Model, weights_fingerprint

    headwise = isinstance(model, Model)             # else a plain Hugging Face model
    found = model.weights_hash if headwise else weights_fingerprint(model)
    if found != calib.weights_hash:
        name = model.model_id if headwise else model.config.name_or_path
        raise ModelMismatchError(
            f"this calibration was made for {calib.model_id} (weights {calib.weights_hash}) but the model is "
            f"{name} (weights {found}): run `headwise scan sinks` for this model")


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
