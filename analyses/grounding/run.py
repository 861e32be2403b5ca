"""The grounding scan as stages: items (generate + label) -> detector fit -> mitigation -> result.

``items``: one unit per shard of items: the greedy answer of each, its automatic label and the
lookback ratios of the rows that produced it (streaming statistics). ``detector``: one unit, the
detectors fitted on the training facts and scored on held-out facts (plain and template-centred,
with intervals, the mean-ratio baseline, permutation nulls); a stored fit is reused, so guided
answers made with it stay valid. ``mitigation``: per condition and block of held-out items of the
hallucination-prone templates, the answers under the boost (``boost``: the whole context, or PAINT as
stated) or guided decoding; the detector's summary carries the honest baselines (:mod:`.baselines`).
Methods: docs/methods.md §5.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

import pandas as pd

from probe.heads import HeadId

from ..config import Config, opt
from ..contract import Analysis, Stage, Unit
from .baselines import detector_baselines
from .checks import check_items
from .data import Item, answer_item, build_items
from .detector import Detector, confound_checks, fit_detectors, heldout_roc
from .mitigate import answer, conditions, rates
from .result import GroundingResult


@dataclass(frozen=True)
class GroundingConfig(Config):
    """The item set, the detector fit and the mitigation experiment."""

    limit: int | None = opt(None, "use only the first N items (default: all)", min=1)
    shard: int = opt(20, "items per unit of the items stage", min=1)
    max_new_tokens: int = opt(10, "answer length (stops at a newline)", min=1)
    reading: Literal["code", "paper"] = opt("code", "new tokens = everything after the context (reference code) "
                                                    "or generated only (paper)")
    center: Literal["none", "template"] = opt("none", "fit on template-centred features (confound control) or "
                                                      "plain (the paper)")
    n_perm: int = opt(50, "permutation-null refits", min=1)
    seed: int = opt(0, "seed of the nulls, the random heads and the sampling", min=0)
    n_mitigate: int = opt(300, "held-out items of the mitigation experiment, at most (all items give 420 in "
                               "templates 1-4; the result's n says how many ran; 0: skip it)", min=0)
    k: int = opt(20, "heads boosted in the top-k / random-k conditions", min=1)
    alpha: float = opt(0.3, "PAINT-style boost z + alpha|z| on the context keys", min=0)
    mitigate_templates: tuple[int, ...] = opt((1, 2, 3, 4), "templates the mitigation items come from", min=0)
    block: int = opt(5, "mitigation items per unit", min=1)
    boost: Literal["context", "paint"] = opt("paint", "mitigation boost: PAINT as stated (passage tokens only, "
                                                      "0.7/0.3) or the whole context with one alpha")

    @classmethod
    def small(cls, model) -> "GroundingConfig":
        return cls(limit=40, n_mitigate=4 if model.n_layers > 2 else 0, k=min(10, model.n_heads), n_perm=10)


# ----------------------------------------------------------------------------- stage 1: items

def plan_items(model, cfg: GroundingConfig, _) -> list[Unit]:
    items = build_items(limit=cfg.limit)
    return [Unit(f"shard-{s // cfg.shard:04d}", {"items": [asdict(it) for it in items[s:s + cfg.shard]]})
            for s in range(0, len(items), cfg.shard)]


def compute_items(model, cfg: GroundingConfig, unit: Unit, _) -> dict:
    rows = [answer_item(model, Item(**it), max_new_tokens=cfg.max_new_tokens, reading=cfg.reading)
            for it in unit.spec["items"]]
    return {"rows": rows}


def reduce_items(model, cfg: GroundingConfig, payloads: dict, _) -> dict:
    return {"df": pd.DataFrame([r for p in payloads.values() for r in p["rows"]])}


# ----------------------------------------------------------------------------- stage 2: the detector

def _answers_key(df: pd.DataFrame) -> str:
    return hashlib.sha256(json.dumps(list(zip(df["item_id"], df["answer"]))).encode()).hexdigest()


def plan_detector(model, cfg: GroundingConfig, state: dict) -> list[Unit]:
    return [Unit("fit", {"answers": _answers_key(state["df"])})]


def compute_detector(model, cfg: GroundingConfig, unit: Unit, state: dict) -> dict:
    df, L, H = state["df"], model.n_layers, model.n_heads
    det, stats = fit_detectors(df, L, H, center=cfg.center, n_perm=cfg.n_perm, seed=cfg.seed)
    counts = df["label"].value_counts(dropna=False)
    stats |= {"n_items": int(len(df)), "n_grounded": int(counts.get(1.0, 0)), "center": cfg.center,
              "n_not_grounded": int(counts.get(0.0, 0)), "n_ambiguous": int(df["label"].isna().sum())}
    meta = {**det.meta, "model_id": model.model_id, "weights_hash": model.weights_hash, "reading": cfg.reading,
            "center": cfg.center, "feature": "mean lookback ratio over the rows that produced the answer tokens"}
    return {"detector": Detector(det.coef, det.intercept, det.mean, det.scale, L, H, meta).to_dict(), "stats": stats}


def reduce_detector(model, cfg: GroundingConfig, payloads: dict, state: dict) -> dict:
    det, df = Detector.from_dict(payloads["fit"]["detector"]), state["df"]
    stats = payloads["fit"]["stats"] | confound_checks(det, df[df["split"] == "train"], df[df["split"] == "heldout"],
                                                        model.n_layers, model.n_heads)
    stats["baselines"] = detector_baselines(det, df, cfg.center, cfg.seed)   # reported before the detector
    return state | {"detector": det, "stats": stats}


# ----------------------------------------------------------------------------- stage 3: mitigation

def mitigation_items(cfg: GroundingConfig, df: pd.DataFrame) -> list[Item]:
    """Held-out items of the hallucination-prone templates (a model-free choice), in dataset order."""
    by_id = {it.item_id: it for it in build_items(limit=cfg.limit)}
    held = df[df["split"] == "heldout"]["item_id"]
    return [by_id[i] for i in held if by_id[i].template_id in cfg.mitigate_templates][:cfg.n_mitigate]


def _json_cond(cond: dict) -> dict:
    return {k: [str(h) for h in v] if k == "heads" else v for k, v in cond.items()}


def plan_mitigation(model, cfg: GroundingConfig, state: dict) -> list[Unit]:
    if not cfg.n_mitigate:
        return []
    items, det = mitigation_items(cfg, state["df"]), state["detector"]
    digest = hashlib.sha256(json.dumps(det.to_dict()).encode()).hexdigest()[:16]
    units = []
    for name, cond in conditions(det, cfg.k, cfg.alpha, cfg.boost).items():
        for b in range(0, len(items), cfg.block):
            spec = {"condition": name, "cond": _json_cond(cond), "items": [it.item_id for it in items[b:b + cfg.block]],
                    "offset": b, "detector": digest if cond.get("guided") else None}
            units.append(Unit(f"{name}-{b // cfg.block:03d}", spec))
    return units


def compute_mitigation(model, cfg: GroundingConfig, unit: Unit, state: dict) -> dict:
    s, df = unit.spec, state["df"]
    if s["condition"] == "greedy":                   # "before": the answers of the items stage
        greedy = dict(zip(df["item_id"], df["answer"]))
        return {"answers": [greedy[i] for i in s["items"]]}
    by_id = {it.item_id: it for it in build_items(limit=cfg.limit)}
    cond = {k: [HeadId.parse(h) for h in v] if k == "heads" else v for k, v in s["cond"].items()}
    return {"answers": [answer(model, by_id[i], state["detector"], cond, cfg.max_new_tokens, cfg.seed + s["offset"] + j)
                        for j, i in enumerate(s["items"])]}


def reduce_mitigation(model, cfg: GroundingConfig, payloads: dict, state: dict) -> GroundingResult:
    det, df = state["detector"], state["df"]
    mit = pd.DataFrame()
    if payloads:
        answers: dict[str, list[str]] = {}
        for uid, p in payloads.items():
            answers.setdefault(uid.rsplit("-", 1)[0], []).extend(p["answers"])
        mit = rates(answers, mitigation_items(cfg, df), conditions(det, cfg.k, cfg.alpha, cfg.boost))
    keep = [c for c in df.columns if c != "row_lr"]
    return GroundingResult(model.model_id, state["stats"], det.head_weights(), mit, heldout_roc(det, df), df[keep], det)


GROUNDING = Analysis(
    name="grounding", title="Grounding", order=50, icon=":material/fact_check:",
    description="The lookback ratio (attention on the context vs on new tokens) of every head feeds a "
                "logistic-regression detector of ungrounded answers; mitigation: detector-guided decoding and a "
                "boost on context keys.",
    paper="Chuang et al., EMNLP 2024, Lookback Lens; PAINT (arXiv 2501.12206)", url="https://arxiv.org/abs/2407.07071",
    methods="docs/methods.md §5", config=GroundingConfig, result=GroundingResult, min_samples=100,
    stages=(Stage("items", plan_items, compute_items, reduce_items, depends=("max_new_tokens", "reading"),
                  check=check_items),
            Stage("detector", plan_detector, compute_detector, reduce_detector, depends=("center", "n_perm", "seed",
                                                                                        "reading")),
            Stage("mitigation", plan_mitigation, compute_mitigation, reduce_mitigation,
                  depends=("max_new_tokens", "seed"))))
