"""ACT head search (Yu et al., ICML 2024, §4; reference: GATECH-EIC/ACT), as methods.md §2 states it.

Candidates are the heads of layers 2 .. L-2. Each candidate is calibrated *alone* and scored on a
calibration split; the heads that improve the score are kept, and all kept heads are then
calibrated *together* on a held-out split. Control: the same number of heads drawn at random
from the candidates, several seeds. Calibrating a head of layer l leaves layers < l unchanged,
so each candidate reruns only layers l.. from the recorded input of block l
(``probe.families.record``: identical to a full forward; the shared model is never modified).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from probe import HeadId, InterventionSpec, SinkCalibration, families, intervene
from probe.errors import InputError

from .tasks import Batch, label_logprobs, label_token_ids, score, task_batches

METRICS = ("accuracy", "gold_logprob")


@dataclass(frozen=True)
class SearchConfig:
    """ACT settings (reference defaults: beta 0.4, tau 0.1) and the search protocol."""

    beta: float = 0.4
    tau: float = 0.1
    rule: str = "tau"
    alpha: float = 5.0
    min_queries: int = 1
    keep_first: bool = True
    shots: int = 0
    metric: str = "accuracy"
    first_layer: int = 2
    last_layer: int | None = None  # default L-2
    n_random: int = 5
    batch_size: int = 16

    def __post_init__(self):
        self.edit(())  # validates beta and the rule with the engine's own checks
        if self.metric not in METRICS:
            raise InputError(f"metric must be one of {METRICS}, not {self.metric!r}")
        if self.n_random < 0 or self.shots < 0:
            raise InputError("n_random and shots must be >= 0")

    def edit(self, heads) -> SinkCalibration:
        return SinkCalibration(heads=tuple(heads), beta=self.beta, tau=self.tau, rule=self.rule, alpha=self.alpha,
                               min_queries=self.min_queries, keep_first=self.keep_first)

    def spec(self, heads) -> InterventionSpec:
        return InterventionSpec([self.edit(heads)]) if heads else InterventionSpec()

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_heads(model, cfg: SearchConfig = SearchConfig()) -> list[HeadId]:
    """Heads of layers ``first_layer .. last_layer`` (reference: 2 .. L-2)."""
    last = model.n_layers - 2 if cfg.last_layer is None else cfg.last_layer
    if not 0 <= cfg.first_layer <= last < model.n_layers:
        raise InputError(f"candidate layers {cfg.first_layer}..{last} are empty or outside 0..{model.n_layers - 1}")
    return [HeadId(l, h) for l in range(cfg.first_layer, last + 1) for h in range(model.n_heads)]


def evaluate(model, batches: list[Batch], label_ids, spec: InterventionSpec | None = None) -> dict[str, float]:
    """Score the batches with ``spec`` applied (full forward)."""
    with intervene(model, spec or InterventionSpec()):
        lp = torch.cat([label_logprobs(model, b, label_ids) for b in batches])
    return score(lp, torch.cat([b.gold for b in batches]))


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


# ----------------------------------------------------------------------------- the search

def scan_candidates(model, task, cfg: SearchConfig, done: dict | None = None, on_row=None,
                    progress: bool = True) -> tuple[dict, list[dict]]:
    """Calibrate each candidate alone on the calibration split; returns (baseline, rows)."""
    families.family(model)  # reruns from a layer need the family mapping: refuse an unknown one before any work
    label_ids = label_token_ids(model.tokenizer, task.labels)
    batches = task_batches(model, task, "calib", cfg.shots, cfg.batch_size)
    base = evaluate(model, batches, label_ids)
    cands = candidate_heads(model, cfg)
    cache = layer_inputs(model, batches, sorted({h.layer for h in cands}))
    rows = []
    for head in tqdm(cands, desc=f"ACT search {task.name} {cfg.shots}-shot", disable=not progress):
        r = (done or {}).get(str(head))
        if r is None:
            r = evaluate_from(model, batches, cache, head.layer, label_ids, cfg.spec([head]))
            r = {"head": str(head), "layer": head.layer, "index": head.head, **r}
            if on_row:
                on_row(r)
        rows.append(r)
    return base, rows


def select_heads(base: dict, rows: list[dict], metric: str = "accuracy") -> list[HeadId]:
    """The candidates whose lone calibration improves ``metric`` over the plain model.

    A log-probability gain must exceed 1e-4 nats: below that it is float noise (a head with no
    sink, calibrated or not, moves scores by ~1e-6), not an improvement."""
    margin = 1e-4 if metric == "gold_logprob" else 0.0
    return [HeadId.parse(r["head"]) for r in rows if r[metric] > base[metric] + margin]


def heldout_eval(model, task, cfg: SearchConfig, selected: list[HeadId], progress: bool = True) -> dict:
    """Held-out scores: plain, all selected heads together, and ``n_random`` random head sets of that size."""
    label_ids = label_token_ids(model.tokenizer, task.labels)
    batches = task_batches(model, task, "heldout", cfg.shots, cfg.batch_size)
    out = {"plain": evaluate(model, batches, label_ids),
           "calibrated": evaluate(model, batches, label_ids, cfg.spec(selected)), "random": []}
    cands = candidate_heads(model, cfg)
    if selected:
        for seed in tqdm(range(cfg.n_random), desc="random-head control", disable=not progress):
            heads = sorted(random.Random(seed).sample(cands, len(selected)))
            r = evaluate(model, batches, label_ids, cfg.spec(heads))
            out["random"].append({"seed": seed, "heads": [str(h) for h in heads], **r})
    return out


# ----------------------------------------------------------------------------- result

@dataclass(frozen=True, eq=False)
class SearchResult:
    """One task and setting: per-candidate calibration-split scores, the kept heads, held-out scores."""

    model_id: str
    weights_hash: str
    task: str
    config: dict
    baseline: dict
    candidates: list
    selected: tuple
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
                "selected": list(self.selected), "calib_plain": self.baseline,
                "heldout_plain": self.heldout["plain"], "heldout_calibrated": self.heldout["calibrated"],
                "heldout_random_accuracy": self.random_summary("accuracy"),
                "heldout_random_gold_logprob": self.random_summary("gold_logprob")}

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
                         "value": float(r["head"] in self.selected)})
        df = pd.DataFrame(rows)
        df.insert(0, "task", self.task)
        df.insert(1, "shots", self.shots)
        return df

    def plot(self, metric: str = "delta_accuracy"):
        """Heatmap layer x head of the calibration-split change from calibrating each head alone."""
        import plotly.graph_objects as go

        df = self.to_frame()
        grid = df[df.metric == metric].pivot(index="layer", columns="head", values="value")
        fig = go.Figure(go.Heatmap(z=grid.values, x=[f"H{h}" for h in grid.columns], y=list(grid.index),
                                   colorscale="RdBu", zmid=0, colorbar={"title": metric}))
        fig.update_layout(title=f"ACT: {metric} per head calibrated alone ({self.task}, {self.shots}-shot; "
                                f"{len(self.selected)} kept)", xaxis_title="head", yaxis_title="layer")
        return fig

    def to_dict(self) -> dict:
        return {"format": "headwise.act_search", "version": 1, "model_id": self.model_id,
                "weights_hash": self.weights_hash, "task": self.task, "config": self.config,
                "baseline": self.baseline, "candidates": self.candidates, "selected": list(self.selected),
                "heldout": self.heldout, "figures": self.figures()}

    def save(self, path) -> "Path":
        """JSON summary (atomic) at ``path`` and the tidy table beside it as parquet."""
        from pathlib import Path

        from probe.atomic import atomic_path, write_json

        path = Path(path)
        write_json(path, self.to_dict())
        with atomic_path(path.with_suffix(".parquet")) as tmp:
            self.to_frame().to_parquet(tmp)
        return path

    @classmethod
    def load(cls, path) -> "SearchResult":
        from probe.atomic import read_json
        from probe.errors import CorruptFileError

        d = read_json(path, "ACT search result")
        if not isinstance(d, dict) or d.get("format") != "headwise.act_search":
            raise CorruptFileError(f"{path} is not a headwise ACT search result: rerun the search to regenerate it")
        return cls(d["model_id"], d["weights_hash"], d["task"], d["config"], d["baseline"], d["candidates"],
                   tuple(d["selected"]), d["heldout"])


def search_act(model, task, cfg: SearchConfig = SearchConfig(), *, out=None, progress: bool = True) -> SearchResult:
    """Run the ACT head search on ``task`` (a :class:`~analyses.sinks.tasks.Task` or its name).

    With ``out`` (a JSON path) the result is saved atomically, finished candidates are checkpointed
    beside it and an interrupted run resumes; an existing result for the same model is returned as is.

    >>> from probe import load_model
    >>> m = load_model("tiny-llama")
    >>> r = search_act(m, "sentiment", SearchConfig(first_layer=0, last_layer=0, n_random=1), progress=False)
    >>> len(r.candidates)
    4
    """
    from pathlib import Path

    from probe.atomic import read_json, write_json

    from .tasks import load_task

    task = load_task(task) if isinstance(task, str) else task
    partial, done = None, {}
    if out is not None:
        out = Path(out)
        if out.exists():
            res = SearchResult.load(out)
            if res.weights_hash == model.weights_hash and res.config == cfg.to_dict() and res.task == task.name:
                return res
        partial = out.with_suffix(".partial.json")
        if partial.exists():
            p = read_json(partial, "search checkpoint")
            if p.get("weights_hash") == model.weights_hash and p.get("config") == cfg.to_dict():
                done = {r["head"]: r for r in p["rows"]}
    rows: list[dict] = list(done.values())

    def checkpoint(r):
        rows.append(r)
        if partial is not None and len(rows) % 9 == 0:
            write_json(partial, {"weights_hash": model.weights_hash, "config": cfg.to_dict(), "rows": rows})

    base, cand_rows = scan_candidates(model, task, cfg, done, checkpoint, progress)
    selected = select_heads(base, cand_rows, cfg.metric)
    held = heldout_eval(model, task, cfg, selected, progress)
    res = SearchResult(model.model_id, model.weights_hash, task.name, cfg.to_dict(), base, cand_rows,
                       tuple(str(h) for h in selected), held)
    if out is not None:
        res.save(out)
        if partial.exists():
            partial.unlink()
    return res


def reselect(model, result: SearchResult, metric: str, *, task=None, progress: bool = False) -> SearchResult:
    """The same search with the heads kept by another ``metric`` (e.g. ``gold_logprob``, finer than accuracy
    on a small split): reuses the per-candidate scores, reruns only the held-out evaluation and control."""
    from .tasks import load_task

    if result.weights_hash != model.weights_hash:
        from probe.errors import ModelMismatchError

        raise ModelMismatchError(f"search result is for weights {result.weights_hash}, model has {model.weights_hash}")
    cfg = SearchConfig(**{**result.config, "metric": metric})
    selected = select_heads(result.baseline, result.candidates, metric)
    held = heldout_eval(model, task or load_task(result.task), cfg, selected, progress)
    return SearchResult(result.model_id, result.weights_hash, result.task, cfg.to_dict(), result.baseline,
                        result.candidates, tuple(str(h) for h in selected), held)
