"""Head importance by activation patching and attribution patching (Merullo et al. 2024, docs/methods.md §3).

**Exact patching.** Run the corrupted prompts and record every head's output ``z`` (before
``o_proj``) with a :func:`probe.tap` ``on_output`` observer. Then, for each head ``h``, run the clean
prompts with ``z_h`` replaced by its corrupted value at every position and measure
``LD_patched``; the forward resumes at the patched layer from the cached residual stream
(:func:`probe.families.record`), so layers below it are computed once per prompt batch, not once per
layer. The normalised score is ``(LD_patched - LD_clean) / (LD_corr - LD_clean)``
(means over prompts): 1 means the head alone carries the whole clean/corrupted difference.
For one prompt this is exactly ``MeanAblate(heads=[h], values=[z_corr[T, d_head]])`` (the engine's
per-position patch form, see :func:`patch_one`); to batch different prompts, whose corrupted values
differ, the same replacement is done per batch row by :class:`_Patch` — one forward per layer,
with the batch holding (prompt x head) copies.

**Attribution patching (EAP).** ``score_h ~ (z_corr - z_clean) . dLD/dz_h`` at the clean input: the
first-order Taylor estimate of the patching effect, for all heads from one backward pass.
**EAP-IG** (Hanna et al. 2024) averages the gradient over ``m`` inputs interpolated between the
corrupted and the clean input embeddings (``x_corr + k/m (x_clean - x_corr)``, k = 1..m).

All per-prompt values are kept ([N, L, H]) so scores can be bootstrapped over prompts.
"""
from __future__ import annotations

import numpy as np
import torch

from probe import InterventionSpec, MeanAblate, families, intervene, tap
from probe.heads import HeadId
from probe.shapes import HeadOutputs, HeadScoresT, PromptEffects

from .tasks import TaskBatch


def logit_diff(logits: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits[good]) - logsumexp(logits[bad])`` per row; ``logits [N, V]``, sets ``[N, G]`` (-1 pad)."""
    def lse(ids):
        vals = logits.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
        return torch.logsumexp(vals, dim=1)

    return lse(good) - lse(bad)


def _last_logits(model, ids=None, embeds=None) -> torch.Tensor:
    out = model.hf(input_ids=ids, inputs_embeds=embeds, logits_to_keep=1)
    return out.logits[:, -1].float()


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def run_ld(model, ids: torch.Tensor, good, bad, batch: int = 32, spec: InterventionSpec | None = None) -> torch.Tensor:
    """Logit difference per prompt ``[N]`` (float32, on the host; optionally under an intervention ``spec``)."""
    out = []
    with torch.no_grad():
        for sl in _chunks(ids.shape[0], batch):
            if spec:
                with intervene(model, spec):
                    logits = _last_logits(model, ids[sl])
            else:
                logits = _last_logits(model, ids[sl])
            out.append(logit_diff(logits, good[sl], bad[sl]).cpu())
    return torch.cat(out)


def accuracy(model, task: TaskBatch, batch: int = 32, spec: InterventionSpec | None = None) -> dict:
    """Pair accuracy (LD > 0), top-1 accuracy (argmax over the vocabulary is a good token), mean LD."""
    lds, top = [], []
    ctx = intervene(model, spec) if spec else None
    with torch.no_grad():
        if ctx:
            ctx.__enter__()
        try:
            for sl in _chunks(task.n, batch):
                logits = _last_logits(model, task.clean[sl])
                lds.append(logit_diff(logits, task.good[sl], task.bad[sl]))
                top.append((task.good[sl] == logits.argmax(1, keepdim=True)).any(1))
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
    ld, top = torch.cat(lds), torch.cat(top)
    return {"pair_accuracy": float((ld > 0).float().mean()), "top1_accuracy": float(top.float().mean()),
            "mean_ld": float(ld.mean())}


class _Record:
    """on_output observer keeping every layer's head outputs ``z [B, T, H, D]``."""

    layers = None

    def __init__(self):
        self.z: dict[int, torch.Tensor] = {}

    def on_output(self, layer, q_pos, out):
        self.z[layer] = out.detach().float().clone()


def record_z(model, ids: torch.Tensor, batch: int = 32) -> HeadOutputs:
    """Head outputs of every layer: ``[L, N, T, H, D]`` (float32, on the model's device: they are patched back in)."""
    parts = []
    with torch.no_grad():
        for sl in _chunks(ids.shape[0], batch):
            rec = _Record()
            with tap(model, rec):
                model.hf(input_ids=ids[sl], logits_to_keep=1)
            parts.append(torch.stack([rec.z[l] for l in range(model.n_layers)]))
    return torch.cat(parts, dim=1)


