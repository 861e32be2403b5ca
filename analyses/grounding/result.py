"""The grounding result (detector statistics, head map, ROC, mitigation, the detector) and the token view.

Methods: docs/methods.md §5.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.atomic import atomic_path
from probe.heads import HeadId
from probe.shapes import HeadScores

from ..config import Config, opt
from ..contract import Result, Stat, head_frame, run_rows
from ..layout import Download, Figure, Note, Section, Table, Tool, ToolOutput
from .detector import Detector

FORMAT = "headwise.grounding_result"
METHODS = "Method, formulas and controls: docs/methods.md §5 (Lookback Lens, Chuang et al. 2024; PAINT)."
BASELINES_FIRST = {"template_only": "template-only baseline", "mean_ratio_fitted": "fitted mean-ratio baseline"}


@dataclass(frozen=True)
class GuidedPrompt(Config):
    """The inputs of the token view: a prompt whose last line is the answer header."""

    prompt: str = opt("The capital of France is Lyon, according to the new atlas.\nQuestion: What is the capital "
                      "of France?\nAnswer:", "prompt with a context passage (its last line starts the answer)")
    max_new_tokens: int = opt(12, "tokens to generate", min=1)


@dataclass(frozen=True, eq=False)
class GroundingResult(Result):
    """Lookback Lens on one model.

    ``stats``: held-out AUROC (+ interval), mean-LR baseline, permutation null, dataset counts;
    ``w_*`` the same within templates (confound control), ``centred_*`` for the template-centred fit.
    ``head_weights``: ``[layers, heads]`` detector coefficients (standardised features).
    ``mitigation``: one row per condition: grounded / contradicted rate on held-out items and the
    paired change vs greedy (``d_greedy``) and vs its control (``d_control``), with 95% intervals.
    ``stats["baselines"]``: the honest baselines (:mod:`.baselines`), each ``{estimate, lo, hi, n}``.
    ``p_greedy`` / ``p_control`` in ``mitigation``: exact McNemar p-values of the same pairs.
    ``roc``: held-out ROC points; ``answers``: the answered items (no ratios); ``detector``: the fit.
    Frame: ``coef`` and ``rank`` per head; run-level numbers with ``layer = head = -1``.
    """

    FORMAT = FORMAT
    VERSION = 2
    READS = (1, 2)

    model_id: str
    stats: dict
    head_weights: HeadScores
    mitigation: pd.DataFrame = field(default_factory=pd.DataFrame)
    roc: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["scorer", "fpr", "tpr"]))
    answers: pd.DataFrame = field(default_factory=pd.DataFrame)
    detector: Detector | None = None

    def head_scores(self) -> dict[str, HeadScores]:
        w = self.head_weights
        rank = np.empty(w.size)
        rank[np.argsort(-w, axis=None, kind="stable")] = np.arange(1, w.size + 1)
        return {"coef": w, "rank": rank.reshape(w.shape)}

    def to_frame(self) -> pd.DataFrame:
        """Tidy: ``coef`` and ``rank`` per layer and head; run-level metrics (``layer = head = -1``)."""
        runs = {k: v for k, v in self.stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for _, r in self.mitigation.iterrows():
            runs |= {f"{m}:{r['condition']}": r[m] for m in ("grounded_rate", "contradicted_rate", "d_greedy",
                                                               "d_control", "p_greedy", "p_control") if m in r and not pd.isna(r[m])}
        return pd.concat([head_frame(self.head_scores()), run_rows(runs)], ignore_index=True)

    def roles(self, top: int = 10) -> dict[HeadId, list[str]]:
        w, H = self.head_weights, self.head_weights.shape[1]
        return {HeadId(int(i) // H, int(i) % H): [f"grounding top-{top}"]
                for i in np.argsort(-w, axis=None, kind="stable")[:top]}

    def n_samples(self) -> int:
        return int(self.stats.get("n_heldout", 0))

    def summary(self) -> dict[str, Stat]:
        s, n = self.stats, self.stats.get("n_heldout")
        base = self.stats.get("baselines", {})           # the honest baselines come before the detector
        out = {f"baseline_{k}": Stat(label, base[k]["estimate"], n=base[k].get("n"), ci=(base[k]["lo"], base[k]["hi"]))
               for k, label in BASELINES_FIRST.items() if k in base}
        out |= {"auroc": Stat("held-out AUROC", s.get("auroc"), n=n, ci=_ci(s, "auroc_ci")),
               "baseline": Stat("mean-ratio baseline", s.get("baseline_auroc"), n=n, ci=_ci(s, "baseline_ci")),
               "null": Stat(f"permutation null (95th pct; p = {s.get('perm_p', float('nan')):.3g})", s.get("null_q95")),
               "w_auroc": Stat("within-template AUROC", s.get("w_auroc"), n=n, ci=_ci(s, "w_auroc_ci")),
               "items": Stat("items (grounded / not)", f"{s.get('n_grounded', '?')} / {s.get('n_not_grounded', '?')}")}
        return out | mitigation_stats(self.mitigation)

    def plots(self) -> dict:
        from . import plots

        return {"heads": lambda: plots.heads(self), "roc": lambda: plots.roc(self),
                "mitigation": lambda: plots.mitigation(self)}

    def sections(self) -> list[Section]:
        roc = (Figure("roc"), Table("ROC points", self.roc)) if len(self.roc) else \
            (Note("No held-out ROC in this result (a run saved before version 2 keeps only the summary)."),)
        if self.stats.get("baselines"):
            from .baselines import baseline_table

            roc = (Table("held-out AUROC, honest baselines first", baseline_table(self.stats["baselines"]),
                         "baselines"),) + roc
        mit = (Figure("mitigation"), Table("mitigation", self.mitigation)) if len(self.mitigation) else \
            (Note("This run has no mitigation stage (n_mitigate = 0)."),)
        view = (Tool("guided", "Generate (detector-guided) and colour each token", GuidedPrompt(), self.token_view),) \
            if self.detector is not None else (Note("No detector.json next to this result."),)
        heads = Section("detector heads", (Figure("heads", selects_head=True), Table("grounding", self.to_frame())))
        return [Section("", (Note(METHODS),)),
                Section("", (Section("ROC", roc), heads, Section("mitigation", mit), Section("token view", view)),
                        "tabs")]

    def token_view(self, model, inputs: GuidedPrompt) -> ToolOutput:
        """Guided decoding of the prompt with this result's detector, each token coloured by P(grounded)."""
        from .mitigate import guided_view
        from .plots import token_view

        _, toks, scores = guided_view(model, self.detector, inputs.prompt, max_new_tokens=inputs.max_new_tokens)
        page = token_view_html(toks, scores, inputs.prompt)
        return ToolOutput(html=page, figures={"token view": token_view(toks, scores)},
                          downloads=(Download("Token view as HTML", "token_view.html", page, "text/html"),))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, df in (("heads", self.to_frame()), ("mitigation", self.mitigation), ("roc", self.roc),
                         ("answers", self.answers)):
            with atomic_path(folder / f"{name}.parquet") as tmp:
                df.to_parquet(tmp)
        if self.detector is not None:
            self.detector.save(folder / "detector.json")
        return self.write_summary(folder, {"summary": self.stats, "head_weights": self.head_weights.tolist()})

    @classmethod
    def load(cls, folder: str | Path) -> "GroundingResult":
        folder = Path(folder)
        d = cls.read_summary(folder)
        roc = _parquet(folder / "roc.parquet", ["scorer", "fpr", "tpr"])
        det = Detector.load(folder / "detector.json") if (folder / "detector.json").exists() else None
        return cls(d["model_id"], d["summary"], np.asarray(d["head_weights"], float),
                   _parquet(folder / "mitigation.parquet"), roc, _parquet(folder / "answers.parquet"), det)


