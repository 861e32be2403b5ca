"""The grounding result (detector summary, head map, mitigation) and the token-level view."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.atomic import atomic_path, read_json, write_json
from probe.errors import CorruptFileError

FORMAT = "headwise.grounding_result"


@dataclass(frozen=True, eq=False)
class GroundingResult:
    """Lookback Lens on one model.

    ``summary``: held-out AUROC (+ interval), mean-LR baseline, permutation null, dataset counts;
    ``w_*`` the same within templates (confound control), ``centred_*`` for the template-centred fit.
    ``head_weights``: ``[layers, heads]`` detector coefficients (standardised features).
    ``mitigation``: one row per condition: grounded / contradicted rate on held-out items and the
    paired change vs greedy (``d_greedy``) and vs its control (``d_control``), with 95% intervals.
    """

    model_id: str
    summary: dict
    head_weights: np.ndarray
    mitigation: pd.DataFrame = field(default_factory=pd.DataFrame)

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per layer, head and metric (``coef``, ``rank``); plus run-level metrics (layer -1)."""
        w = self.head_weights
        order = np.argsort(-w, axis=None)
        rank = np.empty(w.size, int)
        rank[order] = np.arange(1, w.size + 1)
        rows = [{"layer": l, "head": h, "metric": m, "value": float(v)}
                for l in range(w.shape[0]) for h in range(w.shape[1])
                for m, v in (("coef", w[l, h]), ("rank", rank[l * w.shape[1] + h]))]
        for k, v in self.summary.items():
            if isinstance(v, (int, float)):
                rows.append({"layer": -1, "head": -1, "metric": k, "value": float(v)})
        for _, r in self.mitigation.iterrows():
            for m in ("grounded_rate", "contradicted_rate", "d_greedy", "d_control"):
                if m in r and not pd.isna(r[m]):
                    rows.append({"layer": -1, "head": -1, "metric": f"{m}:{r['condition']}", "value": float(r[m])})
        return pd.DataFrame(rows)

    def plot(self):
        """Layer x head map of detector coefficients (red: looking back predicts grounded)."""
        import plotly.graph_objects as go

        w = self.head_weights
        lim = float(np.abs(w).max()) or 1.0
        fig = go.Figure(go.Heatmap(z=w, x=[f"H{h}" for h in range(w.shape[1])], y=list(range(w.shape[0])),
                                   colorscale="RdBu_r", zmin=-lim, zmax=lim, colorbar={"title": "coef"}))
        s = self.summary
        title = (f"Lookback Lens on {self.model_id}: held-out AUROC {s.get('auroc', float('nan')):.3f} "
                 f"[{s.get('auroc_ci', [np.nan, np.nan])[0]:.3f}, {s.get('auroc_ci', [np.nan, np.nan])[1]:.3f}]"
                 f" vs mean-LR {s.get('baseline_auroc', float('nan')):.3f};"
                 f" within template {s.get('w_auroc', float('nan')):.3f}")
        fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=700)
        return fig

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "heads.parquet") as tmp:
            self.to_frame().to_parquet(tmp)
        with atomic_path(folder / "mitigation.parquet") as tmp:
            self.mitigation.to_parquet(tmp)
        write_json(folder / "summary.json", {"format": FORMAT, "version": 1, "model_id": self.model_id,
                                             "summary": self.summary, "head_weights": self.head_weights.tolist()})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "GroundingResult":
        folder = Path(folder)
        d = read_json(folder / "summary.json", "grounding summary")
        if d.get("format") != FORMAT:
            raise CorruptFileError(f"{folder}/summary.json is not a grounding result; rerun `headwise scan grounding`")
        mit = pd.read_parquet(folder / "mitigation.parquet") if (folder / "mitigation.parquet").exists() else pd.DataFrame()
        return cls(d["model_id"], d["summary"], np.asarray(d["head_weights"], float), mit)


def token_scores(detector, row_lr) -> np.ndarray:
    """Per generated token: the detector's grounded probability on that token's own row of ratios."""
    row_lr = np.asarray(row_lr, np.float64)
    return detector.score(row_lr.reshape(row_lr.shape[0], -1)) if len(row_lr) else np.zeros(0)


def token_view_html(tokens: list[str], scores, prompt: str = "") -> str:
    """HTML: the response, each token's background from red (not grounded) to green (grounded)."""
    spans = []
    for tok, s in zip(tokens, scores):
        r, g = int(255 * (1 - s)), int(255 * s)
        spans.append(f'<span title="P(grounded)={s:.2f}" style="background:rgba({r},{g},80,0.45);'
                     f'padding:1px;border-radius:3px">{html.escape(tok)}</span>')
    head = f"<pre style='color:#555'>{html.escape(prompt)}</pre>" if prompt else ""
    return f"<div style='font-family:monospace'>{head}{''.join(spans)}</div>"


def token_view(tokens: list[str], scores):
    """Plotly view of the same: one coloured cell per token, hover shows the score."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=[list(scores)], text=[tokens], texttemplate="%{text}", zmin=0, zmax=1,
                               colorscale="RdYlGn", colorbar={"title": "P(grounded)"}))
    fig.update_layout(height=200, yaxis={"visible": False}, xaxis={"title": "generated token"})
    return fig
