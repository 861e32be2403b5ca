"""ACT head search (Yu et al., ICML 2024, §4; reference: GATECH-EIC/ACT), as docs/methods.md §2 states it.

Candidates are the heads of layers 2 .. L-2. Each candidate is calibrated *alone* and scored on a
calibration split; the heads that improve the score are kept, and all kept heads are then
calibrated *together* on a held-out split. Control: the same number of heads drawn at random
from the candidates outside the kept set, several seeds (10 by default). Calibrating a head of
layer l leaves layers < l unchanged, so each candidate reruns only layers l.. from the recorded
input of block l (``probe.families.record``: identical to a full forward; the shared model is
never modified).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from probe import HeadId, InterventionSpec, SinkCalibration, families, intervene
from probe.atomic import atomic_path, read_json, write_json
from probe.errors import CorruptFileError, InputError

from .tasks import Batch, label_logprobs, score

METRICS = ("accuracy", "gold_logprob")


def candidate_heads(model, first_layer: int = 2, last_layer: int | None = None) -> list[HeadId]:
    """Heads of layers ``first_layer .. last_layer`` (reference: 2 .. L-2)."""
    last = model.n_layers - 2 if last_layer is None else last_layer
    if not 0 <= first_layer <= last < model.n_layers:
        raise InputError(f"candidate layers {first_layer}..{last} are empty or outside 0..{model.n_layers - 1}")
    return [HeadId(l, h) for l in range(first_layer, last + 1) for h in range(model.n_heads)]


def act_spec(edit: SinkCalibration, heads) -> InterventionSpec:
    """``edit`` (the ACT settings) on ``heads``; the empty spec when there are none."""
    return InterventionSpec([replace(edit, heads=tuple(heads))]) if heads else InterventionSpec()


def evaluate(model, batches: list[Batch], label_ids, spec: InterventionSpec | None = None) -> dict[str, float]:
    """Score the batches with ``spec`` applied (full forward)."""
    with intervene(model, spec or InterventionSpec()):
        lp = torch.cat([label_logprobs(model, b, label_ids) for b in batches])
    return score(lp, torch.cat([b.gold for b in batches]))


def item_outcomes(model, batches: list[Batch], label_ids, spec: InterventionSpec | None = None) -> dict[str, list]:
    """Per item (batch order): ``accuracy`` (0/1) and ``gold_logprob`` with ``spec`` applied, so every
    before/after on the same items can be paired (docs/methods.md §2, "Statistics")."""
    with torch.no_grad(), intervene(model, spec or InterventionSpec()):
        lp = torch.cat([label_logprobs(model, b, label_ids) for b in batches]).double()
    gold = torch.cat([b.gold for b in batches])
    return {"accuracy": (lp.argmax(-1) == gold).double().tolist(),
            "gold_logprob": lp.gather(1, gold[:, None])[:, 0].tolist()}


# ----------------------------------------------------------------------------- run from a layer

def layer_inputs(model, batches: list[Batch], layers) -> list[families.Resume]:
    """Per batch, a :class:`probe.families.Resume` of the plain model from the first of ``layers``."""
    start = min(layers)
    with torch.no_grad():
        return [families.record(model, b.ids, start=start, layers=layers, attention_mask=b.mask, position_ids=b.pos,
                                logits_to_keep=1) for b in batches]


@torch.no_grad()
def evaluate_from(model, batches, cache, layer: int, label_ids, spec: InterventionSpec) -> dict[str, float]:
    """Like :func:`evaluate` for a spec editing only layers >= ``layer``: reruns layers ``layer..`` only."""
    lps = []
    with intervene(model, spec):
        for resume in cache:
            logits = resume.run(layer, keep=1)[:, -1].float()
            lps.append(torch.log_softmax(logits, -1)[:, label_ids].cpu())
    return score(torch.cat(lps), torch.cat([b.gold for b in batches]))


# ----------------------------------------------------------------------------- the search, by layer

def scan_layer(model, batches, label_ids, edit: SinkCalibration, layer: int) -> list[dict]:
    """Each head of ``layer`` calibrated alone on ``batches``: one row of scores per head."""
    cache = layer_inputs(model, batches, [layer])
    rows = []
    for h in range(model.n_heads):
        head = HeadId(layer, h)
        r = evaluate_from(model, batches, cache, layer, label_ids, act_spec(edit, [head]))
        rows.append({"head": str(head), "layer": layer, "index": h, **r})
    return rows


def select_heads(base: dict, rows: list[dict], metric: str = "accuracy") -> list[HeadId]:
    """The candidates whose lone calibration improves ``metric`` over the plain model.

    A log-probability gain must exceed 1e-4 nats: below that it is float noise (a head with no
    sink, calibrated or not, moves scores by ~1e-6), not an improvement."""
    margin = 1e-4 if metric == "gold_logprob" else 0.0
    return [HeadId.parse(r["head"]) for r in rows if r[metric] > base[metric] + margin]


def random_heads(candidates: list[HeadId], n: int, seed: int) -> list[HeadId]:
    """The random-head control: ``n`` candidates drawn with ``seed``."""
    return sorted(random.Random(seed).sample(candidates, n))


def control_pool(candidates: list[HeadId], selected) -> tuple[list[HeadId], bool]:
    """Where the random-head control draws from: the candidates outside ``selected`` (``True``), or all
    candidates (``False``, flagged in the result) when no more than ``len(selected)`` lie outside: with
    exactly that many, every seed would draw the same complement set (a constant, not a control)."""
    kept = set(selected)
    outside = [h for h in candidates if h not in kept]
    return (outside, True) if len(outside) > len(selected) else (list(candidates), False)


# ----------------------------------------------------------------------------- result

@dataclass(frozen=True, eq=False)
class SearchResult:
    """One task and setting: per-candidate calibration-split scores, the kept heads, held-out scores.

    ``heldout``: ``plain`` and ``calibrated`` scores, ``random``: one row per control seed, ``n_items``.
    """

    model_id: str
    weights_hash: str
    task: str
    config: dict
    baseline: dict
    candidates: list
    selected: tuple[HeadId, ...]
    heldout: dict

    @property
    def shots(self) -> int:
        return int(self.config["shots"])

    def random_summary(self, metric: str = "accuracy") -> dict[str, float]:
        vals = torch.tensor([r[metric] for r in self.heldout["random"]], dtype=torch.float64, device="cpu")
        if not len(vals):
            return {"mean": None, "std": None, "n": 0}
        return {"mean": float(vals.mean()), "std": float(vals.std(unbiased=True)) if len(vals) > 1 else 0.0,
                "n": len(vals)}

    def figures(self) -> dict:
        """The headline numbers (held-out accuracy: plain, calibrated, random heads mean/std)."""
        return {"task": self.task, "shots": self.shots, "n_selected": len(self.selected),
                "selected": [str(h) for h in self.selected], "calib_plain": self.baseline,
                "heldout_plain": self.heldout["plain"], "heldout_calibrated": self.heldout["calibrated"],
                "heldout_random_accuracy": self.random_summary("accuracy"),
                "heldout_random_gold_logprob": self.random_summary("gold_logprob")}

    def score_maps(self, n_layers: int, n_heads: int) -> dict[str, np.ndarray]:
        """``[layer, head]`` per metric (calibration-split score, its change, kept); NaN off the candidates."""
        names = list(METRICS) + [f"delta_{m}" for m in METRICS] + ["selected"]
        out = {m: np.full((n_layers, n_heads), np.nan) for m in names}
        kept = set(self.selected)
        for r in self.candidates:
            l, h = r["layer"], r["index"]
            for m in METRICS:
                out[m][l, h], out[f"delta_{m}"][l, h] = r[m], r[m] - self.baseline[m]
            out["selected"][l, h] = float(HeadId(l, h) in kept)
        return out

    def to_frame(self):
        """Tidy: one row per candidate head and metric (calibration-split score and its change)."""
        import pandas as pd

        rows = []
        for r in self.candidates:
            for m in METRICS:
                rows.append({"layer": r["layer"], "head": r["index"], "metric": m, "value": r[m]})
                rows.append({"layer": r["layer"], "head": r["index"], "metric": f"delta_{m}",
                             "value": r[m] - self.baseline[m]})
            rows.append({"layer": r["layer"], "head": r["index"], "metric": "selected",
                         "value": float(HeadId(r["layer"], r["index"]) in set(self.selected))})
        df = pd.DataFrame(rows, columns=["layer", "head", "metric", "value"])
        df.insert(0, "task", self.task)
        df.insert(1, "shots", self.shots)
        return df

    def plot(self, metric: str = "delta_accuracy"):
        """Layer x head map of the calibration-split change from calibrating each head alone."""
        from .plots import search_map

        return search_map(self, metric)

    def to_dict(self) -> dict:
        return {"format": "headwise.act_search", "version": 1, "model_id": self.model_id,
                "weights_hash": self.weights_hash, "task": self.task, "config": self.config,
                "baseline": self.baseline, "candidates": self.candidates, "selected": [str(h) for h in self.selected],
                "heldout": self.heldout, "figures": self.figures()}

    def save(self, path) -> Path:
        """JSON summary (atomic) at ``path`` and the tidy table beside it as parquet."""
        path = Path(path)
        write_json(path, self.to_dict())
        with atomic_path(path.with_suffix(".parquet")) as tmp:
            self.to_frame().to_parquet(tmp)
        return path

    @classmethod
    def load(cls, path) -> "SearchResult":
        d = read_json(path, "ACT search result")
        if not isinstance(d, dict) or d.get("format") != "headwise.act_search":
            raise CorruptFileError(f"{path} is not a headwise ACT search result: rerun the search to regenerate it")
        return cls(d["model_id"], d["weights_hash"], d["task"], d["config"], d["baseline"], d["candidates"],
                   tuple(HeadId.parse(h) for h in d["selected"]), d["heldout"])
