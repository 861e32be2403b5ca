"""The grounding pipeline, its resumable mitigation stage, and the CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from probe.atomic import atomic_path
from probe.errors import InputError

from ..inference import mcnemar_exact
from .data import Item, build_items, generate_dataset, item_regions, label, answer_item
from .detector import Detector, center_by_group, evaluate, paired_diff
from .mitigate import boost_heads, boost_spec, guided_generate
from .result import GroundingResult


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a label and at least one generated token (the spans the detector sees)."""
    return df[df["label"].notna() & (df["n_new"] > 0)]


def features(df: pd.DataFrame, n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Span features (mean lookback ratio over the answer's rows) and labels of the labelled rows."""
    lab = labelled(df)
    return _row_features(lab, n_layers, n_heads), lab["label"].astype(int).to_numpy()


def _row_features(df: pd.DataFrame, L: int, H: int) -> np.ndarray:
    """``[rows, L*H]``: each answer's lookback ratios averaged over its generated tokens."""
    if not len(df):
        return np.zeros((0, L * H))
    return np.stack([np.asarray(r, np.float64).reshape(-1, L * H).mean(0) for r in df["row_lr"]])


def _confound_checks(det: Detector, tr: pd.DataFrame, te: pd.DataFrame, L: int, H: int) -> dict:
    """Is the detector more than a template detector? AUROC of the template's train grounded rate as the
    score, and the detector's AUROC within each template (where both classes occur in held-out)."""
    from .detector import auroc, bootstrap_ci

    lab_tr, lab_te = (d[d["label"].notna() & (d["n_new"] > 0)] for d in (tr, te))
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


def _baselines(det: Detector, df: pd.DataFrame, L: int, H: int, center: str, seed: int) -> dict:
    """:func:`.baselines.honest_baselines` on the run's split (detector scored as it was fitted)."""
    from .baselines import honest_baselines

    tr, te = (labelled(df[df["split"] == s]) for s in ("train", "heldout"))
    (Xtr, ytr), (Xte, yte) = features(tr, L, H), features(te, L, H)
    if len(set(yte.tolist())) < 2:
        return {}
    gtr, gte = tr["template_id"].to_numpy(), te["template_id"].to_numpy()
    Xs = Xte
    if center == "template":
        pool = df[(df["split"] == "train") & (df["n_new"] > 0)]
        _, means = center_by_group(_row_features(pool, L, H), pool["template_id"].to_numpy())
        Xs = center_by_group(Xte, gte, means)[0]
    return honest_baselines(Xtr, ytr, gtr, Xte, yte, gte, det.score(Xs), seed=seed)


def _conditions(det: Detector, k: int, alpha: float, boost: str = "context") -> dict[str, dict]:
    """Mitigation conditions; ``control`` names the condition each one is compared with besides greedy.

    ``boost="paint"``: the boosts are PAINT as stated (:mod:`.paint`: passage tokens only, 0.7/0.3,
    all heads of layers 2..L-1 for ``paint``; the top-``k`` detector heads vs ``k`` random heads)."""
    if boost == "paint":
        return {"greedy": {},
                "paint": {"paint": True},
                f"paint_top{k}": {"paint": True, "heads": boost_heads(det, k, "top"), "control": f"paint_random{k}"},
                f"paint_random{k}": {"paint": True, "heads": boost_heads(det, k, "random")},
                "sampled": {"guided": True, "n_candidates": 1},
                "guided": {"guided": True, "control": "sampled"}}
    if boost != "context":
        raise InputError(f"boost must be 'context' (whole context, one alpha) or 'paint', not {boost!r}")
    return {"greedy": {},
            f"boost_top{k}": {"heads": boost_heads(det, k, "top"), "alpha": alpha, "control": f"boost_random{k}"},
            f"boost_random{k}": {"heads": boost_heads(det, k, "random"), "alpha": alpha},
            "boost_all": {"heads": boost_heads(det), "alpha": alpha},
            "sampled": {"guided": True, "n_candidates": 1},
            "guided": {"guided": True, "control": "sampled"}}


def _answer(model, item: Item, det: Detector, cond: dict, max_new_tokens: int, seed: int) -> str:
    ids, reg = item_regions(model, item)
    if cond.get("guided"):
        return guided_generate(model, ids, det, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=max_new_tokens,
                               reading=det.meta.get("reading", "code"),
                               seed=seed, n_candidates=cond.get("n_candidates", 8)).text
    if cond.get("paint"):
        from .paint import paint_for

        spec = paint_for(model, item.prompt, item.passage, heads=cond.get("heads"))[1]
        return answer_item(model, item, max_new_tokens=max_new_tokens, spec=spec)["answer"]
    spec = boost_spec(cond["heads"], (reg.ctx_start, reg.ctx_stop), cond["alpha"]) if cond.get("heads") else None
    return answer_item(model, item, max_new_tokens=max_new_tokens, spec=spec)["answer"]


def _key(name: str, cond: dict, det: Detector, max_new_tokens: int, seed: int) -> str:
    """What a saved condition depends on: a finished file is reused only if this matches."""
    blob = json.dumps([name, {k: [str(h) for h in v] if k == "heads" else v for k, v in cond.items()},
                       det.to_dict() if cond.get("guided") else None, max_new_tokens, seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stale(path: Path, ids: list[str], key: str) -> bool:
    if not path.exists():
        return True
    old = pd.read_parquet(path)
    return old["item_id"].tolist() != ids or "key" not in old or set(old["key"]) != {key}


def mitigation(model, items: list[Item], det: Detector, out: Path, *, k: int = 20, alpha: float = 0.3,
               max_new_tokens: int = 10, seed: int = 0, greedy: dict | None = None, block: int = 5,
               boost: str = "context", progress: bool = True) -> pd.DataFrame:
    """Grounded / contradicted rate on ``items`` per condition; one parquet per finished block of items.

    Conditions: greedy (before; ``greedy`` maps item ids to answers already generated), sampled
    (one candidate per chunk: the sampling control), guided (best of 8 by the detector), and the
    boost on the top-``k`` heads by coefficient, ``k`` random heads (control) and all heads of 2..L-1. ``d_greedy`` / ``d_control``: paired change in grounded rate with a 95% interval,
    ``p_greedy`` / ``p_control`` the exact McNemar p-values. ``boost="paint"``: PAINT as stated (:mod:`.paint`).
    """
    from tqdm import tqdm

    folder = Path(out) / "mitigation"
    folder.mkdir(parents=True, exist_ok=True)
    grounded, rows = {}, []
    conditions = _conditions(det, k, alpha, boost)
    for name, cond in conditions.items():
        key, parts = _key(name, cond, det, max_new_tokens, seed), []
        for b in range(0, len(items), block):   # one file per block of items: an interrupted run resumes
            path, chunk = folder / f"{name}_{b // block:03d}.parquet", items[b:b + block]
            if _stale(path, [it.item_id for it in chunk], key):
                answers = [{"item_id": it.item_id, "condition": name, "key": key,
                            "answer": greedy[it.item_id] if name == "greedy" and greedy and it.item_id in greedy
                            else _answer(model, it, det, cond, max_new_tokens, seed + b + i)}
                           for i, it in enumerate(tqdm(chunk, desc=f"mitigation {name} {b}", disable=not progress))]
                with atomic_path(path) as tmp:
                    pd.DataFrame(answers).to_parquet(tmp)
            parts.append(pd.read_parquet(path))
        answers = pd.concat(parts, ignore_index=True)["answer"]
        labs = [label(t, it.passage_value, it.true_value) for t, it in zip(answers, items)]
        grounded[name] = np.array([lab == 1 for lab in labs], float)
        rows.append({"condition": name, "n": len(labs), "grounded_rate": float(grounded[name].mean()),
                     "contradicted_rate": float(np.mean([lab == 0 for lab in labs])),
                     "heads": json.dumps([str(h) for h in cond.get("heads", [])])})
    for r in rows:
        r.update(zip(("d_greedy", "d_greedy_lo", "d_greedy_hi"), paired_diff(grounded[r["condition"]],
                                                                              grounded["greedy"])))
        c = conditions[r["condition"]].get("control")
        r["control"] = c or ""
        r.update(zip(("d_control", "d_control_lo", "d_control_hi"),
                     paired_diff(grounded[r["condition"]], grounded[c]) if c else (np.nan,) * 3))
        r["p_greedy"] = mcnemar_exact(grounded[r["condition"]], grounded["greedy"])
        r["p_control"] = mcnemar_exact(grounded[r["condition"]], grounded[c]) if c else np.nan
    return pd.DataFrame(rows)


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
    _, means = center_by_group(_row_features(pool, L, H), pool["template_id"].to_numpy())
    Ctr, Cte = center_by_group(Xtr, gtr, means)[0], center_by_group(Xte, gte, means)[0]
    centred, cs = evaluate(Ctr, ytr, Cte, yte, L, H, n_perm=n_perm, n_boot=n_boot, seed=seed, gtr=gtr, gte=gte)
    summary.update({f"centred_{k}": v for k, v in cs.items() if not k.startswith(("n_", "heldout_", "train_"))})
    det = centred if center == "template" else plain
    return det, summary


def _detector_stage(model, df: pd.DataFrame, out: Path, *, center: str, n_perm: int, seed: int, reading: str):
    """Fit (or, on a rerun with the same answers and settings, reload) the detector and its summary.

    Reloading matters: a refit can differ in the last bits (BLAS threads), which would change the
    detector and so invalidate the saved guided-decoding answers.
    """
    from probe.atomic import read_json, write_json

    L, H = model.n_layers, model.n_heads
    stamp = {"answers": hashlib.sha256(json.dumps(list(zip(df["item_id"], df["answer"]))).encode()).hexdigest(),
             "center": center, "n_perm": n_perm, "seed": seed, "reading": reading, "model": model.weights_hash}
    if (out / "fit.json").exists() and (out / "detector.json").exists():
        saved = read_json(out / "fit.json", "grounding fit")
        if saved.get("stamp") == stamp:
            return Detector.load(out / "detector.json"), saved["summary"]
    det, summary = fit_detectors(df, L, H, center=center, n_perm=n_perm, seed=seed)
    counts = df["label"].value_counts(dropna=False)
    summary.update({"n_items": int(len(df)), "n_grounded": int(counts.get(1.0, 0)), "center": center,
                    "n_not_grounded": int(counts.get(0.0, 0)), "n_ambiguous": int(df["label"].isna().sum())})
    det = Detector(det.coef, det.intercept, det.mean, det.scale, L, H,
                   {**det.meta, "model_id": model.model_id, "weights_hash": model.weights_hash, "reading": reading,
                    "center": center, "feature": "mean lookback ratio over the rows that produced the answer tokens"})
    det.save(out / "detector.json")
    det = Detector.load(out / "detector.json")          # the saved detector is the one used from here on
    write_json(out / "fit.json", {"stamp": stamp, "summary": summary})
    return det, summary


def run_grounding(model, out: str | Path, *, limit: int | None = None, n_mitigate: int = 60, k: int = 20,
                  alpha: float = 0.3, n_perm: int = 50, seed: int = 0, mitigate_templates=(1, 2, 3, 4),
                  reading: str = "code", center: str = "none", boost: str = "context",
                  progress: bool = True) -> GroundingResult:
    """Data → detectors → mitigation on ``model``; writes ``out/`` (resumable) and returns the result.

    The detector needs both grounded and ungrounded answers, so the example needs the embedded
    model (about a minute for 30 items on a CPU; ``notebooks/grounding.ipynb`` runs it):

    >>> from probe import load_model
    >>> res = run_grounding(load_model("smollm2-135m"), "runs/grounding", limit=30, n_mitigate=0)  # doctest: +SKIP
    >>> sorted(res.summary)[:3]                                                                     # doctest: +SKIP
    ['auroc', 'auroc_ci', 'baseline_auroc']

    Its first stage runs on any model:

    >>> import tempfile
    >>> df = generate_dataset(load_model("tiny-llama"), tempfile.mkdtemp(), limit=2, max_new_tokens=2, progress=False)
    >>> len(df), {"answer", "label", "row_lr"} <= set(df.columns)
    (2, True)
    """
    out = Path(out)
    df = generate_dataset(model, out, limit=limit, reading=reading, progress=progress)
    det, summary = _detector_stage(model, df, out, center=center, n_perm=n_perm, seed=seed, reading=reading)
    te = df[df["split"] == "heldout"]
    summary.update(_confound_checks(det, df[df["split"] == "train"], te, model.n_layers, model.n_heads))
    summary["baselines"] = _baselines(det, df, model.n_layers, model.n_heads, center, seed)
    held = {it.item_id: it for it in build_items(limit=limit)}
    # mitigation items: held-out items of the hallucination-prone templates (model-free choice)
    items = [held[i] for i in te["item_id"] if held[i].template_id in mitigate_templates][:n_mitigate]
    mit = (mitigation(model, items, det, out, k=k, alpha=alpha, seed=seed, progress=progress, boost=boost,
                      greedy=dict(zip(df["item_id"], df["answer"]))) if n_mitigate else pd.DataFrame())
    result = GroundingResult(model.model_id, summary, det.head_weights(), mit)
    result.save(out)
    return result


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("grounding", help="Lookback Lens: detector of ungrounded answers + mitigation")
    s.add_argument("--model", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=None, help="use only the first N items (default all)")
    s.add_argument("--n-mitigate", type=int, default=60)
    s.add_argument("--top-k", type=int, default=20, help="heads boosted in the top-k / random-k conditions")
    s.add_argument("--alpha", type=float, default=0.3)
    s.add_argument("--reading", choices=("code", "paper"), default="code",
                   help="new tokens = everything after the context (reference code) or generated only (paper)")
    s.add_argument("--center", choices=("none", "template"), default="none",
                   help="fit the detector on template-centred features (confound control) or plain (the paper)")
    s.add_argument("--n-perm", type=int, default=50, help="permutation-null refits")
    s.add_argument("--boost", choices=("context", "paint"), default="context",
                   help="mitigation boost: whole context with one alpha, or PAINT as stated (passage only, 0.7/0.3)")
    s.set_defaults(run=_cli_scan)


def _load(name):
    import torch

    from probe import load_model

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    return load_model(name) if name else load_model()


def _cli_scan(args) -> int:
    res = run_grounding(_load(args.model), args.out, limit=args.limit, n_mitigate=args.n_mitigate,
                        k=args.top_k, alpha=args.alpha, reading=args.reading, center=args.center,
                        n_perm=args.n_perm, boost=args.boost)
    if res.summary.get("baselines"):
        from .baselines import baseline_table

        print("held-out AUROC, baselines first:")
        print(baseline_table(res.summary["baselines"]).to_string(index=False))
    print(json.dumps(res.summary, indent=2))
    print(res.mitigation.to_string(index=False))
    return 0


def saved_dataset(folder: str | Path, reading: str = "code"):
    """The answered items of a saved grounding run (``dataset/shard_*.parquet``), or ``None``."""
    shards = sorted((Path(folder) / ("dataset" if reading == "code" else f"dataset_{reading}")).glob("shard_*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True) if shards else None


def heldout_roc(folder: str | Path):
    """Held-out ROC points (``scorer, fpr, tpr``) of a saved grounding run: the saved detector and the
    mean-ratio baseline, scored with :func:`features` and ``Detector.score``."""
    from sklearn.metrics import roc_curve

    det = Detector.load(Path(folder) / "detector.json")
    df = saved_dataset(folder, det.meta.get("reading", "code"))
    if df is None:
        return pd.DataFrame(columns=["scorer", "fpr", "tpr"])
    X, y = features(df[df["split"] == "heldout"], det.n_layers, det.n_heads)
    if len(set(y.tolist())) < 2:
        return pd.DataFrame(columns=["scorer", "fpr", "tpr"])
    parts = []
    for name, s in (("Lookback Lens detector", det.score(X)), ("mean lookback ratio (baseline)", X.mean(1))):
        fpr, tpr, _ = roc_curve(y, s)
        parts.append(pd.DataFrame({"scorer": name, "fpr": fpr, "tpr": tpr}))
    return pd.concat(parts, ignore_index=True)
