"""The retrieval-head result: per-head scores, the per-sample table and the masking runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe import HeadId
from probe.atomic import atomic_path, read_json, write_json


@dataclass(frozen=True)
class RetrievalResult:
    """Retrieval scores ``[layer, head]`` (mean events/|span| over successful samples).

    ``samples``: one row per NIAH sample (needle, length, depth, response, recall, success);
    ``masking``: one row per masked run (condition ``none``/``top``/``random<seed>``).
    """

    model_id: str
    scores: np.ndarray
    n_kv_heads: int
    threshold: float
    samples: pd.DataFrame
    masking: pd.DataFrame = field(default_factory=pd.DataFrame)
    top: tuple[str, ...] = ()
    random_sets: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def n_success(self) -> int:
        return int(self.samples["success"].sum()) if len(self.samples) else 0

    def retrieval_heads(self) -> list[HeadId]:
        """Heads scoring above the threshold, best first."""
        order = np.argsort(-self.scores, axis=None)
        H = self.scores.shape[1]
        return [HeadId(int(i) // H, int(i) % H) for i in order if self.scores.flat[i] > self.threshold]

    def fraction_above(self) -> float:
        return float((self.scores > self.threshold).mean())

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per layer, head and metric (``retrieval_score``, ``is_retrieval``)."""
        L, H = self.scores.shape
        group = H // self.n_kv_heads
        rows = []
        for l in range(L):
            for h in range(H):
                s = float(self.scores[l, h])
                base = {"layer": l, "head": h, "kv_head": h // group, "head_id": f"L{l}H{h}"}
                rows.append(base | {"metric": "retrieval_score", "value": s})
                rows.append(base | {"metric": "is_retrieval", "value": float(s > self.threshold)})
        return pd.DataFrame(rows)

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

    def summary(self) -> dict:
        top = top_k(self.scores, 20)
        rates = self.masking_rates()
        rnd = [v for c, v in rates.items() if c.startswith("random")]
        return {"model_id": self.model_id, "threshold": self.threshold, "n_samples": int(len(self.samples)),
                "n_success": self.n_success, "n_heads": int(self.scores.size),
                "fraction_above_threshold": self.fraction_above(),
                "top_heads": [{"head": repr(h), "score": float(self.scores[h.layer, h.head])} for h in top],
                "niah_success_full_grid": float(self.samples["success"].mean()) if len(self.samples) else None,
                "niah_success": rates, "niah_success_random_mean": float(np.mean(rnd)) if rnd else None,
                "top_set": list(self.top), "random_sets": self.random_sets} | self.meta

    def plot(self, kind: str = "heads", condition: str = "none"):
        """``kind``: ``"heads"`` (layer x head scores), ``"grouped"`` (GQA: layer x KV head),
        ``"niah"`` (success over length x depth for ``condition``: none/top/random/random<seed>),
        ``"masking"`` (success per condition)."""
        from . import plots

        kinds = {"heads": plots.plot_heads, "grouped": plots.plot_grouped, "masking": plots.plot_masking}
        if kind == "niah":
            return plots.plot_niah(self, condition)
        if kind not in kinds:
            from probe.errors import InputError
            raise InputError(f"unknown plot kind {kind!r}: use one of {sorted(kinds) + ['niah']}")
        return kinds[kind](self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        for name, df in (("heads", self.to_frame()), ("samples", self.samples), ("masking", self.masking),
                         ("grouped", self.grouped())):
            with atomic_path(path / f"{name}.parquet") as tmp:
                df.to_parquet(tmp, index=False)
        write_json(path / "summary.json", self.summary() | {"scores": self.scores.tolist(),
                                                            "n_kv_heads": self.n_kv_heads, "meta": self.meta})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RetrievalResult":
        path = Path(path)
        s = read_json(path / "summary.json", "retrieval summary")
        samples = pd.read_parquet(path / "samples.parquet")
        masking = pd.read_parquet(path / "masking.parquet")
        return cls(s["model_id"], np.asarray(s["scores"], dtype=float), s["n_kv_heads"], s["threshold"],
                   samples, masking, tuple(s["top_set"]), s["random_sets"], s.get("meta", {}))


def top_k(scores: np.ndarray, k: int) -> list[HeadId]:
    """The ``k`` best heads (best first)."""
    H = scores.shape[1]
    return [HeadId(int(i) // H, int(i) % H) for i in np.argsort(-scores, axis=None)[:k]]
