"""The grounding pipeline, its resumable mitigation stage, and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from probe.atomic import atomic_path
from probe.errors import InputError

from .data import Item, build_items, generate_dataset, item_regions, label, answer_item
from .detector import Detector, evaluate
from .mitigate import boost_heads, boost_spec, guided_generate
from .result import GroundingResult


def features(df: pd.DataFrame, n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Span features (mean lookback ratio over the answer's rows) and labels of the labelled rows."""
    lab = df[df["label"].notna() & (df["n_new"] > 0)]
    X = np.stack([np.asarray(r, np.float64).reshape(-1, n_layers * n_heads).mean(0) for r in lab["row_lr"]]) \
        if len(lab) else np.zeros((0, n_layers * n_heads))
    return X, lab["label"].astype(int).to_numpy()


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


def _conditions(det: Detector, k: int, alpha: float) -> dict[str, dict]:
    return {"greedy": {}, "sampled": {"guided": True, "n_candidates": 1},
            "guided": {"guided": True},
            f"boost_top{k}": {"heads": boost_heads(det, k, "top"), "alpha": alpha},
            f"boost_random{k}": {"heads": boost_heads(det, k, "random"), "alpha": alpha},
            "boost_all": {"heads": boost_heads(det), "alpha": alpha}}


def _answer(model, item: Item, det: Detector, cond: dict, max_new_tokens: int, seed: int) -> str:
    ids, reg = item_regions(model, item)
    if cond.get("guided"):
        return guided_generate(model, ids, det, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=max_new_tokens,
                               reading=det.meta.get("reading", "code"),
                               seed=seed, n_candidates=cond.get("n_candidates", 8)).text
    spec = boost_spec(cond["heads"], (reg.ctx_start, reg.ctx_stop), cond["alpha"]) if cond.get("heads") else None
    return answer_item(model, item, max_new_tokens=max_new_tokens, spec=spec)["answer"]


def mitigation(model, items: list[Item], det: Detector, out: Path, *, k: int = 20, alpha: float = 0.3,
               max_new_tokens: int = 10, seed: int = 0, greedy: dict | None = None,
               progress: bool = True) -> pd.DataFrame:
    """Grounded / contradicted rate on ``items`` per condition; one parquet per finished condition.

    Conditions: greedy (before; ``greedy`` maps item ids to answers already generated), sampled
    (one candidate per chunk: the sampling control), guided (best of 8 by the detector), and the
    boost on the top-``k`` heads by coefficient, ``k`` random heads (control) and all heads of 2..L-1.
    """
    from tqdm import tqdm

    folder = Path(out) / "mitigation"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cond in _conditions(det, k, alpha).items():
        path = folder / f"{name}.parquet"
        ids = [it.item_id for it in items]
        if not path.exists() or pd.read_parquet(path, columns=["item_id"])["item_id"].tolist() != ids:
            answers = [{"item_id": it.item_id, "condition": name,
                        "answer": greedy[it.item_id] if name == "greedy" and greedy and it.item_id in greedy
                        else _answer(model, it, det, cond, max_new_tokens, seed + i)}
                       for i, it in enumerate(tqdm(items, desc=f"mitigation {name}", disable=not progress))]
            with atomic_path(path) as tmp:
                pd.DataFrame(answers).to_parquet(tmp)
        a = pd.read_parquet(path)
        labs = [label(t, it.passage_value, it.true_value) for t, it in zip(a["answer"], items)]
        rows.append({"condition": name, "n": len(labs), "grounded_rate": float(np.mean([l == 1 for l in labs])),
                     "contradicted_rate": float(np.mean([l == 0 for l in labs])),
                     "heads": json.dumps([str(h) for h in cond.get("heads", [])])})
    return pd.DataFrame(rows)


