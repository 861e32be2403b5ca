"""The similarity scan as stages: prompts -> echo trials -> sharing plan -> result.

``prompts``: one unit per prompt, its similarity sums (one forward, block-wise products,
:mod:`.measure`); the reduce averages them, matches heads across adjacent layers and clusters head
families. ``echo``: the held-out baseline loss and, per variant and adjacent pair, the loss when layer l+1 reuses layer
l's pattern (:mod:`.echo`). ``plan``: the greedy sharing plan, one measured trial a unit (each
trial depends on the ones before, so the stage repeats until the search ends). ``report``
assembles the :class:`SimilarityResult`. Methods: docs/methods.md §4.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from probe import InterventionSpec
from probe.errors import InputError

from ..config import Config, opt
from ..contract import Analysis, Stage, Unit, no_units
from .checks import check_loss, check_prompt
from .data import load_texts
from .echo import PlanSearch, echo_edits, next_trial, pair_perm, plan_spec, pooled, record_trial, text_losses
from .measure import Accumulator, accumulate_prompt, head_families, match_heads
from .result import SimilarityResult

VARIANTS = ("same", "matched", "random")
SUMS = ("layer_cos_sum", "head_cos_sum", "layer_js_sum", "head_js_sum")


@dataclass(frozen=True)
class SimilarityConfig(Config):
    """Prompt and held-out sets, the block-wise measure, the echo variants and the plan search."""

    prompts: str = opt("prompts", "text set in data/similarity (or a file of blank-line separated paragraphs)")
    heldout: str = opt("heldout", "held-out text set for the echo loss")
    n_prompts: int | None = opt(None, "use only the first N prompts", min=1)
    n_heldout: int | None = opt(None, "use only the first N held-out texts", min=1)
    max_tokens: int = opt(128, "tokens per text (longer texts are cut)", min=2)
    window: int = opt(64, "query rows per block of products (memory O(L*H*window*T))", min=1)
    head_js: Literal["adjacent", "all", "none"] = opt("adjacent", "head pairs with a Jensen-Shannon divergence")
    variants: tuple[Literal["same", "matched", "random"], ...] = opt(VARIANTS, "echo variants (random: the control)")
    n_clusters: int = opt(8, "head families (agglomerative clusters)", min=1)
    budget: float = opt(0.1, "loss budget of the sharing plan (nats/token)", min=0)
    plan_variant: Literal["same", "matched", "random"] = opt("matched", "head map used by the sharing plan")
    max_trials: int = opt(10, "merges the plan search measures", min=0)

    @classmethod
    def small(cls, model) -> "SimilarityConfig":
        return cls(n_prompts=3, n_heldout=1, max_tokens=48, variants=("matched",), max_trials=2)


def tokenize(model, texts: Sequence[str], max_tokens: int, what: str) -> list[torch.Tensor]:
    """Token ids ``[1, T]`` per text, cut to ``max_tokens``; one-token or empty texts are errors."""
    if isinstance(texts, str) or not len(texts):
        raise InputError(f"the {what} set must be a non-empty list of texts")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{what} {i} is empty: remove it or give at least two tokens of text")
        ids = model.tokenizer(text, return_tensors="pt").input_ids[:, :min(max_tokens, model.n_ctx)]
        if ids.shape[1] < 2:
            raise InputError(f"{what} {i} ({text!r}) is one token: similarity and loss need >= 2 tokens")
        out.append(ids.to(model.device))
    return out


def _texts(name: str, n: int | None) -> list[str]:
    return load_texts(name)[:n]


def _heldout(model, cfg: SimilarityConfig) -> list[torch.Tensor]:
    return tokenize(model, _texts(cfg.heldout, cfg.n_heldout), cfg.max_tokens, "held-out text")


# ----------------------------------------------------------------------------- stage 1: prompts

def plan_prompts(model, cfg: SimilarityConfig, _) -> list[Unit]:
    if model.n_layers < 2:
        raise InputError("the echo experiment needs a model with at least two layers")
    texts = _texts(cfg.prompts, cfg.n_prompts)
    tokenize(model, texts, cfg.max_tokens, "prompt")              # bad texts fail before any work
    _heldout(model, cfg)
    return [Unit(f"prompt-{i:04d}", {"text": t}) for i, t in enumerate(texts)]


def compute_prompt(model, cfg: SimilarityConfig, unit: Unit, _) -> dict:
    ids = tokenize(model, [unit.spec["text"]], cfg.max_tokens, "prompt")[0]
    acc = Accumulator(model.n_layers, model.n_heads, cfg.head_js)
    accumulate_prompt(model, ids, acc, cfg.window)
    return {k: getattr(acc, k) for k in SUMS} | {"n_rows": acc.n_rows}


def reduce_prompts(model, cfg: SimilarityConfig, payloads: dict, _) -> dict:
    total = Accumulator(model.n_layers, model.n_heads, cfg.head_js)
    for p in payloads.values():
        for k in SUMS:
            setattr(total, k, getattr(total, k) + p[k])
        total.n_rows += int(p["n_rows"])
        total.n_prompts += 1
    mats = total.finish()
    L, H = model.n_layers, model.n_heads
    perms = np.stack([match_heads(mats["head_cos"], L, H, l, l + 1) for l in range(L - 1)])
    adjacent = np.stack([np.diag(np.asarray(p["layer_cos_sum"]), 1) for p in payloads.values()])  # [prompt, L-1]
    return {"mats": mats, "perms": perms, "n_prompts": total.n_prompts, "n_rows": total.n_rows,
            "prompt_adjacent": adjacent}


# ----------------------------------------------------------------------------- stage 2: echo losses

def _loss_unit(uid: str, kind: str, edits: list, texts_key: str, **spec) -> Unit:
    return Unit(uid, {"kind": kind, "spec": InterventionSpec(edits).to_dict(), "heldout": texts_key, **spec})


def _texts_key(model, cfg: SimilarityConfig) -> str:
    ids = [t[0].tolist() for t in _heldout(model, cfg)]
    return hashlib.sha256(repr(ids).encode()).hexdigest()[:16]


def plan_echo(model, cfg: SimilarityConfig, state: dict) -> list[Unit]:
    key, L, H = _texts_key(model, cfg), model.n_layers, model.n_heads
    units = [_loss_unit("baseline", "baseline", [], key)]
    for v in cfg.variants:
        for l in range(L - 1):
            perm = pair_perm(v, state["mats"]["head_cos"], L, H, l, l + 1)
            units.append(_loss_unit(f"echo-{v}-{l:03d}", "echo", echo_edits(l, l + 1, perm), key, variant=v, layer=l))
    return units


def compute_loss(model, cfg: SimilarityConfig, unit: Unit, _) -> dict:
    spec = InterventionSpec.from_dict(unit.spec["spec"])
    texts = text_losses(model, _heldout(model, cfg), spec if spec else None)
    return {"loss": float(pooled(texts)), "texts": texts}


def reduce_echo(model, cfg: SimilarityConfig, payloads: dict, state: dict) -> dict:
    base = payloads["baseline"]["loss"]
    pairs = range(model.n_layers - 1)
    echo = {v: np.array([payloads[f"echo-{v}-{l:03d}"]["loss"] - base for l in pairs]) for v in cfg.variants}
    texts = {v: np.stack([np.asarray(payloads[f"echo-{v}-{l:03d}"]["texts"]) for l in pairs]) for v in cfg.variants}
    base_texts = np.asarray(payloads["baseline"]["texts"])
    return state | {"base": base, "echo": echo, "search": PlanSearch.start(model.n_layers), "base_texts": base_texts,
                    "echo_texts": texts, "plan_texts": base_texts}


# ----------------------------------------------------------------------------- stage 3: the plan, one trial a unit

def plan_trial(model, cfg: SimilarityConfig, state: dict) -> list[Unit]:
    search = state["search"]
    step = next_trial(state["mats"]["layer_cos"], search) if len(search.log) < cfg.max_trials else None
    if step is None:
        return []
    trial = step[0]
    spec = plan_spec([list(b) for b in trial], cfg.plan_variant, state["mats"]["head_cos"], model.n_layers,
                     model.n_heads)
    return [_loss_unit(f"trial-{len(search.log):03d}", "plan", list(spec.edits), _texts_key(model, cfg),
                       blocks=[list(b) for b in trial])]


def reduce_trial(model, cfg: SimilarityConfig, payloads: dict, state: dict) -> dict:
    if not payloads:
        return state
    (payload,) = payloads.values()
    trial, score, merge = next_trial(state["mats"]["layer_cos"], state["search"])
    search = record_trial(state["search"], trial, score, merge, payload["loss"] - state["base"], cfg.budget)
    kept = search.log[-1]["accepted"]
    return state | {"search": search, "plan_texts": np.asarray(payload["texts"]) if kept else state["plan_texts"]}


def report(model, cfg: SimilarityConfig, _, state: dict) -> SimilarityResult:
    mats, search, L, H = state["mats"], state["search"], model.n_layers, model.n_heads
    return SimilarityResult(
        model_id=model.model_id, n_layers=L, n_heads=H, n_prompts=state["n_prompts"], n_rows=state["n_rows"],
        window=cfg.window, layer_cos=mats["layer_cos"], layer_js=mats["layer_js"], head_cos=mats["head_cos"],
        head_js=mats["head_js"], perms=state["perms"], families=head_families(mats["head_cos"], cfg.n_clusters),
        baseline_loss=state["base"], echo=state["echo"], plan_variant=cfg.plan_variant, plan_budget=cfg.budget,
        plan_blocks=search.blocks, plan_cost=search.cost, plan_log=search.log,
        n_heldout_tokens=int(sum(i.shape[1] - 1 for i in _heldout(model, cfg))),
        prompt_adjacent=state["prompt_adjacent"], base_texts=state["base_texts"], echo_texts=state["echo_texts"],
        plan_texts=state["plan_texts"])


SIMILARITY = Analysis(
    name="similarity", title="Layer similarity", order=40, icon=":material/layers:",
    description="Cosine and Jensen-Shannon similarity of attention maps between layers and heads; the echo "
                "experiment reuses layer l's pattern in layer l+1 and measures the loss increase; a greedy plan "
                "shares layers under a loss budget.",
    paper="Rajabzadeh et al. 2024, EchoAtt: Attend, Copy, then Adjust", url="https://arxiv.org/abs/2409.14595",
    methods="docs/methods.md §4", config=SimilarityConfig, result=SimilarityResult, min_samples=20,
    stages=(Stage("prompts", plan_prompts, compute_prompt, reduce_prompts, depends=("max_tokens", "head_js"),
                  check=check_prompt),
            Stage("echo", plan_echo, compute_loss, reduce_echo, depends=("max_tokens",), check=check_loss),
            Stage("plan", plan_trial, compute_loss, reduce_trial, depends=("max_tokens",), repeat=True,
                  check=check_loss),
            Stage("report", no_units, None, report)))
