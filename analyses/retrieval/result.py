"""The retrieval-head result: per-head scores, the per-sample table and the masking runs.

Headlines carry their n and interval (docs/methods.md §1, :mod:`.stats`): the fraction of heads
above the threshold with a bootstrap over answered samples, NIAH success per masking condition
with a Wilson interval over cells, and each random-K seed's paired difference to top-K (bootstrap
interval, exact McNemar p). Files: ``summary.json``, ``heads/samples/masking/grouped.parquet`` and
``events.safetensors`` (per-sample events ``[samples, layer, head]``, format-checked on load).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probe import HeadId
from probe.atomic import atomic_path, read_tensors, write_tensors
from probe.shapes import HeadScores

from ..contract import Result, Stat, head_frame
from ..layout import Figure, Note, Section, Table
from .stats import masking_table, sparsity_ci, success_by

METHODS = "Method, formulas and controls: docs/methods.md §1 (Wu et al. 2024, retrieval heads)."

EVENTS = "headwise.retrieval.events"


@dataclass(frozen=True, eq=False)
class RetrievalResult(Result):
    """Retrieval scores ``[layer, head]`` (mean events/|span| over successful samples).

    ``samples``: one row per NIAH sample (needle, length, depth, response, recall, success);
    ``masking``: one row per masked run (condition ``top`` or ``random<seed>``); ``top`` and
    ``random_sets``: the masked head sets; ``events``: per sample (rows of ``samples``) the events/|span|
    ``[sample, layer, head]`` (``None`` in results saved before it was kept). Frame: ``retrieval_score``
    and ``is_retrieval`` per head, with the ``kv_head`` column.
    """

    FORMAT = "headwise.retrieval"

    model_id: str
    scores: HeadScores
    n_kv_heads: int
    threshold: float
    samples: pd.DataFrame
    masking: pd.DataFrame = field(default_factory=pd.DataFrame)
    top: tuple[HeadId, ...] = ()
    random_sets: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    events: np.ndarray | None = None          # [samples, L, H] per-sample events/|span| (samples order)

    @property
    def n_success(self) -> int:
        return int(self.samples["success"].sum()) if len(self.samples) else 0

    def retrieval_heads(self) -> list[HeadId]:
        """Heads scoring above the threshold, best first."""
        order = np.argsort(-self.scores, axis=None, kind="stable")
        H = self.scores.shape[1]
        return [HeadId(int(i) // H, int(i) % H) for i in order if self.scores.flat[i] > self.threshold]

    def fraction_above(self) -> float:
        return float((self.scores > self.threshold).mean())

    # ------------------------------------------------------------------ the contract
    def head_scores(self) -> dict[str, HeadScores]:
        return {"retrieval_score": self.scores, "is_retrieval": (self.scores > self.threshold).astype(float)}

    def item_scores(self) -> dict[str, np.ndarray]:
        """``retrieval_score`` per answered sample (the samples the head score averages)."""
        if self.events is None or not self.n_success:
            return {}
        return {"retrieval_score": self.events[self.samples["success"].to_numpy(bool)]}

    def to_frame(self) -> pd.DataFrame:
        """Tidy: ``retrieval_score`` and ``is_retrieval`` per layer and head, with ``kv_head``."""
        df = head_frame(self.head_scores())
        df["kv_head"] = df["head"] // (self.scores.shape[1] // self.n_kv_heads)
        return df

    def roles(self, top: int = 10) -> dict[HeadId, list[str]]:
        return {h: [f"retrieval {self.scores[h.layer, h.head]:.2f}"] for h in self.retrieval_heads()[:top]}

    def n_samples(self) -> int:
        return int(len(self.samples))

    def summary(self) -> dict[str, Stat]:
        rates = self.masking_rates()
        n_mask = int(self.masking["needle"].count() // max(1, self.masking["condition"].nunique())) \
            if len(self.masking) else None
        out = {"answered": Stat("samples answered", f"{self.n_success}/{len(self.samples)}", n=len(self.samples))}
        sp = self.sparsity()
        out["above"] = Stat(f"heads > {self.threshold} (bootstrap over answered samples)",
                            sp.estimate if sp else self.fraction_above(), n=sp.n if sp else int(self.scores.size),
                            ci=(sp.lo, sp.hi) if sp else None, fmt=".1%")
        if not len(self.masking):
            none = _wilson(self.samples["success"]) if len(self.samples) else None
            out["niah_none"] = Stat("NIAH success, no masking", rates.get("none"), n=len(self.samples),
                                    ci=none, fmt=".0%")
        else:
            out |= self._masking_stats(n_mask)
        out["top"] = Stat("top heads", ", ".join(f"{h}={self.scores[h.layer, h.head]:.3f}"
                                                 for h in _best(self.scores, 10)))
        return out

    def sparsity(self):
        """Fraction of heads above the threshold with its bootstrap interval (None without per-sample events)."""
        if self.events is None or not self.n_success:
            return None
        return sparsity_ci(self.events, self.samples["success"].to_numpy(bool), self.threshold)

    def success_by(self, by: str = "length") -> pd.DataFrame:
        """Unmasked NIAH success per ``length`` (or ``depth``/``needle``), Wilson interval over its samples."""
        return success_by(self.samples, by)

    def masking_table(self) -> pd.DataFrame:
        """The masking cells' success per condition (``none`` = unmasked), Wilson intervals, paired vs top-K."""
        keys = ["needle", "length", "depth"]
        base = self.samples.merge(self.masking[keys].drop_duplicates(), on=keys).assign(condition="none")
        return masking_table(pd.concat([base[keys + ["condition", "success"]],
                                        self.masking[keys + ["condition", "success"]]], ignore_index=True))

    def _masking_stats(self, n_mask) -> dict[str, Stat]:
        t = self.masking_table().set_index("condition")
        k, out = len(self.top), {}
        for c, label in (("none", "no masking"), ("top", f"masking top-{k}")):
            out[f"niah_{c}"] = Stat(f"NIAH success, {label}", t.loc[c, "success"], n=int(t.loc[c, "n_cells"]),
                                    ci=(t.loc[c, "lo"], t.loc[c, "hi"]), fmt=".0%")
        seeds = [c for c in t.index if str(c).startswith("random") and c != "random (pooled)"]
        if seeds:
            r = t.loc["random (pooled)"]
            out["niah_random"] = Stat(f"NIAH success, masking random-{k} ({len(seeds)} seeds pooled)",
                                      r["success"], n=int(r["n_cells"]), fmt=".0%")
            out["random_minus_top"] = Stat(f"random-{k} minus top-{k} success (paired over cells, seeds pooled)",
                                           r["d_vs_top"], n=int(r["n_cells"]), ci=(r["d_lo"], r["d_hi"]), fmt=".2f")
            for c in seeds:
                out[f"{c}_minus_top"] = Stat(f"{c} minus top-{k} (paired; McNemar p = {t.loc[c, 'p_vs_top']:.3g})",
                                             t.loc[c, "d_vs_top"], n=int(t.loc[c, "n_cells"]),
                                             ci=(t.loc[c, "d_lo"], t.loc[c, "d_hi"]), fmt=".2f")
        return out

    def plots(self) -> dict:
        from . import plots

        return {"heads": lambda: plots.plot_heads(self), "grouped": lambda: plots.plot_grouped(self),
                "niah": lambda condition="none": plots.plot_niah(self, condition),
                "masking": lambda: plots.plot_masking(self)}

    def sections(self) -> list[Section]:
        conds = ["none"] + (["top", "random"] if len(self.masking) else [])
        out = [Section("", (Note(METHODS),)),
               Section("", (Figure("heads", selects_head=True), Figure("grouped")), "columns"),
               Section("NIAH success over context length x needle depth",
                       tuple(Figure("niah", fixed={"condition": c}) for c in conds), "columns")]
        if len(self.masking):
            sets = "; ".join(f"{c} = {', '.join(map(str, hs))}" for c, hs in self.random_sets.items())
            out.append(Section("", (Figure("masking"), Note(f"Masked sets: top = {', '.join(map(str, self.top))}; {sets}"),
                                    Table("masking: success with Wilson intervals over cells; paired vs top-K",
                                          self.masking_table()))))
        if len(self.samples):
            out.append(Section("", (Table("NIAH success per length (unmasked; Wilson intervals over samples)",
                                          self.success_by("length")),
                                    Table("NIAH success per depth", self.success_by("depth"))), "columns"))
        out.append(Section("", (Table("per-head scores", self.to_frame()), Table("GQA groups", self.grouped()),
                                Table("samples", self.samples), Table("masking runs", self.masking),
                                Table("success table", self.success_table())), "tabs"))
        return out

    # ------------------------------------------------------------------ derived tables
    def grouped(self) -> pd.DataFrame:
        """GQA view: per layer and KV head, the mean/max score of the query heads sharing it."""
        L, H = self.scores.shape
        g = H // self.n_kv_heads
        s = self.scores.reshape(L, self.n_kv_heads, g)
        rows = [{"layer": l, "kv_head": k, "mean_score": float(s[l, k].mean()), "max_score": float(s[l, k].max()),
                 "n_retrieval": int((s[l, k] > self.threshold).sum())}
                for l in range(L) for k in range(self.n_kv_heads)]
        return pd.DataFrame(rows)

    def success_table(self, pool_random: bool = False) -> pd.DataFrame:
        """NIAH success rate per condition, length and depth (unmasked = ``none``).

        ``pool_random``: the random-K seeds pooled into one condition ``random``.
        """
        cols = ["condition", "needle", "length", "depth", "success"]
        parts = [self.samples.assign(condition="none")[cols]] + ([self.masking[cols]] if len(self.masking) else [])
        both = pd.concat(parts, ignore_index=True)
        if pool_random:
            both["condition"] = both["condition"].where(~both["condition"].str.startswith("random"), "random")
        both["success"] = both["success"].astype(float)
        return both.groupby(["condition", "length", "depth"], as_index=False)["success"].mean()

    def masking_rates(self) -> dict[str, float]:
        """Success rate per condition on the masking cells (``none``: the unmasked runs of the same cells)."""
        if not len(self.samples):
            return {}
        if not len(self.masking):
            return {"none": float(self.samples["success"].mean())}
        keys = ["needle", "length", "depth"]
        base = self.samples.merge(self.masking[keys].drop_duplicates(), on=keys)
        rates = {"none": float(base["success"].mean())}
        return rates | {c: float(g["success"].mean()) for c, g in self.masking.groupby("condition", sort=False)}

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        for name, df in (("heads", self.to_frame()), ("samples", self.samples), ("masking", self.masking),
                         ("grouped", self.grouped())):
            with atomic_path(path / f"{name}.parquet") as tmp:
                df.to_parquet(tmp, index=False)
        top = [{"head": str(h), "score": float(self.scores[h.layer, h.head])}
               for h in _best(self.scores, 20)]
        self.write_summary(path, {
            "threshold": self.threshold, "n_samples": int(len(self.samples)), "n_success": self.n_success,
            "fraction_above_threshold": self.fraction_above(), "top_heads": top,
            "niah_success": self.masking_rates(), "top_set": [str(h) for h in self.top],
            "random_sets": {c: [str(h) for h in hs] for c, hs in self.random_sets.items()},
            "scores": self.scores.tolist(), "n_kv_heads": self.n_kv_heads, "meta": self.meta})
        if self.events is not None:
            write_tensors(path / "events.safetensors", {"events": torch.from_numpy(np.ascontiguousarray(self.events))},
                          {"format": EVENTS, "version": 1})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RetrievalResult":
        path = Path(path)
        s = cls.read_summary(path)
        events = read_tensors(path / "events.safetensors", EVENTS)[0]["events"].numpy() \
            if (path / "events.safetensors").exists() else None
        return cls(s["model_id"], np.asarray(s["scores"], dtype=float), s["n_kv_heads"], s["threshold"],
                   pd.read_parquet(path / "samples.parquet"), pd.read_parquet(path / "masking.parquet"),
                   tuple(HeadId.parse(h) for h in s["top_set"]),
                   {c: tuple(HeadId.parse(h) for h in hs) for c, hs in s["random_sets"].items()}, s.get("meta", {}),
                   events)


def _wilson(success) -> tuple[float, float]:
    from ..inference import wilson

    w = wilson(int(np.sum(success)), len(success))
    return w.lo, w.hi


def _best(scores: np.ndarray, k: int) -> list[HeadId]:
    H = scores.shape[1]
    return [HeadId(int(i) // H, int(i) % H) for i in np.argsort(-scores, axis=None, kind="stable")[:k]]
