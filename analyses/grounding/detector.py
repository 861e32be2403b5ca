"""The Lookback Lens detector: logistic regression on span-averaged lookback ratios.

Features are the ``L*H`` mean lookback ratios of a span, standardised; the label is 1 for a
grounded span. The detector is saved as JSON (coefficients, intercept, scaler mean/scale and
metadata), never pickled, and scoring after loading is plain numpy, so it reproduces exactly.
Evaluation: held-out AUROC with a bootstrap interval, the mean-ratio baseline (the average of
all features as the score) and a permutation null (the detector refit on shuffled labels).

Confound control: when the prompt template alone predicts the label, a pooled AUROC can be
earned by recognising the template. :func:`grouped_auroc` counts only (grounded, not grounded)
pairs of the same template (a template-only score gets exactly 0.5), its permutation null
shuffles labels within templates, and :func:`center_by_group` removes each template's mean
feature (label-free) before fitting.

Methods: docs/methods.md §5.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.atomic import read_json, write_json
from probe.errors import CorruptFileError, InputError, ModelMismatchError

FORMAT = "headwise.lookback_detector"


@dataclass(frozen=True, eq=False)
class Detector:
    """A fitted detector: ``score(X) = sigmoid(((X - mean) / scale) @ coef + intercept)`` = P(grounded)."""

    coef: np.ndarray          # [L*H]
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    n_layers: int
    n_heads: int
    meta: dict = field(default_factory=dict)

    def decision(self, X) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if X.shape[1] != self.coef.shape[0]:
            raise InputError(f"features have {X.shape[1]} columns, the detector expects {self.coef.shape[0]} "
                             f"({self.n_layers} layers x {self.n_heads} heads): use a detector of this model")
        return ((X - self.mean) / self.scale) @ self.coef + self.intercept

    def score(self, X) -> np.ndarray:
        """Probability that each span is grounded."""
        return 1.0 / (1.0 + np.exp(-self.decision(X)))

    def head_weights(self) -> np.ndarray:
        """``[layers, heads]`` coefficients (positive: looking back at the context means grounded)."""
        return self.coef.reshape(self.n_layers, self.n_heads)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "coef": self.coef.tolist(), "intercept": self.intercept,
                "scaler_mean": self.mean.tolist(), "scaler_scale": self.scale.tolist(),
                "n_layers": self.n_layers, "n_heads": self.n_heads, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict, where: str = "detector") -> "Detector":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CorruptFileError(f"{where}: not a lookback detector file; write one with `headwise scan grounding`")
        try:
            det = cls(np.asarray(d["coef"], float), float(d["intercept"]), np.asarray(d["scaler_mean"], float),
                      np.asarray(d["scaler_scale"], float), int(d["n_layers"]), int(d["n_heads"]), d.get("meta", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{where}: detector file is missing or has a bad field ({exc})") from exc
        if not det.coef.shape == det.mean.shape == det.scale.shape == (det.n_layers * det.n_heads,):
            raise CorruptFileError(f"{where}: detector arrays do not match {det.n_layers} x {det.n_heads} heads")
        arrays = {"coef": det.coef, "scaler_mean": det.mean, "scaler_scale": det.scale}
        bad = [k for k, a in arrays.items() if not np.isfinite(a).all()] + \
            (["intercept"] if not np.isfinite(det.intercept) else []) + \
            (["scaler_scale (<= 0)"] if (det.scale <= 0).any() else [])
        if bad or not isinstance(det.meta, dict):
            raise CorruptFileError(f"{where}: the detector's {', '.join(bad) or 'meta'} holds invalid values: "
                                   "the file is damaged; make it again with `headwise scan grounding`")
        return det

    @classmethod
    def load(cls, path: str | Path) -> "Detector":
        return cls.from_dict(read_json(path), str(path))

    def check_model(self, model, required: bool = False) -> None:
        """Refuse a detector fitted on other weights (its ``meta`` records the weights hash when
        ``headwise scan grounding`` makes it); ``required``: a detector without that record is refused too."""
        made = self.meta.get("weights_hash")
        if made is None:
            if required:
                raise ModelMismatchError("this detector does not record the model it was fitted on: make it with "
                                         f"`headwise scan grounding --model {model.model_id}`")
            return
        if made != model.weights_hash:
            raise ModelMismatchError(
                f"this detector was fitted on {self.meta.get('model_id', 'another model')} (weights {made}) but the "
                f"model is {model.model_id} (weights {model.weights_hash}): run `headwise scan grounding --model "
                f"{model.model_id}` and use its detector.json")


def fit(X, y, n_layers: int, n_heads: int, C: float = 1.0, meta: dict | None = None) -> Detector:
    """Standardise, then fit an L2 logistic regression (scikit-learn, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    X, y = np.asarray(X, np.float64), np.asarray(y, int)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise InputError(f"need features [n, L*H] and n labels, got {X.shape} and {y.shape}")
    if len(set(y.tolist())) < 2:
        raise InputError("the training labels have one class only: generate more items so both "
                         "grounded and not-grounded answers occur")
    mean, scale = X.mean(0), X.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    with threadpool_limits(1):  # a BLAS thread pool on a busy machine makes this 100x slower
        clf = LogisticRegression(C=C, max_iter=2000).fit((X - mean) / scale, y)
    return Detector(clf.coef_[0].copy(), float(clf.intercept_[0]), mean, scale, n_layers, n_heads, meta or {})


def auroc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def bootstrap_ci(y, s, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUROC over resampled held-out items (one-class resamples skipped)."""
    y, s = np.asarray(y), np.asarray(s)
    rng, vals = np.random.default_rng(seed), []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if len(set(y[i].tolist())) == 2:
            vals.append(auroc(y[i], s[i]))
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def permutation_null(Xtr, ytr, Xte, yte, n_layers, n_heads, n: int = 50, seed: int = 0) -> np.ndarray:
    """Held-out AUROCs of detectors refit on shuffled training labels."""
    rng = np.random.default_rng(seed)
    return np.array([auroc(yte, fit(Xtr, rng.permutation(ytr), n_layers, n_heads).score(Xte)) for _ in range(n)])


def grouped_auroc(y, s, groups) -> float:
    """AUROC over (positive, negative) pairs of the same group only (ties count half).

    A score that depends on the group alone gets 0.5; groups with one class add no pairs.

    >>> grouped_auroc([1, 0, 1, 0], [0.9, 0.1, 0.2, 0.3], ["a", "a", "b", "b"])   # a: right, b: wrong
    0.5
    """
    y, s, groups = np.asarray(y), np.asarray(s, np.float64), np.asarray(groups)
    hit = pairs = 0.0
    for g in np.unique(groups):
        pos, neg = s[(groups == g) & (y == 1)], s[(groups == g) & (y == 0)]
        if len(pos) and len(neg):
            d = pos[:, None] - neg[None, :]
            hit += float((d > 0).sum() + 0.5 * (d == 0).sum())
            pairs += d.size
    if not pairs:
        raise InputError("no group holds both classes: a within-group AUROC needs grounded and not-grounded "
                         "answers to the same template")
    return hit / pairs


def center_by_group(X, groups, means: dict | None = None) -> tuple[np.ndarray, dict]:
    """``X - mean(X of its group) + mean(X)``: removes what the group alone explains (label-free).

    ``means`` (from the training set) is reused for held-out rows; an unseen group keeps its rows.
    """
    X, groups = np.asarray(X, np.float64), np.asarray(groups)
    if means is None:
        means = {"__all__": X.mean(0)} | {g: X[groups == g].mean(0) for g in np.unique(groups).tolist()}
    shift = np.stack([means.get(g, means["__all__"]) - means["__all__"] for g in groups.tolist()]) \
        if len(X) else np.zeros_like(X)
    return X - shift, means


def _ci(y, s, groups, n, seed, level=0.95):
    """Bootstrap interval of the within-group AUROC (resamples without a same-group pair skipped)."""
    y, s, groups = np.asarray(y), np.asarray(s), np.asarray(groups)
    rng, vals = np.random.default_rng(seed), []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        try:
            vals.append(grouped_auroc(y[i], s[i], groups[i]))
        except InputError:
            continue
    return tuple(float(v) for v in np.quantile(vals, [(1 - level) / 2, (1 + level) / 2]))


def _within_null(Xtr, ytr, gtr, Xte, yte, gte, L, H, n, seed) -> np.ndarray:
    """Within-group AUROCs of detectors refit on labels shuffled inside each training group."""
    rng, ytr, gtr = np.random.default_rng(seed), np.asarray(ytr), np.asarray(gtr)
    out = []
    for _ in range(n):
        yp = ytr.copy()
        for g in np.unique(gtr):
            idx = np.flatnonzero(gtr == g)
            yp[idx] = rng.permutation(ytr[idx])
        out.append(grouped_auroc(yte, fit(Xtr, yp, L, H).score(Xte), gte))
    return np.array(out)


def evaluate(Xtr, ytr, Xte, yte, n_layers, n_heads, *, n_boot=1000, n_perm=50, seed=0,
             gtr=None, gte=None) -> tuple[Detector, dict]:
    """Fit on train; held-out AUROC + interval, mean-LR baseline + interval, permutation null.

    With groups (templates) ``gtr``/``gte`` it also reports the within-group AUROC (``w_*``) of the
    detector and the baseline, with intervals and a within-group permutation null.
    """
    det = fit(Xtr, ytr, n_layers, n_heads, meta={"n_train": int(len(ytr)), "n_heldout": int(len(yte))})
    s, base = det.score(Xte), np.asarray(Xte).mean(1)
    null = permutation_null(Xtr, ytr, Xte, yte, n_layers, n_heads, n_perm, seed)
    a = auroc(yte, s)
    summary = {"auroc": a, "auroc_ci": bootstrap_ci(yte, s, n_boot, seed),
               "baseline_auroc": auroc(yte, base), "baseline_ci": bootstrap_ci(yte, base, n_boot, seed),
               "null_mean": float(null.mean()), "null_q95": float(np.quantile(null, 0.95)),
               "perm_p": float((1 + (null >= a).sum()) / (1 + len(null))),
               "n_train": int(len(ytr)), "n_heldout": int(len(yte)),
               "heldout_grounded": int(np.sum(yte)), "train_grounded": int(np.sum(ytr))}
    if gtr is not None and gte is not None:
        wa = grouped_auroc(yte, s, gte)
        wnull = _within_null(Xtr, ytr, gtr, Xte, yte, gte, n_layers, n_heads, n_perm, seed)
        summary.update({"w_auroc": wa, "w_auroc_ci": _ci(yte, s, gte, n_boot, seed),
                        "w_baseline_auroc": grouped_auroc(yte, base, gte),
                        "w_baseline_ci": _ci(yte, base, gte, n_boot, seed),
                        "w_null_mean": float(wnull.mean()), "w_null_q95": float(np.quantile(wnull, 0.95)),
                        "w_perm_p": float((1 + (wnull >= wa).sum()) / (1 + len(wnull)))})
    return det, summary


def paired_diff(a, b, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items (e.g. grounded after vs before) and its bootstrap interval.

    >>> paired_diff([1, 1, 0, 1], [0, 1, 0, 1])[0]
    0.25
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0:
        raise InputError("no paired items to compare: run the mitigation on at least one item")
    i = np.random.default_rng(seed).integers(0, d.size, (n, d.size))
    lo, hi = np.quantile(d[i].mean(1), [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------- answered items -> features

def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a label and at least one generated token (the spans the detector sees)."""
    return df[df["label"].notna() & (df["n_new"] > 0)]


def features(df: pd.DataFrame, n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Span features (mean lookback ratio over the answer's rows) and labels of the labelled rows."""
    lab = labelled(df)
    return row_features(lab, n_layers, n_heads), lab["label"].astype(int).to_numpy()


def row_features(df: pd.DataFrame, L: int, H: int) -> np.ndarray:
    """``[rows, L*H]``: each answer's lookback ratios averaged over its generated tokens."""
    if not len(df):
        return np.zeros((0, L * H))
    return np.stack([np.asarray(r, np.float64).reshape(-1, L * H).mean(0) for r in df["row_lr"]])


def fit_detectors(df: pd.DataFrame, L: int, H: int, *, center: str = "none", n_perm: int = 50,
                  n_boot: int = 1000, seed: int = 0) -> tuple[Detector, dict]:
    """The plain detector (the paper's) and the template-centred one; returns the chosen one and a summary.

    Both are scored pooled (``auroc``) and within templates (``w_auroc``: only pairs of answers to the
    same template, so knowing the template is worth 0.5); keys of the centred fit carry the prefix
    ``centred_``. Centring means come from every train answer with tokens (labelled or not): no labels.
    ``center`` picks the detector returned (``"none"``: plain, as in the paper).
    """
    if center not in ("template", "none"):
        raise InputError(f"center must be 'template' or 'none', not {center!r}")
    tr, te = (labelled(df[df["split"] == s]) for s in ("train", "heldout"))
    (Xtr, ytr), (Xte, yte) = features(tr, L, H), features(te, L, H)
    if len(set(yte.tolist())) < 2 or len(set(ytr.tolist())) < 2:
        raise InputError(f"train or held-out labels have one class only ({len(ytr)}/{len(yte)} labelled): "
                         "use more items (limit)")
    gtr, gte = tr["template_id"].to_numpy(), te["template_id"].to_numpy()
    plain, summary = evaluate(Xtr, ytr, Xte, yte, L, H, n_perm=n_perm, n_boot=n_boot, seed=seed, gtr=gtr, gte=gte)
    pool = df[(df["split"] == "train") & (df["n_new"] > 0)]
    _, means = center_by_group(row_features(pool, L, H), pool["template_id"].to_numpy())
    Ctr, Cte = center_by_group(Xtr, gtr, means)[0], center_by_group(Xte, gte, means)[0]
    centred, cs = evaluate(Ctr, ytr, Cte, yte, L, H, n_perm=n_perm, n_boot=n_boot, seed=seed, gtr=gtr, gte=gte)
    summary.update({f"centred_{k}": v for k, v in cs.items() if not k.startswith(("n_", "heldout_", "train_"))})
    det = centred if center == "template" else plain
    return det, summary


def confound_checks(det: Detector, tr: pd.DataFrame, te: pd.DataFrame, L: int, H: int) -> dict:
    """Is the detector more than a template detector? AUROC of the template's train grounded rate as the
    score, and the detector's AUROC within each template (where both classes occur in held-out)."""
    lab_tr, lab_te = labelled(tr), labelled(te)
    rate = lab_tr.groupby("template_id")["label"].mean()
    y = lab_te["label"].astype(int).to_numpy()
    out = {"template_baseline_auroc": auroc(y, lab_te["template_id"].map(rate).fillna(0.5).to_numpy())}
    for t, g in lab_te.groupby("template_id"):
        X, yt = features(g, L, H)
        if len(set(yt.tolist())) == 2:
            s, base = det.score(X), X.mean(1)
            out[f"template{t}_auroc"], out[f"template{t}_auroc_ci"] = auroc(yt, s), bootstrap_ci(yt, s, 1000)
            out[f"template{t}_baseline_auroc"] = auroc(yt, base)
            out[f"template{t}_n"] = int(len(yt))
    return out


def heldout_roc(det: Detector, df: pd.DataFrame) -> pd.DataFrame:
    """Held-out ROC points (``scorer, fpr, tpr``) of the detector and of the mean-ratio baseline."""
    from sklearn.metrics import roc_curve

    X, y = features(df[df["split"] == "heldout"], det.n_layers, det.n_heads)
    if len(set(y.tolist())) < 2:
        return pd.DataFrame(columns=["scorer", "fpr", "tpr"])
    parts = []
    for name, s in (("Lookback Lens detector", det.score(X)), ("mean lookback ratio (baseline)", X.mean(1))):
        fpr, tpr, _ = roc_curve(y, s)
        parts.append(pd.DataFrame({"scorer": name, "fpr": fpr, "tpr": tpr}))
    return pd.concat(parts, ignore_index=True)
