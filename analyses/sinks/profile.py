"""Sink profiling: which keys act as attention sinks, per head, and what kind of token they are.

ACT's rule (docs/methods.md §2): a key j is a sink of a head when its column mean
ā_j = (1/(N−j)) Σ_{i≥j} A[i,j] exceeds τ (0.1 in the reference) or, in the paper's other
form, α/N. The column sums come from ``probe.stream_stats`` (``received_mean()``) and the
rule is the engine's own :func:`probe.eager.detect_sinks`, so what is profiled here is exactly
what :class:`probe.SinkCalibration` calibrates. The first detected sink (normally the first
token) is the one ACT leaves untouched; it is flagged ``first`` in the table. Keys near the end
are seen by few queries and pass the threshold easily; ``min_queries`` excludes them.

>>> from probe import load_model
>>> p = profile_sinks(load_model("tiny-llama"), ["Hi. Ho!\\nHa"], rule="alpha", alpha=2.0)
>>> sorted(p.summary()["token_types"]) == sorted(TOKEN_TYPES)
True
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probe import SinkCalibration, stream_stats
from probe.eager import detect_sinks

TOKEN_TYPES = ("first", "newline", "punctuation", "space", "other")


def _per_text_counts(rows: pd.DataFrame, n_texts: int, prefix: str) -> pd.DataFrame:
    """Sinks per text for each (layer, head, token type); empty (with its columns) when no sink."""
    if rows.empty:
        return pd.DataFrame({"layer": [], "head": [], "type": [], "value": [], "metric": []})
    out = rows.groupby(["layer", "head", "type"]).size().div(n_texts).reset_index(name="value")
    out["metric"] = prefix + out.type
    return out


def token_type(piece: str, pos: int) -> str:
    """Type of the token at ``pos`` whose text is ``piece``: first, newline, punctuation, space, other."""
    if pos == 0:
        return "first"
    if "\n" in piece:
        return "newline"
    s = piece.strip()
    if not s:
        return "space"
    return "punctuation" if all(not c.isalnum() for c in s) else "other"


def head_sinks(stats, rule: SinkCalibration) -> torch.Tensor:
    """Boolean ``[layer, head, key]``: every sink by the column-mean rule (first sink *included*)."""
    keep_all = SinkCalibration(tau=rule.tau, rule=rule.rule, alpha=rule.alpha, min_queries=rule.min_queries,
                               keep_first=False)
    L, H, _ = stats.received_sum.shape
    return torch.stack([torch.stack([detect_sinks(stats.received_sum[l, h], stats.received_count[l], keep_all)
                                     for h in range(H)]) for l in range(L)])


def text_rows(model, t: int, text, rule) -> tuple[list[dict], list[dict]]:
    st = stream_stats(model, text, verbose=False)
    pieces = model.str_tokens(list(st.token_ids))
    types = [token_type(p, i) for i, p in enumerate(pieces)]
    K = len(pieces)
    sinks, mean = head_sinks(st, rule), st.received_mean()
    n_rows = max(len(st.query_pos), 1)  # mean over every query row (a key outside a row's window gets 0 from it)
    by_type = {ty: [j for j in range(K) if types[j] == ty] for ty in TOKEN_TYPES}
    sink_rows, mass_rows = [], []
    for li, layer in enumerate(st.layers):
        for h in range(sinks.shape[1]):
            found = torch.nonzero(sinks[li, h]).flatten().tolist()
            for rank, j in enumerate(found):
                sink_rows.append({"text": t, "layer": layer, "head": h, "pos": j, "token": pieces[j],
                                  "type": types[j], "col_mean": float(mean[li, h, j]), "first": rank == 0,
                                  "from_end": K - 1 - j})
            for ty, cols in by_type.items():
                m = float(st.received_sum[li, h, cols].sum() / n_rows) if cols else 0.0
                mass_rows.append({"text": t, "layer": layer, "head": h, "type": ty, "mass": m,
                                  "n_keys": len(cols)})
    return sink_rows, mass_rows


@dataclass(frozen=True, eq=False)
class SinkProfile:
    """Sinks found over a prompt set: ``sinks`` (one row per text, layer, head, sink key) and ``mass``
    (one row per text, layer, head, token type: mean attention mass a query puts on that type)."""

    model_id: str
    weights_hash: str
    rule: dict
    n_texts: int
    sinks: pd.DataFrame
    mass: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """Tidy per head: ``mass:<type>`` (mean over texts), ``sinks:<type>`` (calibratable sinks per
        text, the first sink excluded) and ``first_sink:<type>`` (how often the untouched sink is that type)."""
        mass = self.mass.groupby(["layer", "head", "type"]).mass.mean().reset_index()
        mass["metric"] = "mass:" + mass.type
        s = self.sinks
        first_flag = s["first"].astype(bool)
        cal = _per_text_counts(s[~first_flag], self.n_texts, "sinks:")
        first = _per_text_counts(s[first_flag], self.n_texts, "first_sink:")
        out = pd.concat([mass.rename(columns={"mass": "value"}), cal, first], ignore_index=True)
        return out[["layer", "head", "metric", "value"]].sort_values(["layer", "head", "metric"], ignore_index=True)

    def summary(self) -> dict:
        """Per token type: share of calibratable sinks, share of first sinks, mean mass over heads."""
        s = self.sinks
        cal, first = s[~s["first"]], s[s["first"]]
        per = {}
        for ty in TOKEN_TYPES:
            per[ty] = {"share_of_sinks": float((cal.type == ty).mean()) if len(cal) else 0.0,
                       "share_of_first_sinks": float((first.type == ty).mean()) if len(first) else 0.0,
                       "mean_mass": float(self.mass[self.mass.type == ty].mass.mean())}
        heads = s.groupby(["layer", "head"]).size()
        return {"model_id": self.model_id, "rule": self.rule, "n_texts": self.n_texts, "token_types": per,
                "sinks_per_head_per_text": float(len(cal) / max(1, self.n_texts * self.mass[["layer", "head"]]
                                                                 .drop_duplicates().shape[0])),
                "heads_with_sinks": int(len(heads)),
                "share_of_sinks_in_last_3_keys": float((cal.from_end < 3).mean()) if len(cal) else 0.0}

    def score_maps(self, n_layers: int, n_heads: int) -> dict[str, np.ndarray]:
        """``[layer, head]`` per metric of :meth:`to_frame` (0 where a head has no sink of that type)."""
        out = {}
        for metric, g in self.to_frame().groupby("metric", sort=False):
            m = np.zeros((n_layers, n_heads))
            m[g["layer"].to_numpy(int), g["head"].to_numpy(int)] = g["value"].to_numpy(float)
            out[metric] = m
        return out

    def plot(self, metric: str = "mass"):
        """One layer x head map per token type of ``mass`` or calibratable ``sinks`` per text."""
        from .plots import profile_map

        return profile_map(self, metric)

    @classmethod
    def from_rows(cls, model_id: str, weights_hash: str, rule: dict, n_texts: int, sinks: list[dict],
                  mass: list[dict]) -> "SinkProfile":
        """The profile of the rows :func:`text_rows` gives for each text."""
        cols = ["text", "layer", "head", "pos", "token", "type", "col_mean", "first", "from_end"]
        return cls(model_id, weights_hash, rule, n_texts, pd.DataFrame(sinks, columns=cols), pd.DataFrame(mass))

    def save(self, path) -> Path:
        """``<path>.json`` summary plus ``<path>.sinks.parquet`` and ``<path>.mass.parquet`` (atomic)."""
        from probe.atomic import atomic_path, write_json

        path = Path(path)
        for name, df in (("sinks", self.sinks), ("mass", self.mass)):
            with atomic_path(path.with_suffix(f".{name}.parquet")) as tmp:
                df.to_parquet(tmp)
        meta = {"format": "headwise.sink_profile", "version": 1, "weights_hash": self.weights_hash, **self.summary()}
        return write_json(path, meta)

    @classmethod
    def load(cls, path) -> "SinkProfile":
        from probe.atomic import read_json
        from probe.errors import CorruptFileError

        path = Path(path)
        meta = read_json(path, "sink profile")
        if meta.get("format") != "headwise.sink_profile":
            raise CorruptFileError(f"{path} is not a headwise sink profile: rerun profile_sinks to regenerate it")
        return cls(meta["model_id"], meta["weights_hash"], meta["rule"], meta["n_texts"],
                   pd.read_parquet(path.with_suffix(".sinks.parquet")),
                   pd.read_parquet(path.with_suffix(".mass.parquet")))


def profile_sinks(model, texts, *, tau: float = 0.1, rule: str = "tau", alpha: float = 5.0, min_queries: int = 1,
                  progress: bool = False) -> SinkProfile:
    """Profile the sinks of every head over ``texts`` (streaming statistics, any length).

    >>> from probe import load_model
    >>> p = profile_sinks(load_model("tiny-llama"), ["Hi there.\\nBye."])
    >>> p.n_texts, bool(p.sinks["first"].any())     # every head's first sink is left to ACT untouched
    (1, True)
    """
    edit = SinkCalibration(tau=tau, rule=rule, alpha=alpha, min_queries=min_queries)
    texts = list(texts)
    sinks, mass = [], []
    for t, text in enumerate(tqdm(texts, desc="sink profile", disable=not progress)):
        s, m = text_rows(model, t, text, edit)
        sinks += s
        mass += m
    rule_d = {"rule": rule, "tau": tau, "alpha": alpha, "min_queries": min_queries}
    return SinkProfile.from_rows(model.model_id, model.weights_hash, rule_d, len(texts), sinks, mass)
