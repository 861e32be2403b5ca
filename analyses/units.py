"""The unit store: one file per finished unit under ``<root>/units/<stage>/``, stamped and atomic.

A unit file holds the unit's payload and its *stamp*: the analysis and stage, the model's weights
hash, the settings that determine the stage (``Stage.depends``), the unit's spec and the store
format. :meth:`UnitStore.status` compares a saved stamp with the wanted one, so a unit made for
another model or other settings is recomputed, never reused. Files are written atomically
(``probe.atomic``): an interrupted run loses at most the unit in progress.

Payloads are dicts of JSON values and arrays: without arrays the file is JSON (``<id>.json``),
with them safetensors (``<id>.safetensors``, the JSON part in its metadata). Arrays come back as
numpy arrays of the same dtype; :func:`normalise` gives a fresh payload exactly that form, so a
resumed run reduces the same values as an uninterrupted one.

Every file carries a sha256 of its stamp and payload and the store's format version; a file that
is unreadable, edited after it was written or of another version reads as ``"damaged: <why>"``
(:meth:`UnitStore.lookup`), and the runner recomputes it with a warning naming the file.
The folder-level parts (the writer's lock, the run's own stamp) live in :mod:`analyses.store`.

>>> import tempfile, numpy as np
>>> store = UnitStore(tempfile.mkdtemp())
>>> stamp = {"model": "abc", "settings": {"k": 2}}
>>> _ = store.put("scores", "cell-1", stamp, {"events": np.eye(2), "answer": "4817"})
>>> store.status("scores", "cell-1", stamp), store.status("scores", "cell-1", {**stamp, "model": "other"})
('ok', 'stale: model')
>>> store.get("scores", "cell-1")["events"].tolist()
[[1.0, 0.0], [0.0, 1.0]]
>>> _ = store.put("scores", "cell-2", stamp, {"answer": "4817"})
>>> _ = store.path("scores", "cell-2").write_text(store.path("scores", "cell-2").read_text().replace("4817", "4818"))
>>> store.status("scores", "cell-2", stamp)  # doctest: +ELLIPSIS
'damaged: ...cell-2.json was changed after it was written...'
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from probe.atomic import read_json, read_tensors, write_json, write_tensors
from probe.errors import CorruptFileError

FORMAT = "headwise.unit"
VERSION = 2                  # 2: JSON units carry a sha256 of their stamp and payload
READS = (2,)                 # a unit of another version is recomputed, never read


def _split(payload: dict) -> tuple[dict, dict[str, np.ndarray]]:
    data, arrays = {}, {}
    for k, v in payload.items():
        if isinstance(v, torch.Tensor):
            arrays[k] = v.detach().cpu().numpy()
        elif isinstance(v, np.ndarray):
            arrays[k] = v
        else:
            data[k] = v
    return json.loads(json.dumps(data, default=_json_default)), arrays


def _json_default(obj):
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"a unit payload holds {type(obj).__name__}: use JSON values or arrays")


def normalise(payload: dict) -> dict:
    """``payload`` as the store gives it back: JSON types, arrays as numpy arrays."""
    data, arrays = _split(payload)
    return {**data, **{k: np.array(v) for k, v in arrays.items()}}


class UnitStore:
    """Finished units of one results folder (``root``); see the module docstring."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, stage: str) -> Path:
        return self.root / "units" / stage

    def path(self, stage: str, unit_id: str) -> Path | None:
        """The unit's file, or None when it was never written."""
        for ext in (".json", ".safetensors"):
            p = self.folder(stage) / f"{unit_id}{ext}"
            if p.exists():
                return p
        return None

    def status(self, stage: str, unit_id: str, stamp: dict) -> str:
        """``"ok"``, ``"missing"``, ``"stale: <what differs>"`` or ``"damaged: <why>"``."""
        return self.lookup(stage, unit_id, stamp)[0]

    def lookup(self, stage: str, unit_id: str, stamp: dict) -> tuple[str, dict | None]:
        """``(status, payload)``: the payload (read once, checked) when the status is ``"ok"``, else None."""
        path = self.path(stage, unit_id)
        if path is None:
            return "missing", None
        try:
            saved, arrays = self._read(path)
        except (CorruptFileError, OSError) as exc:
            return f"damaged: {exc}", None
        want = json.loads(json.dumps(stamp))
        differ = sorted(k for k in set(want) | set(saved["stamp"]) if want.get(k) != saved["stamp"].get(k))
        if differ:
            return "stale: " + ", ".join(differ), None
        return "ok", {**saved["payload"], **arrays}

    def get(self, stage: str, unit_id: str) -> dict:
        """The saved payload (check :meth:`status` first); a damaged file raises :class:`CorruptFileError`."""
        path = self.path(stage, unit_id)
        if path is None:
            raise FileNotFoundError(f"no unit {stage}/{unit_id} under {self.root}")
        meta, arrays = self._read(path)
        return {**meta["payload"], **arrays}

    def put(self, stage: str, unit_id: str, stamp: dict, payload: dict) -> Path:
        """Write a finished unit atomically (replacing an older file of the same id)."""
        data, arrays = _split(payload)
        meta = {"format": FORMAT, "version": VERSION, "stamp": json.loads(json.dumps(stamp)), "payload": data}
        folder = self.folder(stage)
        if arrays:
            path = write_tensors(folder / f"{unit_id}.safetensors",
                                 {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, meta)
            other = folder / f"{unit_id}.json"
        else:
            path = write_json(folder / f"{unit_id}.json", {**meta, "sha256": _digest(meta)})
            other = folder / f"{unit_id}.safetensors"
        other.unlink(missing_ok=True)
        return path

    def _read(self, path: Path) -> tuple[dict, dict[str, np.ndarray]]:
        """The unit file checked: its format tag, a version this store reads, its sha256 (safetensors
        files: checked by :func:`probe.atomic.read_tensors`)."""
        if path.suffix == ".json":
            meta, arrays = read_json(path, "unit"), {}
            if isinstance(meta, dict) and meta.get("version") in READS and meta.pop("sha256", None) != _digest(meta):
                raise CorruptFileError(f"{path} was changed after it was written (its contents do not match "
                                       "the sha256 stored in it)")
        else:
            tensors, meta = read_tensors(path, FORMAT)
            arrays = {k: v.numpy() for k, v in tensors.items()}
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("stamp"), dict) \
                or not isinstance(meta.get("payload"), dict):
            raise CorruptFileError(f"{path} is not a headwise unit file")
        if meta.get("version") not in READS:
            raise CorruptFileError(f"{path} is a unit of format version {meta.get('version')!r}; this headwise "
                                   f"reads version {', '.join(map(str, READS))}")
        return meta, arrays