def run_grounding(model, out: str | Path, *, limit: int | None = None, n_mitigate: int = 40, k: int = 20,
                  alpha: float = 0.3, n_perm: int = 50, seed: int = 0, mitigate_templates=(1, 2),
                  reading: str = "code", progress: bool = True) -> GroundingResult:
    """Data → detector → mitigation on ``model``; writes ``out/`` (resumable) and returns the result."""
    out = Path(out)
    df = generate_dataset(model, out, limit=limit, reading=reading, progress=progress)
    L, H = model.n_layers, model.n_heads
    tr, te = df[df["split"] == "train"], df[df["split"] == "heldout"]
    (Xtr, ytr), (Xte, yte) = features(tr, L, H), features(te, L, H)
    if len(set(yte.tolist())) < 2:
        raise InputError(f"held-out labels have one class only ({len(yte)} labelled): use more items (limit)")
    det, summary = evaluate(Xtr, ytr, Xte, yte, L, H, n_perm=n_perm, seed=seed)
    counts = df["label"].value_counts(dropna=False)
    summary.update({"n_items": int(len(df)), "n_grounded": int(counts.get(1.0, 0)),
                    "n_not_grounded": int(counts.get(0.0, 0)), "n_ambiguous": int(df["label"].isna().sum())})
    det = Detector(det.coef, det.intercept, det.mean, det.scale, L, H,
                   {**det.meta, "model_id": model.model_id, "weights_hash": model.weights_hash, "reading": reading,
                    "feature": "mean lookback ratio over the rows that produced the answer tokens"})
    det.save(out / "detector.json")
    summary.update(_confound_checks(det, tr, te, L, H))
    held = {it.item_id: it for it in build_items(limit=limit)}
    # mitigation items: held-out items of the hallucination-prone templates (model-free choice)
    items = [held[i] for i in te["item_id"] if held[i].template_id in mitigate_templates][:n_mitigate]
    mit = (mitigation(model, items, det, out, k=k, alpha=alpha, seed=seed, progress=progress,
                      greedy=dict(zip(df["item_id"], df["answer"]))) if n_mitigate else pd.DataFrame())
    result = GroundingResult(model.model_id, summary, det.head_weights(), mit)
    result.save(out)
    return result


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("grounding", help="Lookback Lens: detector of ungrounded answers + mitigation")
    s.add_argument("--model", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=None, help="use only the first N items (default all)")
    s.add_argument("--n-mitigate", type=int, default=40)
    s.add_argument("--top-k", type=int, default=20, help="heads boosted in the top-k / random-k conditions")
    s.add_argument("--alpha", type=float, default=0.3)
    s.add_argument("--reading", choices=("code", "paper"), default="code",
                   help="new tokens = everything after the context (reference code) or generated only (paper)")
    s.set_defaults(run=_cli_scan)
    g = subparsers.add_parser("grounding-generate", help="generate with Lookback Lens guided decoding")
    g.add_argument("--model", default=None)
    g.add_argument("--guided", required=True, help="detector.json from `headwise scan grounding`")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--html", default=None, help="write the token view coloured by grounding here")
    g.add_argument("prompt")
    g.set_defaults(run=_cli_generate)


def _load(name):
    import torch

    from probe import load_model

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    return load_model(name) if name else load_model()


def _cli_scan(args) -> int:
    res = run_grounding(_load(args.model), args.out, limit=args.limit, n_mitigate=args.n_mitigate,
                        k=args.top_k, alpha=args.alpha, reading=args.reading)
    print(json.dumps(res.summary, indent=2))
    print(res.mitigation.to_string(index=False))
    return 0


def _cli_generate(args) -> int:
    from .result import token_scores, token_view_html

    model = _load(args.model)
    det = Detector.load(args.guided)
    out = guided_generate(model, args.prompt, det, max_new_tokens=args.max_new_tokens,
                          reading=det.meta.get("reading", "code"))
    print(out.text)
    print(f"chunk scores (P grounded): {[round(s, 3) for s in out.chunk_scores]}")
    if args.html:
        toks = [model.tokenizer.decode([t]) for t in out.new_ids]
        Path(args.html).write_text(token_view_html(toks, token_scores(det, out.row_lr), args.prompt))
    return 0
