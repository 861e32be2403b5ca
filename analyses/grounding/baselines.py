"""Honest baselines for the Lookback Lens detector, reported before its own AUROC.

A held-out AUROC means little until it is set against what cheaper scores earn on the same items
(docs/methods.md §5, "Controls"). In reporting order:

1. **template only**: score = the training grounded rate of the item's prompt template. When
   templates differ in how often the model copies the passage, this alone scores well.
2. **within template**: the detector's and the baseline's AUROC over (grounded, not grounded)
   pairs of the *same* template (a template-only score gets exactly 0.5 here).
3. **mean lookback ratio, fitted**: a 1-feature logistic regression on the span's mean lookback
   ratio, fitted on the training items (so its direction is learned, not assumed).
4. **mean lookback ratio, direction-free**: ``max(AUROC, 1 - AUROC)``: optimistic by
   construction (the better direction is picked on the held-out items), stated as such.
5. the fixed-direction mean ratio (high ratio = grounded) and the detector itself.

Every figure carries its ``n`` and a percentile bootstrap interval (:mod:`analyses.inference`).

>>> import numpy as np
>>> X = np.array([[0.2], [0.3], [0.7], [0.8]]); y = np.array([1, 1, 0, 0])
>>> round(fitted_baseline_auroc(X, y, X, y), 3)      # the fit learns that a LOW ratio means grounded here
1.0
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import inference as inf

ORDER = ("template_only", "within_template_detector", "within_template_mean_ratio", "mean_ratio_fitted",
         "mean_ratio_direction_free", "mean_ratio_fixed", "detector")


def fitted_scores(xtr, ytr, xte) -> np.ndarray:
    """P(grounded) from a 1-feature logistic regression fitted on the training items."""
    from sklearn.linear_model import LogisticRegression

    xtr, xte = np.asarray(xtr, np.float64).reshape(-1, 1), np.asarray(xte, np.float64).reshape(-1, 1)
    mu, sd = xtr.mean(), xtr.std() or 1.0
    clf = LogisticRegression(max_iter=1000).fit((xtr - mu) / sd, np.asarray(ytr, int))
    return clf.predict_proba((xte - mu) / sd)[:, 1]


def fitted_baseline_auroc(Xtr, ytr, Xte, yte) -> float:
    """Held-out AUROC of the fitted mean-ratio baseline (features averaged over heads first)."""
    return inf.auroc(yte, fitted_scores(np.asarray(Xtr).mean(1), ytr, np.asarray(Xte).mean(1)))


def honest_baselines(Xtr, ytr, gtr, Xte, yte, gte, detector_scores, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The figures of the module docstring, each ``{estimate, lo, hi, n}`` (plus notes), in :data:`ORDER`."""
    from .detector import _ci, grouped_auroc

    Xtr, Xte = np.asarray(Xtr, np.float64), np.asarray(Xte, np.float64)
    ytr, yte, gtr, gte = (np.asarray(a) for a in (ytr, yte, gtr, gte))
    rate = pd.Series(ytr).groupby(gtr).mean()
    template = pd.Series(gte).map(rate).fillna(float(ytr.mean())).to_numpy()
    base_tr, base_te = Xtr.mean(1), Xte.mean(1)
    fitted = fitted_scores(base_tr, ytr, base_te)
    out = {"template_only": inf.auroc_ci(yte, template, n_boot=n_boot, seed=seed).to_dict()}
    for name, s in (("within_template_detector", detector_scores), ("within_template_mean_ratio", base_te)):
        try:
            est = grouped_auroc(yte, s, gte)
            lo, hi = _ci(yte, s, gte, n_boot, seed)
        except Exception:                          # no template holds both classes
            est = lo = hi = float("nan")
        out[name] = {"estimate": est, "lo": lo, "hi": hi, "n": int(len(yte))}
    out["mean_ratio_fitted"] = inf.auroc_ci(yte, fitted, n_boot=n_boot, seed=seed).to_dict()
    fixed = inf.auroc_ci(yte, base_te, n_boot=n_boot, seed=seed)
    flip = fixed.estimate < 0.5
    out["mean_ratio_direction_free"] = {"estimate": max(fixed.estimate, 1 - fixed.estimate),
                                        "lo": 1 - fixed.hi if flip else fixed.lo,
                                        "hi": 1 - fixed.lo if flip else fixed.hi, "n": fixed.n,
                                        "note": "direction picked on the held-out items (optimistic)"}
    out["mean_ratio_fixed"] = fixed.to_dict() | {"note": "high mean ratio = grounded, not fitted"}
    out["detector"] = inf.auroc_ci(yte, detector_scores, n_boot=n_boot, seed=seed).to_dict()
    return out


def detector_baselines(det, df: pd.DataFrame, center: str = "none", seed: int = 0) -> dict:
    """:func:`honest_baselines` on a run's answers (``df``: the items stage's frame), the detector scored as
    it was fitted (template-centred features when ``center == "template"``); ``{}`` when the held-out
    labels have one class."""
    from .detector import center_by_group, features, labelled, row_features

    L, H = det.n_layers, det.n_heads
    tr, te = (labelled(df[df["split"] == s]) for s in ("train", "heldout"))
    (Xtr, ytr), (Xte, yte) = features(tr, L, H), features(te, L, H)
    if len(set(yte.tolist())) < 2:
        return {}
    gtr, gte = tr["template_id"].to_numpy(), te["template_id"].to_numpy()
    Xs = Xte
    if center == "template":
        pool = df[(df["split"] == "train") & (df["n_new"] > 0)]
        _, means = center_by_group(row_features(pool, L, H), pool["template_id"].to_numpy())
        Xs = center_by_group(Xte, gte, means)[0]
    return honest_baselines(Xtr, ytr, gtr, Xte, yte, gte, det.score(Xs), seed=seed)


def baseline_table(baselines: dict) -> pd.DataFrame:
    """The baselines as rows in reporting order (template-only and within-template first)."""
    rows = [{"scorer": k, **{f: baselines[k].get(f) for f in ("estimate", "lo", "hi", "n", "note")}}
            for k in ORDER if k in baselines]
    return pd.DataFrame(rows)