def _digest(meta: dict) -> str:
    """sha256 of a JSON unit's canonical text (everything but the digest itself)."""
    core = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- payload checks (Stage.check)

def out_of_range(name: str, values, lo: float | None = None, hi: float | None = None, tol: float = 1e-6) -> str | None:
    """What is wrong with ``values`` (numbers, nested lists or an array): non-finite or outside
    ``[lo - tol, hi + tol]``; None when they are fine.

    >>> out_of_range("cos", [0.5, 333334.0], -1, 1)
    'cos holds 333334, above 1'
    >>> out_of_range("loss", float("nan")) is None
    False
    """
    a = np.asarray(values, dtype=np.float64)
    if not np.isfinite(a).all():
        return f"{name} holds {int((~np.isfinite(a)).sum())} non-finite value(s)"
    if a.size and lo is not None and a.min() < lo - tol:
        return f"{name} holds {a.min():g}, below {lo:g}"
    if a.size and hi is not None and a.max() > hi + tol:
        return f"{name} holds {a.max():g}, above {hi:g}"
    return None


def wrong_shape(name: str, values, want: tuple[int, ...]) -> str | None:
    """``values`` not of shape ``want`` (the model's layout): what was found; else None."""
    got = np.shape(values)
    return None if tuple(got) == tuple(want) else f"{name} has shape {tuple(got)}, expected {tuple(want)}"


def first_problem(*found: str | None) -> str | None:
    return next((f for f in found if f), None)
