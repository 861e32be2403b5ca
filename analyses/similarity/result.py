"""``SimilarityResult``: the matrices, echo costs and sharing plan, with frame, plots and files.

Files (all atomic): ``arrays.safetensors`` (matrices), ``summary.json`` (scalars, plan, rank
correlations), ``results.parquet`` (the tidy frame, for pandas users).

Frame convention: ``scope`` says what a row compares (``layer``: layer pairs with ``head = -1``;
``head``/``match``: head pairs, the second head in ``layer2, head2``; ``echo``: adjacent layer pairs;
``family``: one row per head).

Methods: docs/methods.md §4.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probe.atomic import atomic_path, read_tensors, write_tensors
from probe.errors import CorruptFileError
from probe.heads import HeadId
from probe.shapes import HeadScores

from ..contract import Result, Stat
from ..layout import Figure, Note, Section, Table

FORMAT = "headwise.similarity"
ARRAYS = ("layer_cos", "layer_js", "head_cos", "head_js", "perms", "families")


def _ci(i) -> tuple[float, float] | None:
    """A bootstrap interval's bounds, or none where it resamples fewer than two units (one text's
    "interval" is the point itself: no spread to report)."""
    return None if i is None or i.n < 2 else (i.lo, i.hi)


@dataclass(frozen=True, eq=False)
class SimilarityResult(Result):
    FORMAT = FORMAT
    VERSION = 2
    READS = (1, 2)

    model_id: str
    n_layers: int
    n_heads: int
    n_prompts: int
    n_rows: int
    window: int
    layer_cos: np.ndarray   # [layer, layer]
    layer_js: np.ndarray    # [layer, layer], bits
    head_cos: np.ndarray    # [layer*head, layer*head]
    head_js: np.ndarray     # [layer-1, head, head] adjacent pairs, or [L*H, L*H]
    perms: np.ndarray       # [layer-1, head]: head h of l matches head perms[l, h] of l+1
    families: np.ndarray    # [layer*head] cluster label
    baseline_loss: float
    echo: dict = field(default_factory=dict)  # variant -> [layer-1] loss increase (nats)
    plan_variant: str = "matched"
    plan_budget: float = 0.1
    plan_blocks: tuple = ()
    plan_cost: float = 0.0
    plan_log: tuple = ()
    n_heldout_tokens: int = 0
    # what the intervals resample (version 2; None in results saved by version 1)
    prompt_adjacent: np.ndarray | None = None   # [prompt, layer-1] each prompt's adjacent-layer cosines
    base_texts: np.ndarray | None = None        # [text, 2] held-out loss sum (nats) and predicted tokens
    echo_texts: dict | None = None              # variant -> [layer-1, text, 2]
    plan_texts: np.ndarray | None = None        # [text, 2] under the final sharing plan

    # ------------------------------------------------------------------ derived numbers
    def adjacent(self, kind: str = "layer") -> np.ndarray:
        """Similarity of each adjacent pair: "layer" (head-averaged cosine), "same" (mean cosine of
        same-index heads) or "matched" (mean cosine of optimally matched heads)."""
        L, H = self.n_layers, self.n_heads
        if kind == "layer":
            return np.array([self.layer_cos[l, l + 1] for l in range(L - 1)])
        blk = [self.head_cos[l * H:(l + 1) * H, (l + 1) * H:(l + 2) * H] for l in range(L - 1)]
        if kind == "same":
            return np.array([np.diag(b).mean() for b in blk])
        if kind == "matched":
            return np.array([b[np.arange(H), self.perms[l]].mean() for l, b in enumerate(blk)])
        raise ValueError(f"unknown kind {kind!r}: use 'layer', 'same' or 'matched'")

    def correlations(self) -> dict:
        """Spearman rank correlation between adjacent similarity and echo loss increase, per variant."""
        from scipy.stats import spearmanr

        out = {}
        for v, loss in self.echo.items():
            for sim_kind in ("layer",) + ((v,) if v in ("same", "matched") else ()):
                rho, p = spearmanr(self.adjacent(sim_kind), loss)
                out[f"{v}~{sim_kind}"] = {"rho": float(rho), "p": float(p), "n": int(len(loss))}
        return out

    def to_dict(self) -> dict:
        """Every scalar, the plan and the rank correlations (the body of ``summary.json``)."""
        adj = self.adjacent("layer")
        inner = adj[1:-1] if len(adj) > 2 else adj
        return {"n_layers": self.n_layers,
                "n_heads": self.n_heads, "n_prompts": self.n_prompts, "n_rows": self.n_rows, "window": self.window,
                "baseline_loss": self.baseline_loss, "n_heldout_tokens": self.n_heldout_tokens,
                "adjacent_layer_cos": adj.tolist(), "first_pair_cos": float(adj[0]), "last_pair_cos": float(adj[-1]),
                "inner_pairs_mean_cos": float(inner.mean()),
                "adjacent_head_cos_same": self.adjacent("same").tolist(),
                "adjacent_head_cos_matched": self.adjacent("matched").tolist(),
                "echo_loss_increase": {k: np.asarray(v).tolist() for k, v in self.echo.items()},
                "spearman": self.correlations(), "plan_variant": self.plan_variant, "plan_budget": self.plan_budget,
                "plan_blocks": [list(b) for b in self.plan_blocks], "plan_cost": self.plan_cost,
                "plan_shared_layers": int(sum(len(b) - 1 for b in self.plan_blocks)), "plan_log": list(self.plan_log),
                "intervals": {k: i.to_dict() for k, i in self.intervals().items()}}

    # ------------------------------------------------------------------ tidy frame
    def to_frame(self) -> pd.DataFrame:
        """One row per (scope, layer, head, layer2, head2, metric): layer pairs, head pairs, echo, families."""
        L, H = self.n_layers, self.n_heads
        rows = []
        li, lj = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
        for metric, m in (("cos", self.layer_cos), ("js_bits", self.layer_js)):
            rows.append(pd.DataFrame({"scope": "layer", "layer": li.ravel(), "head": -1, "layer2": lj.ravel(),
                                      "head2": -1, "metric": metric, "value": m.ravel()}))
        hi, hj = np.meshgrid(np.arange(L * H), np.arange(L * H), indexing="ij")
        rows.append(pd.DataFrame({"scope": "head", "layer": hi.ravel() // H, "head": hi.ravel() % H,
                                  "layer2": hj.ravel() // H, "head2": hj.ravel() % H, "metric": "cos",
                                  "value": self.head_cos.ravel()}))
        if self.head_js.ndim == 3:
            l, a, b = np.meshgrid(np.arange(L - 1), np.arange(H), np.arange(H), indexing="ij")
            rows.append(pd.DataFrame({"scope": "head", "layer": l.ravel(), "head": a.ravel(), "layer2": l.ravel() + 1,
                                      "head2": b.ravel(), "metric": "js_bits", "value": self.head_js.ravel()}))
        l, h = np.meshgrid(np.arange(L - 1), np.arange(H), indexing="ij")
        rows.append(pd.DataFrame({"scope": "match", "layer": l.ravel(), "head": h.ravel(), "layer2": l.ravel() + 1,
                                  "head2": self.perms.ravel(), "metric": "matched", "value": 1.0}))
        for v, loss in self.echo.items():
            rows.append(pd.DataFrame({"scope": "echo", "layer": np.arange(L - 1), "head": -1,
                                      "layer2": np.arange(1, L), "head2": -1, "metric": f"loss_increase_{v}",
                                      "value": np.asarray(loss, dtype=float)}))
        rows.append(pd.DataFrame({"scope": "family", "layer": np.arange(L * H) // H, "head": np.arange(L * H) % H,
                                  "layer2": -1, "head2": -1, "metric": "family",
                                  "value": self.families.astype(float)}))
        return pd.concat(rows, ignore_index=True)

    # ------------------------------------------------------------------ the contract
    def cos_next(self) -> HeadScores:
        """``[layer, head]``: cosine of each head with its matched head of the next layer (last layer NaN)."""
        L, H = self.n_layers, self.n_heads
        out = np.full((L, H), np.nan)
        for l in range(L - 1):
            out[l] = self.head_cos[l * H + np.arange(H), (l + 1) * H + self.perms[l]]
        return out

    def head_scores(self) -> dict[str, HeadScores]:
        return {"family": self.families.reshape(self.n_layers, self.n_heads).astype(float),
                "matched cos to next layer": self.cos_next()}

    def roles(self) -> dict[HeadId, list[str]]:
        H = self.n_heads
        return {HeadId(i // H, i % H): [f"family {int(f)}"] for i, f in enumerate(self.families)}

    def n_samples(self) -> int:
        return self.n_prompts

    def intervals(self) -> dict:
        """Every headline with its interval (``analyses.similarity.intervals``); empty for a version-1 result."""
        return dict(self._intervals)

    @cached_property
    def _intervals(self) -> dict:
        """Computed once per result (``summary``, ``to_dict`` and every dashboard rerun read it)."""
        from . import intervals as iv

        if self.prompt_adjacent is None or self.base_texts is None:
            return {}
        out = {f"{k}_pair_cos": i for k, i in iv.adjacent_cis(self.prompt_adjacent).items()}
        for v, t in (self.echo_texts or {}).items():
            out[f"echo_{v}"] = iv.increase_ci(t, self.base_texts)
            for kind in ("layer",) + ((v,) if v in ("same", "matched") else ()):
                out[f"spearman {v}~{kind}"] = iv.spearman_ci(self.adjacent(kind), np.asarray(self.echo[v]))
        e = self.echo_texts or {}
        for a, b in (("matched", "same"), ("matched", "random"), ("same", "random")):
            if a in e and b in e:
                out[f"echo_{a}_minus_{b}"] = iv.difference_ci(e[a], e[b])
        if self.plan_texts is not None:
            out["plan_cost"] = iv.increase_ci(self.plan_texts, self.base_texts)
        return out

    def summary(self) -> dict[str, Stat]:
        adj = self.adjacent("layer")
        inner = adj[1:-1] if len(adj) > 2 else adj
        ci = self.intervals()

        def stat(key, label, value, n, fmt=".3f"):
            i = ci.get(key)
            return Stat(label, value if i is None else i.estimate, n=n if i is None else i.n, ci=_ci(i), fmt=fmt)

        out = {"first_pair_cos": stat("first_pair_cos", "adjacent layers, first pair (cos; prompts)", float(adj[0]),
                                      self.n_prompts),
               "inner_pairs_mean_cos": stat("inner_pair_cos", "inner pairs, mean (cos; prompts)", float(inner.mean()),
                                            self.n_prompts),
               "last_pair_cos": stat("last_pair_cos", "adjacent layers, last pair (cos; prompts)", float(adj[-1]),
                                     self.n_prompts),
               "plan_shared_layers": Stat("plan: layers shared", int(sum(len(b) - 1 for b in self.plan_blocks)),
                                          fmt="d"),
               "plan_cost": stat("plan_cost", "plan: measured loss increase (nats; held-out texts)", self.plan_cost,
                                 self.n_heldout_tokens, "+.4f")}
        for v, loss in self.echo.items():
            out[f"echo_{v}"] = stat(f"echo_{v}", f"echo cost, {v} heads, mean over pairs (nats; held-out texts)",
                                    float(np.mean(loss)), self.n_heldout_tokens, "+.4f")
        for k in ("matched_minus_same", "matched_minus_random", "same_minus_random"):
            if (i := ci.get(f"echo_{k}")) is not None:
                a, b = k.split("_minus_")
                out[f"echo_{k}"] = Stat(f"echo cost, {a} minus {b} (nats; held-out texts, paired)", i.estimate,
                                        n=i.n, ci=_ci(i), fmt="+.4f")
        for k, c in self.correlations().items():
            out[f"spearman {k}"] = stat(f"spearman {k}", f"spearman echo cost ~ similarity ({k}; layer pairs)",
                                        c["rho"], c["n"], "+.3f")
        return out

    def echo_table(self) -> pd.DataFrame:
        """Per adjacent pair: layer, same-head and matched-head cosine, and each variant's loss increase."""
        return pd.DataFrame({"pair": [f"{l}->{l + 1}" for l in range(self.n_layers - 1)],
                             "layer cos": self.adjacent("layer"), "same-head cos": self.adjacent("same"),
                             "matched-head cos": self.adjacent("matched")}
                            | {f"loss +{v}": np.asarray(loss) for v, loss in self.echo.items()})

    def plots(self) -> dict:
        from . import plots

        return {"layers": lambda metric="cos": plots.figure(self, "layers", metric),
                "clusters": lambda: plots.figure(self, "clusters"), "heads": lambda: plots.figure(self, "heads"),
                "echo": lambda: plots.figure(self, "echo")}

    def sections(self) -> list[Section]:
        plan = (f"Sharing plan ({self.plan_variant} heads, budget {self.plan_budget} nats/token): blocks "
                f"{[list(b) for b in self.plan_blocks]}")
        return [Section("", (Section("layer matrices", (Figure("layers", choices={"metric": ("cos", "js")}),)),
                             Section("head families", (Figure("clusters", selects_head=True),)),
                             Section("head x head", (Figure("heads"),)),
                             Section("echo costs", (Figure("echo"), Note(plan), Table("echo costs", self.echo_table())))),
                        "tabs"),
                Section("Tidy table (layer pairs, head pairs, matches, echo, families)",
                        (Table("similarity", self.to_frame()),), "expander")]

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        arrays = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in ARRAYS}
        arrays.update({f"echo.{k}": torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in self.echo.items()})
        arrays.update({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in self._resampled().items()})
        write_tensors(out / "arrays.safetensors", arrays, {"format": FORMAT, "version": self.VERSION})
        with atomic_path(out / "results.parquet") as tmp:
            self.to_frame().to_parquet(tmp, index=False)
        self.write_summary(out, self.to_dict())
        return out

    def _resampled(self) -> dict[str, np.ndarray]:
        """The arrays behind the intervals, as tensors named for ``arrays.safetensors``."""
        out = {k: getattr(self, k) for k in ("prompt_adjacent", "base_texts", "plan_texts") if getattr(self, k) is not None}
        return out | {f"echo_texts.{k}": v for k, v in (self.echo_texts or {}).items()}

    @classmethod
    def load(cls, out_dir: str | Path) -> "SimilarityResult":
        out = Path(out_dir)
        s = cls.read_summary(out)
        t, _ = read_tensors(out / "arrays.safetensors", FORMAT)
        try:
            return cls(model_id=s["model_id"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                       n_prompts=s["n_prompts"], n_rows=s["n_rows"], window=s["window"],
                       **{k: t[k].numpy() for k in ARRAYS}, baseline_loss=s["baseline_loss"],
                       echo={k[5:]: v.numpy() for k, v in t.items() if k.startswith("echo.")},
                       plan_variant=s["plan_variant"], plan_budget=s["plan_budget"],
                       plan_blocks=tuple(tuple(b) for b in s["plan_blocks"]), plan_cost=s["plan_cost"],
                       plan_log=tuple(s["plan_log"]), n_heldout_tokens=s["n_heldout_tokens"],
                       **{k: t[k].numpy() for k in ("prompt_adjacent", "base_texts", "plan_texts") if k in t},
                       echo_texts={k[11:]: v.numpy() for k, v in t.items() if k.startswith("echo_texts.")} or None)
        except KeyError as exc:
            raise CorruptFileError(f"{out} misses {exc}; rerun the scan to regenerate it") from exc
