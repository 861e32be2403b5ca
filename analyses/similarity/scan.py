"""The pure entry point: similarity over a prompt set, echo experiment, sharing plan.

With ``work_dir`` every finished unit (one prompt's sums, one echo loss, one plan trial) is
written atomically under ``work_dir/units`` and skipped on rerun, so an interrupted scan resumes.
Unit names carry a hash of the model weights and the token ids they depend on.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from probe.atomic import read_json, read_tensors, write_json, write_tensors
from probe.errors import CorruptFileError, InputError

from .echo import echo_edits, greedy_plan, mean_loss, pair_perm, plan_spec
from .measure import Accumulator, accumulate_prompt, head_families, match_heads
from .result import SimilarityResult

VARIANTS = ("same", "matched", "random")
UNIT_FORMAT = "headwise.similarity_unit"


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


def _key(model, *parts) -> str:
    h = hashlib.sha256(str(getattr(model, "weights_hash", model.model_id)).encode())
    for p in parts:
        h.update(json.dumps(p, default=lambda t: t.tolist()).encode())
    return h.hexdigest()[:12]


def measure_similarity(model, prompts: Sequence[torch.Tensor], window: int = 128, head_js: str = "adjacent",
                       units: Path | None = None) -> Accumulator:
    """Accumulate similarity over ``prompts`` (token ids), one window of query rows at a time."""
    total = Accumulator(model.n_layers, model.n_heads, head_js)
    for ids in tqdm(prompts, desc="similarity", unit="prompt"):
        path = units / f"prompt-{_key(model, ids, head_js)}.safetensors" if units else None
        acc = _load_unit(path, total) if path else None
        if acc is None:
            acc = Accumulator(model.n_layers, model.n_heads, head_js)
            accumulate_prompt(model, ids, acc, window)
            if path:
                write_tensors(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _sums(acc).items()},
                              {"format": UNIT_FORMAT, "version": 1, "n_rows": acc.n_rows})
        _merge(total, acc)
    return total


def _sums(acc: Accumulator) -> dict[str, np.ndarray]:
    return {"layer_cos_sum": acc.layer_cos_sum, "head_cos_sum": acc.head_cos_sum,
            "layer_js_sum": acc.layer_js_sum, "head_js_sum": acc.head_js_sum}


def _load_unit(path: Path, like: Accumulator) -> Accumulator | None:
    if not path.exists():
        return None
    tensors, meta = read_tensors(path, UNIT_FORMAT)
    acc = Accumulator(like.n_layers, like.n_heads, like.head_js)
    for k, v in tensors.items():
        if getattr(acc, k).shape != tuple(v.shape):
            raise CorruptFileError(f"{path} has the wrong shape for {k}; delete it and rerun")
        setattr(acc, k, v.double().numpy())
    acc.n_rows, acc.n_prompts = int(meta["n_rows"]), 1
    return acc


def _merge(total: Accumulator, acc: Accumulator) -> None:
    for k, v in _sums(acc).items():
        setattr(total, k, getattr(total, k) + v)
    total.n_rows += acc.n_rows
    total.n_prompts += acc.n_prompts


class _Losses:
    """Cached loss measurements (one JSON per finished unit when ``units`` is given)."""

    def __init__(self, model, texts, units: Path | None):
        self.model, self.texts, self.units = model, texts, units
        self.tag = _key(model, texts)

    def __call__(self, name: str, spec) -> float:
        spec_tag = hashlib.sha256((spec.to_json() if spec else "").encode()).hexdigest()[:8]
        path = self.units / f"loss-{self.tag}-{name}-{spec_tag}.json" if self.units else None
        if path and path.exists():
            return float(read_json(path, "loss unit")["loss"])
        loss = mean_loss(self.model, self.texts, spec)
        if path:
            write_json(path, {"name": name, "loss": loss, "spec": json.loads(spec.to_json()) if spec else None})
        return loss


def similarity_scan(model, prompts: Sequence[str], heldout: Sequence[str], *, max_tokens: int = 128,
                    window: int = 64, head_js: str = "adjacent", variants: Sequence[str] = VARIANTS,
                    n_clusters: int = 8, budget: float = 0.1, plan_variant: str = "matched",
                    max_trials: int = 10, work_dir: str | Path | None = None) -> SimilarityResult:
    """Layer/head attention similarity on ``prompts``; echo costs and a sharing plan on ``heldout``.

    >>> from probe import load_model
    >>> r = similarity_scan(load_model("tiny-llama"), ["hello there"], ["a b c d"], variants=("same",),
    ...                     max_trials=1)
    >>> r.layer_cos.shape, round(float(r.layer_cos[0, 0]), 6)
    ((2, 2), 1.0)
    """
    bad = [v for v in variants if v not in VARIANTS]
    if bad or plan_variant not in VARIANTS:
        raise InputError(f"unknown echo variant(s) {bad or [plan_variant]}: choose from {VARIANTS}")
    if model.n_layers < 2:
        raise InputError("the echo experiment needs a model with at least two layers")
    units = Path(work_dir) / "units" if work_dir else None
    p_ids = tokenize(model, prompts, max_tokens, "prompt")
    h_ids = tokenize(model, heldout, max_tokens, "held-out text")
    mats = measure_similarity(model, p_ids, window, head_js, units).finish()
    L, H = model.n_layers, model.n_heads
    head_cos = mats["head_cos"]
    perms = np.stack([match_heads(head_cos, L, H, l, l + 1) for l in range(L - 1)])
    losses = _Losses(model, h_ids, units)
    base = losses("baseline", None)
    echo = {}
    for v in variants:
        echo[v] = np.array([losses(f"{v}-{l}", _pair_spec(v, head_cos, L, H, l)) - base
                            for l in tqdm(range(L - 1), desc=f"echo {v}", unit="pair")])
    with tqdm(total=max_trials, desc="sharing plan", unit="trial") as bar:
        def measure(blocks):
            bar.update(1)
            return losses("plan-" + "_".join("-".join(map(str, b)) for b in blocks),
                          plan_spec(blocks, plan_variant, head_cos, L, H)) - base
        blocks, cost, log = greedy_plan(mats["layer_cos"], measure, budget, max_trials)
    return SimilarityResult(
        model_id=model.model_id, n_layers=L, n_heads=H, n_prompts=len(p_ids), n_rows=int(sum(i.shape[1] for i in p_ids)),
        window=window, layer_cos=mats["layer_cos"], layer_js=mats["layer_js"], head_cos=head_cos,
        head_js=mats["head_js"], perms=perms, families=head_families(head_cos, n_clusters),
        baseline_loss=base, echo=echo, plan_variant=plan_variant, plan_budget=budget,
        plan_blocks=tuple(tuple(b) for b in blocks), plan_cost=cost, plan_log=tuple(log),
        n_heldout_tokens=int(sum(i.shape[1] - 1 for i in h_ids)))


def _pair_spec(variant, head_cos, L, H, l):
    from probe import InterventionSpec

    return InterventionSpec(echo_edits(l, l + 1, pair_perm(variant, head_cos, L, H, l, l + 1)))
