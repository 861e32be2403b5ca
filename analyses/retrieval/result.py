"""The retrieval-head result: per-head scores, the per-sample table and the masking runs."""
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
    events: np.ndarray | None = None

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
        out = {"answered": Stat("samples answered", f"{self.n_success}/{len(self.samples)}", n=len(self.samples)),
               "above": Stat(f"heads > {self.threshold}", self.fraction_above(), n=int(self.scores.size), fmt=".1%"),
               "niah_none": Stat("NIAH success, no masking", rates.get("none"), n=n_mask or len(self.samples),
                                 fmt=".0%")}
        if "top" in rates:
            rnd = [v for c, v in rates.items() if c.startswith("random")]
            k = len(self.top)
            out["niah_top"] = Stat(f"NIAH success, masking top-{k}", rates["top"], n=n_mask, fmt=".0%")
            out["niah_random"] = Stat(f"NIAH success, masking random-{k} ({len(rnd)} seeds)",
                                      float(np.mean(rnd)) if rnd else None, n=n_mask, fmt=".0%")
        out["top"] = Stat("top heads", ", ".join(f"{h}={self.scores[h.layer, h.head]:.3f}"
                                                 for h in _best(self.scores, 10)))
        return out

    def plots(self) -> dict:
        from . import plots

        return {"heads": lambda: plots.plot_heads(self), "grouped": lambda: plots.plot_grouped(self),
                "niah": lambda condition="none": plots.plot_niah(self, condition),
                "masking": lambda: plots.plot_masking(self)}

    def sections(self) -> list[Section]:
        conds = ["none"] + (["top", "random"] if len(self.masking) else [])
        out = [Section("", (Figure("heads", selects_head=True), Figure("grouped")), "columns"),
               Section("NIAH success over context length x needle depth",
                       tuple(Figure("niah", fixed={"condition": c}) for c in conds), "columns")]
        if len(self.masking):
            sets = "; ".join(f"{c} = {', '.join(map(str, hs))}" for c, hs in self.random_sets.items())
            out.append(Section("", (Figure("masking"), Note(f"Masked sets: top = {', '.join(map(str, self.top))}; {sets}"))))
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


def _best(scores: np.ndarray, k: int) -> list[HeadId]:
    H = scores.shape[1]
    return [HeadId(int(i) // H, int(i) % H) for i in np.argsort(-scores, axis=None, kind="stable")[:k]]