class _Patch:
    """Replace head ``heads[j]`` of ``layer`` in batch block ``j`` with ``values[:, :, heads[j]]``."""

    def __init__(self, layer: int, heads: list[int], values: torch.Tensor):
        self.layers, self.heads, self.values = {layer}, heads, values  # values [b, T, H, D]

    def on_output(self, layer, q_pos, out):
        out = out.clone()
        b = self.values.shape[0]
        for j, h in enumerate(self.heads):
            out[j * b:(j + 1) * b, :, h] = self.values[:, q_pos, h].to(out.dtype)
        return out


def exact_patching(model, task: TaskBatch, z_corr: HeadOutputs | None = None, rows: int = 96,
                   layers=None, resume: bool = True) -> PromptEffects:
    """``LD_patched [N, L, H]`` (host): clean run with one head's output set to its corrupted value.

    ``layers`` restricts the work to some layers (the others stay NaN). With ``resume`` (default)
    each prompt batch runs once through :func:`probe.families.record`, which keeps the residual
    stream entering every block, and the patch of layer ``l`` reruns only blocks ``l..L-1`` from it
    (:meth:`probe.families.Resume.run`): the layers below the patch compute nothing that changes.
    ``resume=False`` reruns the whole model per layer (the reference; same numbers).
    """
    L, H, N = model.n_layers, model.n_heads, task.n
    z_corr = record_z(model, task.corrupt) if z_corr is None else z_corr
    out = torch.full((N, L, H), float("nan"), device="cpu")
    todo = sorted(range(L) if layers is None else {int(l) for l in layers})
    per = max(1, rows // H)  # prompts per forward; the batch holds (head x prompt) copies
    with torch.no_grad():
        for sl in _chunks(N, per):
            b = sl.stop - sl.start
            ids, good, bad = task.clean[sl].repeat(H, 1), task.good[sl].repeat(H, 1), task.bad[sl].repeat(H, 1)
            ref = families.record(model, ids, start=todo[0], layers=todo, logits_to_keep=1) if resume else None
            for layer in todo:
                with tap(model, _Patch(layer, list(range(H)), z_corr[layer, sl])):
                    logits = ref.run(layer, keep=1)[:, -1].float() if resume else _last_logits(model, ids)
                out[sl, layer] = logit_diff(logits, good, bad).view(H, b).T.cpu()
    return out


def patch_one(model, task: TaskBatch, i: int, head: HeadId, z_corr: torch.Tensor) -> float:
    """Patch one head of prompt ``i`` with the engine's ``MeanAblate`` per-position form (reference path)."""
    spec = InterventionSpec([MeanAblate(heads=[head], values=[z_corr[head.layer, i, :, head.head]])])
    return float(run_ld(model, task.clean[i:i + 1], task.good[i:i + 1], task.bad[i:i + 1], spec=spec)[0])


def normalised(ld_patched: PromptEffects, ld_clean: torch.Tensor, ld_corr: torch.Tensor, idx=None) -> HeadScoresT:
    """``(mean LD_patched - mean LD_clean) / (mean LD_corr - mean LD_clean)`` over prompts ``idx`` -> ``[L, H]``."""
    if idx is not None:
        ld_patched, ld_clean, ld_corr = ld_patched[idx], ld_clean[idx], ld_corr[idx]
    clean = ld_clean.mean()
    return (ld_patched.mean(0) - clean) / (ld_corr.mean() - clean)


class _Grad:
    """on_output observer adding a zero leaf to every layer's ``z`` so ``dLD/dz`` can be read off it."""

    layers = None

    def __init__(self):
        self.delta: dict[int, torch.Tensor] = {}

    def on_output(self, layer, q_pos, out):
        d = torch.zeros_like(out, requires_grad=True)
        self.delta[layer] = d
        return out + d


def _grads(model, task, sl, embeds=None) -> torch.Tensor:
    g = _Grad()
    with torch.enable_grad(), tap(model, g):
        logits = _last_logits(model, None if embeds is not None else task.clean[sl], embeds)
        ld = logit_diff(logits, task.good[sl], task.bad[sl]).sum()
        grads = torch.autograd.grad(ld, [g.delta[l] for l in range(model.n_layers)])
    return torch.stack([x.float() for x in grads])  # [L, b, T, H, D]


def attribution_patching(model, task: TaskBatch, z_clean: HeadOutputs, z_corr: HeadOutputs,
                         ig_steps: int = 0, batch: int = 16) -> PromptEffects:
    """EAP (``ig_steps=0``) or EAP-IG estimate of ``LD_patched - LD_clean`` per prompt and head ``[N, L, H]`` (host).

    EAP-IG interpolates the input embeddings in float32 and feeds them in the model's dtype.
    """
    emb = families.embedding(model)
    out = []
    for sl in _chunks(task.n, batch):
        if ig_steps <= 0:
            grad = _grads(model, task, sl)
        else:
            with torch.no_grad():
                e_clean, e_corr = emb(task.clean[sl]), emb(task.corrupt[sl])
            dtype, e_clean, e_corr = e_clean.dtype, e_clean.float(), e_corr.float()
            grad = sum(_grads(model, task, sl, (e_corr + (k / ig_steps) * (e_clean - e_corr)).to(dtype))
                       for k in range(1, ig_steps + 1)) / ig_steps
        diff = z_corr[:, sl] - z_clean[:, sl]
        out.append((diff * grad).sum(dim=(2, 4)).permute(1, 0, 2).cpu())  # [b, L, H]
    return torch.cat(out)


def mean_values(z: torch.Tensor) -> torch.Tensor:
    """Per-position means over prompts ``[L, T, H, D]`` (the task's mean-ablation values)."""
    return z.mean(dim=1)


def ablate_spec(means: torch.Tensor, heads) -> InterventionSpec:
    """Mean-ablate ``heads`` with the task's per-position means."""
    heads = list(heads)
    if not heads:
        return InterventionSpec()
    return InterventionSpec([MeanAblate(heads=heads, values=[means[h.layer, :, h.head] for h in heads])])


def faithfulness(model, task: TaskBatch, circuit, means: torch.Tensor, ld_clean: torch.Tensor,
                 ld_none: torch.Tensor | None = None) -> dict:
    """Circuit alone (all other heads mean-ablated) keeps what fraction of LD; ablating it removes what.

    ``kept = LD_circuit_only / LD_clean``; ``kept_normalised`` subtracts the all-ablated baseline:
    ``(LD_circuit_only - LD_none) / (LD_clean - LD_none)``; ``removed = 1 - LD_circuit_ablated / LD_clean``
    (ratios of means over prompts). ``per_prompt`` keeps every prompt's LDs, so intervals
    (:func:`faithfulness_ci`) and paired comparisons with a control resample the same prompts.
    ``ld_none``: the all-ablated LDs when already known (they do not depend on the circuit).
    """
    circuit = set(circuit)
    everyone = [HeadId(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    rest = [h for h in everyone if h not in circuit]
    only = run_ld(model, task.clean, task.good, task.bad, spec=ablate_spec(means, rest))
    none = run_ld(model, task.clean, task.good, task.bad, spec=ablate_spec(means, everyone)) if ld_none is None \
        else ld_none
    ablated = run_ld(model, task.clean, task.good, task.bad, spec=ablate_spec(means, sorted(circuit)))
    per = {"ld_clean": ld_clean, "ld_circuit_only": only, "ld_all_ablated": none, "ld_circuit_ablated": ablated}
    per = {k: [float(x) for x in v.cpu().tolist()] for k, v in per.items()}
    return {k: float(np.mean(v)) for k, v in per.items()} | faithfulness_ratios(per) | {"n": len(per["ld_clean"]),
                                                                                       "per_prompt": per}


def faithfulness_ratios(per: dict, idx=None) -> dict:
    """``kept``, ``kept_normalised`` and ``removed`` from per-prompt LDs (optionally the prompts ``idx``)."""
    m = {k: float(np.mean(np.asarray(v, np.float64)[slice(None) if idx is None else idx])) for k, v in per.items()}
    clean, none, only, ablated = m["ld_clean"], m["ld_all_ablated"], m["ld_circuit_only"], m["ld_circuit_ablated"]
    nan = float("nan")
    return {"kept": only / clean if clean else nan,
            "kept_normalised": (only - none) / (clean - none) if clean != none else nan,
            "removed": 1 - ablated / clean if clean else nan}


def faithfulness_ci(f: dict, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Percentile bootstrap intervals over prompts of ``kept_normalised`` and ``removed`` (of :func:`faithfulness`)."""
    from ..inference import bootstrap

    per = f["per_prompt"]
    return {key: list(bootstrap(lambda i, key=key: faithfulness_ratios(per, i)[key], len(per["ld_clean"]),
                                n_boot=n_boot, seed=seed)) for key in ("kept_normalised", "removed")}
