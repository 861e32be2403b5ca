"""The study's result: every score compared, the agreement and transfer tables, the roles and the sources.

Files (atomic): ``summary.json`` (format ``headwise.atlas``: sources, roles and their head sets, the
settings), ``scores.safetensors`` (every score ``[layer, head]`` and its per-item values),
``agreement.parquet``, ``transfer.parquet``, ``outcomes.parquet`` (per role, condition, task and
item: the performance behind each cell) and the figures.

Methods: docs/methods.md §7.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probe.atomic import atomic_path, read_tensors, write_tensors
from probe.errors import CorruptFileError
from probe.heads import HeadId, HeadLayout
from probe.shapes import HeadScores

from ..config import Config, opt
from ..contract import Result, Stat, head_frame
from ..layout import Figure, Note, Section, Table, Tool, ToolOutput
from .scores import Score

SCORES = "headwise.atlas.scores"
SAMPLE_TEXT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. "
               "The old lighthouse keeper climbed the stairs every evening to light the lamp.")


@dataclass(frozen=True)
class CardInputs(Config):
    """The inputs of the head card on the dashboard."""

    head: str = opt("L0H0", "the head, e.g. L18H6")
    text: str = opt(SAMPLE_TEXT, "text of the sample pattern (pooled into blocks when long)")


@dataclass(frozen=True, eq=False)
class AtlasResult(Result):
    """See the module docstring; ``sets``: role -> ``{"top": heads, "r<seed>": random heads}``."""

    FORMAT = "headwise.atlas"

    model_id: str
    layout: HeadLayout
    scores: tuple[Score, ...]
    agreement: pd.DataFrame
    transfer: pd.DataFrame
    roles_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    sets: dict = field(default_factory=dict)
    outcomes: pd.DataFrame = field(default_factory=pd.DataFrame)
    head_roles: dict = field(default_factory=dict)        # HeadId -> role labels of the sources
    sources: pd.DataFrame = field(default_factory=pd.DataFrame)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ the contract
    def score(self, name: str) -> Score:
        for s in self.scores:
            if s.name == name:
                return s
        raise KeyError(f"no score {name!r}; scores: {[s.name for s in self.scores]}")

    def own(self) -> list[Score]:
        return [s for s in self.scores if s.source == "atlas"]

    def head_scores(self) -> dict[str, HeadScores]:
        """The study's own streaming scores (the others' scores stay with their results)."""
        return {s.name.split(": ", 1)[1]: s.values for s in self.own()}

    def item_scores(self) -> dict[str, np.ndarray]:
        return {s.name.split(": ", 1)[1]: s.items for s in self.own() if s.items is not None}

    def to_frame(self) -> pd.DataFrame:
        """Tidy: every score of the study per head (``source`` column: the analysis it comes from)."""
        return pd.concat([head_frame({s.name: s.values}, source=s.source, kind=s.kind) for s in self.scores],
                         ignore_index=True) if self.scores else head_frame({})

    def roles(self) -> dict[HeadId, list[str]]:
        k = int(self.meta.get("k", 10))
        out: dict[HeadId, list[str]] = {}
        for s in self.own():
            if s.name.endswith("first_token_mass"):
                continue
            H = s.values.shape[1]
            for i in np.argsort(-np.nan_to_num(s.values, nan=-np.inf), axis=None, kind="stable")[:k]:
                out.setdefault(HeadId(int(i) // H, int(i) % H), []).append(
                    f"{s.name.split(': ', 1)[1].replace('_', '-')} {s.values.flat[i]:.2f}")
        return out

    def n_samples(self) -> int:
        return int(self.meta.get("n_sequences", 0))

    def summary(self) -> dict[str, Stat]:
        a, t = self.agreement, self.transfer
        out = {"scores": Stat("scores compared", len(self.scores), fmt="d"),
               "pairs": Stat("pairs with rank agreement q < 0.05 (within-layer null)",
                             f"{int((a['q_rank'] < 0.05).sum())} of {len(a)}" if len(a) else "-")}
        cross = a[(a["source_a"] != a["source_b"]) & (a["method"] == "spearman")] if len(a) else a
        if len(cross) and cross["value"].notna().any():
            r = cross.loc[cross["value"].abs().idxmax()]
            out["strongest"] = Stat(f"strongest cross-analysis pair: {r['score_a']} ~ {r['score_b']} (Spearman)",
                                    float(r["value"]), n=int(r["n_heads"]), ci=(r["lo"], r["hi"]), fmt=".2f")
        if len(t):
            out["beyond"] = Stat("transfer cells beyond random", f"{int(t['beyond_random'].sum())} of {len(t)}")
            # relative excess (excess / |plain|, the heat map's colour): the tasks' units differ (logits, accuracy)
            r = t.loc[t["relative"].idxmax()] if t["relative"].notna().any() else None
            if r is not None:
                out["cell"] = Stat(f"largest drop beyond the random sets (relative to plain): knock out {r['role']} -> "
                                   f"{r['task']} (random sets: {r['drop_random']:.3g})", float(r["drop_top"]),
                                   n=int(r["n_items"]), ci=(r["drop_lo"], r["drop_hi"]))
        return out

    def plots(self) -> dict:
        from . import plots

        names = [s.name for s in self.scores]
        return {"agreement": lambda: plots.agreement_matrix(self, "value"),
                "overlap": lambda: plots.agreement_matrix(self, "jaccard"),
                "transfer": lambda: plots.transfer_matrix(self),
                "scores": lambda score=(names[0] if names else ""): plots.score_map(self, score)}

    def sections(self) -> list[Section]:
        names = tuple(s.name for s in self.scores)
        over = ", ".join(sorted({r for r in self.agreement.get("resampled", pd.Series(dtype=str)) if r}))
        return [Section("Score agreement", (Figure("agreement"), Figure("overlap")), "columns"),
                Section("", (Note("Cells: Spearman rho (eta^2 for the similarity family) with its 95% interval; * "
                                  "q < 0.05 against the within-layer permutation null. Intervals resample "
                                  f"the items behind the scores where they exist, else the heads ({over})."),
                             Table("agreement", self.agreement))),
                Section("Causal transfer: knock out role X, measure task Y",
                        (Figure("transfer"), Table("transfer cells", self.transfer),
                         Table("roles and their knock-outs", self.roles_table)) if len(self.transfer) else
                        (Note("The transfer matrix was not run (transfer=False, or no role had heads)."),)),
                Section("Every score per head", (Figure("scores", choices={"score": names} if names else {},
                                                        selects_head=True),)),
                Section("Head card", (Tool("card", "Open the head card", CardInputs(), self.card_tool, lambda i: 1),)),
                Section("Sources", (Table("saved results used", self.sources),), "expander")]

    def card(self, head, model=None, text: str | None = None):
        """The :class:`~.card.HeadCard` of ``head`` (a sample pattern when ``model`` is given)."""
        from .card import head_card

        return head_card(self, head, model=model, text=text)

    def card_tool(self, model, inputs: CardInputs) -> ToolOutput:
        card = self.card(HeadId.parse(inputs.head), model=model, text=inputs.text)
        return ToolOutput(texts={"card": card.text()}, figures={f"card {k}": f() for k, f in card.plots().items()})

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        for name, df in (("agreement", self.agreement), ("transfer", self.transfer), ("outcomes", self.outcomes),
                         ("roles", self.roles_table), ("sources", self.sources)):
            with atomic_path(folder / f"{name}.parquet") as tmp:
                df.to_parquet(tmp, index=False)
        tensors, info = {}, []
        for i, s in enumerate(self.scores):
            tensors[f"values.{i}"] = torch.from_numpy(np.ascontiguousarray(s.values))
            if s.items is not None:
                tensors[f"items.{i}"] = torch.from_numpy(np.ascontiguousarray(s.items, dtype=np.float64))
            info.append({"name": s.name, "source": s.source, "kind": s.kind, "absolute": s.absolute,
                         "item_key": s.item_key, "label": s.label})
        write_tensors(folder / "scores.safetensors", tensors, {"format": SCORES, "version": 1, "scores": info})
        lay = {"n_layers": self.layout.n_layers, "n_heads": self.layout.n_heads, "n_kv_heads": self.layout.n_kv_heads}
        sets = {r: {c: [str(h) for h in hs] for c, hs in conds.items()} for r, conds in self.sets.items()}
        return self.write_summary(folder, {"layout": lay, "sets": sets, "meta": self.meta,
                                           "head_roles": {str(h): v for h, v in self.head_roles.items()},
                                           "headline": {k: s.text() for k, s in self.summary().items()}})

    @classmethod
    def load(cls, folder: str | Path) -> "AtlasResult":
        folder = Path(folder)
        d = cls.read_summary(folder)
        t, m = read_tensors(folder / "scores.safetensors", SCORES)
        if len(m.get("scores", [])) != sum(k.startswith("values.") for k in t):
            raise CorruptFileError(f"{folder}/scores.safetensors does not match its score list: rerun the atlas")
        scores = tuple(Score(s["name"], s["source"], t[f"values.{i}"].numpy(),         # |values| stay |values|
                             t[f"items.{i}"].numpy() if f"items.{i}" in t else None, s["item_key"], s["kind"],
                             s["absolute"], s["label"]) for i, s in enumerate(m["scores"]))
        read = lambda name: pd.read_parquet(folder / f"{name}.parquet")  # noqa: E731
        sets = {r: {c: tuple(HeadId.parse(h) for h in hs) for c, hs in conds.items()} for r, conds in d["sets"].items()}
        return cls(d["model_id"], HeadLayout(**d["layout"]), scores, read("agreement"), read("transfer"),
                   read("roles"), sets, read("outcomes"), {HeadId.parse(h): v for h, v in d["head_roles"].items()},
                   read("sources"), d["meta"])
