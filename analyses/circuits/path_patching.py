"""Circuits by path patching (Wang et al. 2022, "Interpretability in the Wild"; Merullo et al. 2024 §3).

Path patching asks how much of the clean/corrupted logit difference flows along one *path*:
sender head ``s`` -> receivers ``R`` (the logits, or the queries / keys / values of receiver heads).
For each sender (docs/methods.md §3):

1. run the clean prompt with ``s``'s output ``z`` set to its corrupted value and **every other
   head frozen at its clean value** (MLPs recompute); for ``R = logits`` the metric is read here;
2. otherwise record the receivers' input projections (``q``/``k``/``v`` of the receiver heads) in
   that run, and run the clean prompt again with only those projections replaced; read the metric.

Score ``(LD_patched - LD_clean) / (LD_corr - LD_clean)`` (means over prompts): 1 = the path carries
the whole effect. A circuit is built stage by stage (:class:`Stage`): the first stage's receivers
are the logits, each later stage's receivers are the heads an earlier stage selected; the top
``frac`` of *all* heads (the paper's ~2%) by |score| is kept per stage. EAP / EAP-IG scores
(:mod:`.patching`) shortlist the senders; path patching confirms them.

Readings: receivers of a stage are patched together (Wang et al.'s "to the queries of the name
movers"); with grouped-query attention a ``k``/``v`` receiver is its *KV head*, which its query-head
siblings share. The projections are patched before RoPE (RoPE is position-wise, so this equals
patching after it); :mod:`probe.families` names them per family (after OLMo2's q/k norms, which
span all heads). Families that fuse q/k/v into one matrix (GPT-2, GPT-NeoX, Phi-3) are refused
for q/k/v stages with a typed error, never approximated.

>>> from probe import load_model
>>> from analyses.circuits.tasks import make_task
>>> m = load_model("tiny-llama")
>>> r = path_patching_circuit(m, make_task(m, "induction", n=2), INDUCTION_STAGES, frac=0.125, shortlist=None)
>>> [s.name for s in r.stages], len(r.stage("induction").candidates), len(r.stage("induction").selected)
(['induction', 'previous_token'], 8, 1)
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probe import families, tap
from probe.errors import InputError
from probe.heads import HeadId

from . import patching as P
from .tasks import TaskBatch

CHANNELS = ("logits", "q", "k", "v")


@dataclass(frozen=True)
class Stage:
    """One patching stage: senders -> ``receivers`` (an earlier stage's heads, or ``None`` = logits)."""

    name: str
    receivers: str | None = None
    channel: str = "logits"

    def __post_init__(self):
        if self.channel not in CHANNELS:
            raise InputError(f"stage {self.name!r}: channel must be one of {CHANNELS}, not {self.channel!r}")
        if (self.receivers is None) != (self.channel == "logits"):
            raise InputError(f"stage {self.name!r}: the logits channel has no receiver heads and a q/k/v "
                             "channel needs an earlier stage as receivers")


IOI_STAGES = (Stage("name_movers"), Stage("s_inhibition", "name_movers", "q"),
              Stage("induction_duplicate", "s_inhibition", "v"), Stage("previous_token", "induction_duplicate", "k"))
INDUCTION_STAGES = (Stage("induction"), Stage("previous_token", "induction", "k"))


# ----------------------------------------------------------------------------- model access

def head_inputs(model, channel: str) -> list[torch.nn.Module]:
    """Per layer, the module whose output is every head's ``channel`` (q/k/v) (:func:`probe.families.head_input`);
    families that fuse q/k/v into one projection (GPT-2, GPT-NeoX, Phi-3) are refused."""
    fam = families.family(model)
    if fam.head_inputs is None:
        raise InputError(f"path patching into q/k/v needs separate q_proj/k_proj/v_proj projections; "
                         f"{getattr(model, 'model_id', fam.name)} ({fam.name}) fuses them into one: use "
                         "receivers='logits' stages only")
    return [families.head_input(model, l, channel) for l in range(model.n_layers)]


class _Stop(Exception):
    """Raised once the receivers' projections are recorded: the rest of the forward is not needed."""


class _Freeze:
    """on_output observer: every head at its clean value; block ``j`` of the batch gets sender ``j`` corrupted."""

    layers = None

    def __init__(self, z_clean, z_corr, senders: list[HeadId], b: int):
        self.z_clean, self.z_corr, self.senders, self.b = z_clean, z_corr, senders, b   # z [L, b, T, H, D]

    def on_output(self, layer, q_pos, out):
        new = self.z_clean[layer][:, q_pos].repeat(len(self.senders), 1, 1, 1).to(out.dtype)
        for j, s in enumerate(self.senders):
            if s.layer == layer:
                new[j * self.b:(j + 1) * self.b, :, s.head] = self.z_corr[layer][:, q_pos, s.head].to(out.dtype)
        return new


def _slots(model, heads: list[HeadId], channel: str) -> dict[int, list[int]]:
    """Per layer, the head indices to patch in the ``channel`` projection (KV heads for k/v)."""
    group = model.n_heads // model.n_kv_heads
    out: dict[int, set[int]] = {}
    for h in heads:
        out.setdefault(h.layer, set()).add(h.head if channel == "q" else h.head // group)
    return {l: sorted(v) for l, v in out.items()}


_HOOKS: ContextVar[object | None] = ContextVar("headwise_path_patching", default=None)


@contextmanager
def _proj_hooks(model, slots, channel: str, store: dict, replace: dict | None, stop_at: int | None):
    """Forward hooks on the ``channel`` projections: record (``replace=None``) or overwrite head slices.

    The hooks act only on forwards of the calling context (a ``ContextVar`` token, as in
    :mod:`probe.families`): another thread running the shared model meanwhile is left alone.
    """
    d, hooks, token = model.d_head, [], object()
    mods = head_inputs(model, channel)
    for layer, heads in slots.items():
        proj = mods[layer]

        def hook(mod, args, out, layer=layer, heads=heads):
            if _HOOKS.get() is not token:
                return None
            if replace is None:
                store[layer] = out.detach().clone()
                if layer == stop_at:
                    raise _Stop
                return None
            out = out.clone()
            for h in heads:
                out[..., h * d:(h + 1) * d] = replace[layer][..., h * d:(h + 1) * d].to(out.dtype)
            return out

        hooks.append(proj.register_forward_hook(hook))
    reset = _HOOKS.set(token)
    try:
        yield
    finally:
        _HOOKS.reset(reset)
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- patching

@torch.no_grad()
def path_patch(model, task: TaskBatch, senders: list[HeadId], receivers: list[HeadId] | None, channel: str,
               z_clean: torch.Tensor, z_corr: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """``LD_patched [N, len(senders)]`` for the paths sender -> receivers (``channel``), one sender at a time.

    ``z_clean``/``z_corr`` ``[L, N, T, H, D]`` from :func:`analyses.circuits.patching.record_z`.
    """
    if channel not in CHANNELS:
        raise InputError(f"channel must be one of {CHANNELS}, not {channel!r}")
    if channel != "logits" and not receivers:
        raise InputError(f"path patching into {channel!r} needs at least one receiver head")
    N, out = task.n, torch.full((task.n, len(senders)), float("nan"), device="cpu")
    per_s = max(1, rows // max(1, min(N, rows)))          # senders per forward
    per_n = max(1, rows // per_s)                          # prompts per forward
    slots = _slots(model, receivers or [], channel) if channel != "logits" else {}
    for s0 in range(0, len(senders), per_s):
        block = senders[s0:s0 + per_s]
        for sl in P._chunks(N, per_n):
            b = sl.stop - sl.start
            ids = task.clean[sl].repeat(len(block), 1)
            good, bad = task.good[sl].repeat(len(block), 1), task.bad[sl].repeat(len(block), 1)
            freeze = _Freeze([z[sl] for z in z_clean], [z[sl] for z in z_corr], block, b)
            if channel == "logits":
                with tap(model, freeze):
                    ld = P.logit_diff(P._last_logits(model, ids), good, bad)
            else:
                ld = _via_receivers(model, ids, good, bad, freeze, slots, channel)
            out[sl, s0:s0 + len(block)] = ld.view(len(block), b).T.cpu()
    return out


def _via_receivers(model, ids, good, bad, freeze, slots, channel) -> torch.Tensor:
    store: dict[int, torch.Tensor] = {}
    try:
        with _proj_hooks(model, slots, channel, store, None, max(slots)), tap(model, freeze):
            model.hf(input_ids=ids, logits_to_keep=1)
    except _Stop:
        pass
    with _proj_hooks(model, slots, channel, {}, store, None):
        return P.logit_diff(P._last_logits(model, ids), good, bad)


# ----------------------------------------------------------------------------- stages -> circuit

@dataclass(frozen=True, eq=False)
class StageResult:
    """One stage: its senders' path-patching scores (normalised), the shortlist and the kept heads."""

    name: str
    channel: str
    receivers: tuple[HeadId, ...]
    candidates: tuple[HeadId, ...]       # senders that were path patched (the shortlist)
    ld_patched: np.ndarray               # [N, len(candidates)]
    scores: np.ndarray                   # [len(candidates)] normalised
    selected: tuple[HeadId, ...]


@dataclass(frozen=True, eq=False)
class PathPatchingResult:
    """Stages of a path-patched circuit on one task, at one ``frac``; ``circuit`` is their union."""

    task: str
    frac: float
    ld_clean: np.ndarray
    ld_corr: np.ndarray
    stages: tuple[StageResult, ...]
    shortlist_scores: np.ndarray = field(repr=False, default=None)   # [L, H] |EAP(-IG)| used to shortlist

    @property
    def circuit(self) -> list[HeadId]:
        return sorted({h for s in self.stages for h in s.selected})

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise InputError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def to_frame(self) -> pd.DataFrame:
        """One row per stage and path-patched sender: layer, head, score, selected."""
        rows = [{"task": self.task, "frac": self.frac, "stage": s.name, "channel": s.channel,
                 "layer": h.layer, "head": h.head, "score": float(v), "selected": h in s.selected}
                for s in self.stages for h, v in zip(s.candidates, s.scores)]
        return pd.DataFrame(rows, columns=["task", "frac", "stage", "channel", "layer", "head", "score", "selected"])

    def plot(self):
        """Bar chart of each stage's path-patching scores (kept heads highlighted)."""
        import plotly.express as px

        df = self.to_frame()
        df["sender"] = [repr(HeadId(int(a), int(b))) for a, b in zip(df["layer"], df["head"])]
        fig = px.bar(df, x="sender", y="score", color="selected", facet_row="stage",
                     title=f"Path patching ({self.task}, top {self.frac:.0%} per stage)")
        return fig.update_xaxes(matches=None)

    def to_dict(self) -> dict:
        st = [{"name": s.name, "channel": s.channel, "receivers": [repr(h) for h in s.receivers],
               "candidates": [repr(h) for h in s.candidates], "ld_patched": s.ld_patched.tolist(),
               "scores": s.scores.tolist(), "selected": [repr(h) for h in s.selected]} for s in self.stages]
        return {"format": "headwise.path_patching", "version": 1, "task": self.task, "frac": self.frac,
                "ld_clean": self.ld_clean.tolist(), "ld_corr": self.ld_corr.tolist(), "stages": st,
                "shortlist_scores": None if self.shortlist_scores is None else self.shortlist_scores.tolist()}

    def save(self, path) -> Path:
        from probe.atomic import write_json

        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path) -> "PathPatchingResult":
        from probe.atomic import read_json

        return cls.from_dict(read_json(path, "path patching result"), path)

    @classmethod
    def from_dict(cls, d: dict, where="payload") -> "PathPatchingResult":
        from probe.errors import CorruptFileError

        if not isinstance(d, dict) or d.get("format") != "headwise.path_patching":
            raise CorruptFileError(f"{where} is not a headwise path patching result: rerun the circuits scan")
        hs = lambda xs: tuple(HeadId.parse(x) for x in xs)  # noqa: E731
        stages = tuple(StageResult(s["name"], s["channel"], hs(s["receivers"]), hs(s["candidates"]),
                                   np.asarray(s["ld_patched"], float), np.asarray(s["scores"], float), hs(s["selected"]))
                       for s in d["stages"])
        ss = d.get("shortlist_scores")
        return cls(d["task"], float(d["frac"]), np.asarray(d["ld_clean"], float), np.asarray(d["ld_corr"], float),
                   stages, None if ss is None else np.asarray(ss, float))


def _candidates(model, receivers: list[HeadId], taken: set[HeadId], rank: np.ndarray | None,
                shortlist: int | None) -> list[HeadId]:
    """Senders upstream of the receivers (all heads for the logits), not already in the circuit, shortlisted."""
    top = max((h.layer for h in receivers), default=model.n_layers)
    pool = [HeadId(l, h) for l in range(top) for h in range(model.n_heads) if HeadId(l, h) not in taken]
    if shortlist is not None and rank is not None and len(pool) > shortlist:
        pool = sorted(pool, key=lambda x: -rank[x.layer, x.head])[:shortlist]
    return sorted(pool)


def path_patching_circuit(model, task: TaskBatch, stages=IOI_STAGES, *, frac: float = 0.02,
                          shortlist: int | None = 30, method: str = "eap_ig", ig_steps: int = 5,
                          cache: dict | None = None, progress: bool = False) -> PathPatchingResult:
    """Build a circuit stage by stage; each stage keeps the top ``frac`` of all heads by |path score|.

    ``shortlist``: path patch only the ``shortlist`` senders ranked highest by |``method``| (``"eap"``,
    ``"eap_ig"``, or ``"exact"`` activation patching); ``None`` patches every eligible sender.
    ``cache``: a dict reused across calls on the same task (recorded activations, LDs, shortlist
    scores, and every stage's patched LDs by (channel, receivers, senders)), e.g. to report the 2% and
    the 5% circuits without patching the same paths twice.
    """
    if not 0 < frac <= 1:
        raise InputError(f"frac must be in (0, 1], not {frac}: the paper keeps ~0.02 of heads per stage")
    names = [s.name for s in stages]
    for i, s in enumerate(stages):
        if s.receivers is not None and s.receivers not in names[:i]:
            raise InputError(f"stage {s.name!r} receives from {s.receivers!r}, which is not an earlier stage")
    c = _prepare(model, task, method, ig_steps, shortlist, {} if cache is None else cache)
    k = max(1, int(round(frac * model.n_layers * model.n_heads)))
    done: dict[str, StageResult] = {}
    taken: set[HeadId] = set()
    for s in stages:
        recv = list(done[s.receivers].selected) if s.receivers else []
        cands = _candidates(model, recv, taken, c.get("rank"), shortlist)
        key = (s.channel, tuple(recv), tuple(cands))          # the same paths at another frac: patched once
        if key not in c.setdefault("paths", {}):
            c["paths"][key] = path_patch(model, task, cands, recv or None, s.channel, c["z_clean"], c["z_corr"]) \
                if cands else torch.zeros(task.n, 0, device="cpu")
        ld = c["paths"][key]
        clean, corr = c["ld_clean"].mean(), c["ld_corr"].mean()
        scores = ((ld.mean(0) - clean) / (corr - clean)).numpy().astype(np.float64)
        order = np.argsort(-np.abs(scores), kind="stable")[:k]
        sel = tuple(sorted(cands[i] for i in order))
        done[s.name] = StageResult(s.name, s.channel, tuple(recv), tuple(cands), ld.numpy().astype(np.float64),
                                   scores, sel)
        taken |= set(sel)
        if progress:
            print(f"{task.name} {s.name}: {len(cands)} senders patched, kept {[repr(h) for h in sel]}")
    return PathPatchingResult(task.name, float(frac), c["ld_clean"].numpy().astype(np.float64),
                              c["ld_corr"].numpy().astype(np.float64), tuple(done[n] for n in names), c.get("rank"))


def _prepare(model, task, method, ig_steps, shortlist, cache: dict) -> dict:
    if "z_clean" not in cache:
        cache["ld_clean"] = P.run_ld(model, task.clean, task.good, task.bad)
        cache["ld_corr"] = P.run_ld(model, task.corrupt, task.good, task.bad)
        cache["z_clean"], cache["z_corr"] = P.record_z(model, task.clean), P.record_z(model, task.corrupt)
    if shortlist is not None and "rank" not in cache:
        if method == "exact":
            eff = P.exact_patching(model, task, cache["z_corr"]) - cache["ld_clean"][:, None, None]
        elif method in ("eap", "eap_ig"):
            eff = P.attribution_patching(model, task, cache["z_clean"], cache["z_corr"],
                                         ig_steps=ig_steps if method == "eap_ig" else 0)
        else:
            raise InputError(f"shortlist method must be 'eap', 'eap_ig' or 'exact', not {method!r}")
        cache["rank"] = np.abs(eff.mean(0).numpy().astype(np.float64))
    return cache


def resampled_circuit(res: PathPatchingResult, idx, n_heads_total: int) -> set[HeadId]:
    """The circuit re-selected from prompts ``idx`` (each stage's candidates and receivers kept as run).

    A conditional bootstrap: resampling never reruns a stage, so later stages keep the receivers
    the full run chose; it measures how stable each stage's top set is over prompts.
    """
    idx = np.asarray(idx)
    clean, corr = res.ld_clean[idx].mean(), res.ld_corr[idx].mean()
    k = max(1, int(round(res.frac * n_heads_total)))
    out: set[HeadId] = set()
    for s in res.stages:
        if not len(s.candidates):
            continue
        sc = (s.ld_patched[idx].mean(0) - clean) / (corr - clean)
        out |= {s.candidates[i] for i in np.argsort(-np.abs(sc), kind="stable")[:k]}
    return out


def path_overlap(a: PathPatchingResult, b: PathPatchingResult, n_heads_total: int, *, n_boot: int = 500,
                 seed: int = 0) -> dict:
    """Jaccard and overlap coefficient of two tasks' path-patched circuits, each with a bootstrap over
    prompts (:func:`resampled_circuit`) and a random-head-set null of the same sizes."""
    from .. import inference as inf
    from .overlap import random_null

    ca, cb = set(a.circuit), set(b.circuit)
    rng = np.random.default_rng(seed)
    boots = [(resampled_circuit(a, rng.integers(0, len(a.ld_clean), len(a.ld_clean)), n_heads_total),
              resampled_circuit(b, rng.integers(0, len(b.ld_clean), len(b.ld_clean)), n_heads_total))
             for _ in range(n_boot)]
    null = random_null(n_heads_total, len(ca), len(cb), seed=seed)
    out = {}
    for name, f in inf.OVERLAPS.items():
        lo, hi = inf._quantiles([f(x, y) for x, y in boots], 0.95)
        v = f(ca, cb)
        nm, nq, draws = null[name]
        out[name] = {"estimate": v, "lo": lo, "hi": hi, "n": int(len(a.ld_clean) + len(b.ld_clean)),
                     "null_mean": nm, "null_q95": nq, "p_null": float((draws >= v).mean())}
    return out


def circuits_at(model, task: TaskBatch, stages=IOI_STAGES, fracs=(0.02, 0.05), cache: dict | None = None,
                **kw) -> dict[float, PathPatchingResult]:
    """The path-patched circuit at each ``frac`` (default the paper's 2% and our earlier 5%), sharing the work
    (``cache``: as :func:`path_patching_circuit`'s, e.g. pre-filled with a shortlist ``rank``)."""
    cache = {} if cache is None else cache
    return {f: path_patching_circuit(model, task, stages, frac=f, cache=cache, **kw) for f in fracs}


def summary(results: dict[float, PathPatchingResult]) -> str:
    """One JSON line per frac: the kept heads of every stage."""
    return "\n".join(json.dumps({"frac": f, **{s.name: [repr(h) for h in s.selected] for s in r.stages}})
                     for f, r in results.items())