def _parquet(path: Path, columns=None) -> pd.DataFrame:
    """A saved table, or an empty one (with ``columns``) where a version-1 result has none."""
    return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=columns)


def _ci(stats: dict, key: str):
    return tuple(stats[key]) if key in stats else None


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


def mitigation_stats(mit: pd.DataFrame) -> dict[str, Stat]:
    """Per condition: the grounded rate (Wilson interval) and its paired change vs greedy and vs its
    control (bootstrap interval, exact McNemar p), on the same held-out items."""
    from ..inference import wilson

    out = {}
    nan = float("nan")
    for r in mit.itertuples():                 # older results lack some columns: their intervals stay unknown
        g = lambda name: getattr(r, name, nan)  # noqa: E731,B023
        w = wilson(int(round(r.grounded_rate * r.n)), int(r.n))
        out[f"mitigation_{r.condition}"] = Stat(f"grounded rate, {r.condition}", r.grounded_rate, n=int(r.n),
                                                ci=(w.lo, w.hi), fmt=".2f")
        if r.condition != "greedy" and "d_greedy" in mit:
            ci = (g("d_greedy_lo"), g("d_greedy_hi"))
            out[f"mitigation_{r.condition}_vs_greedy"] = Stat(
                f"{r.condition} minus greedy (paired; McNemar p = {g('p_greedy'):.3g})", r.d_greedy, n=int(r.n),
                ci=None if np.isnan(ci).any() else ci, fmt="+.3f")
        control = getattr(r, "control", "")
        if isinstance(control, str) and control:
            out[f"mitigation_{r.condition}_vs_{control}"] = Stat(
                f"{r.condition} minus {control} (paired; McNemar p = {g('p_control'):.3g})", g("d_control"),
                n=int(r.n), ci=(g("d_control_lo"), g("d_control_hi")), fmt="+.3f")
    return out
