"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality",
arXiv 2404.15574; reference code nightdessert/Retrieval_Head, ``retrieval_head_detection.py``).

Needle-in-a-haystack prompts over a length x depth grid; at each decode step a head makes a
copy-paste event when its argmax key lies in the answer span and holds the emitted token; a
sample's score is events/|span|, a head's score the mean over samples the model answers
(ROUGE-1 recall > 0.5); retrieval heads score > 0.1. The masking experiment makes the top-K
heads (vs K random heads from outside the top set, several seeds) uniform during decoding.
See :mod:`.scoring` for which attention row is used (the reference's: the row producing w_t).

>>> from probe import load_model
>>> res = detect(load_model("tiny-llama"), lengths=[220], depths=[50], needles=["code"],
...              k=2, seeds=[0], max_new_tokens=4, progress=False)
>>> res.scores.shape
(2, 4)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probe.atomic import write_figure, write_json

from .harness import Needle, build_prompt, load_needles, locate_span, rouge1_recall  # noqa: F401
from .result import RetrievalResult
from .scan import as_needles, grid, pick_random, scan_masking, scan_samples, top_heads
from .scoring import head_scores, sample_events  # noqa: F401

DEFAULT_LENGTHS = (500, 1000, 2000, 3000, 4000)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)


def detect(model, *, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, needles=None, out=None,
           threshold: float = 0.1, k: int = 10, seeds=(0, 1, 2), exclude_top: int | None = None,
           mask: bool = True, mask_lengths=None, max_new_tokens: int = 50, row: str = "producing",
           lead: bool = True, cells=None, mask_cells=None, progress: bool = True, png: bool = True) -> RetrievalResult:
    """Score every head on the NIAH grid, then (``mask``) run the top-K vs random-K masking.

    Random heads are drawn outside the ``exclude_top`` best heads (default 2*k) with each seed.
    ``out``: folder for per-sample files (resume) and the saved result. ``cells``/``mask_cells``:
    explicit ``(needle name, length, depth)`` lists instead of the full grid (a reduced design).
    ``png``: also write PNG figures when kaleido works (slow: it starts a browser); HTML always.

    >>> from probe import load_model
    >>> r = detect(load_model("tiny-llama"), cells=[("code", 220, 50)], k=2, mask=False, max_new_tokens=3,
    ...            progress=False)
    >>> r.scores.shape, len(r.samples), r.masking.empty      # [layer, head]; one sample; no masking run
    ((2, 4), 1, True)
    """
    ns = as_needles(needles)
    by_name = {n.name: n for n in load_needles()} | {n.name: n for n in ns}
    cells = [(by_name[n], int(L), float(d)) for n, L, d in cells] if cells else grid(ns, lengths, depths)
    opts = {"max_new_tokens": max_new_tokens, "lead": lead}
    recs = scan_samples(model, cells, out, progress=progress, row=row, **opts)
    per = [torch.tensor(r["events"], dtype=torch.float64, device="cpu") for r in recs]
    scores, _ = head_scores(per, [r["success"] for r in recs])
    top = top_heads(scores, k)
    conds = {"top": top}
    masking = pd.DataFrame()
    if mask:
        excl = set(top_heads(scores, exclude_top or min(2 * k, scores.numel() - k)))
        conds |= {f"random{s}": pick_random(model, top, k, s, excl) for s in seeds}
        mcells = ([(by_name[n], int(L), float(d)) for n, L, d in mask_cells] if mask_cells
                  else grid(ns, mask_lengths or lengths, depths))
        masking = pd.DataFrame(scan_masking(model, mcells, conds, out, progress=progress, **opts))
    drop = ("events", "span_mass", "settings")
    samples = pd.DataFrame([{k_: v for k_, v in r.items() if k_ not in drop} | {"new_ids": r.get("new_ids")}
                            for r in recs])
    res = RetrievalResult(model.model_id, scores.numpy(), model.n_kv_heads, threshold, samples, masking,
                          tuple(repr(h) for h in top), {c: [repr(h) for h in hs] for c, hs in conds.items() if c != "top"},
                          {"k": k, "seeds": list(seeds), "row": row, "lengths": [int(x) for x in lengths],
                           "depths": [float(x) for x in depths], "needles": [n.name for n in ns],
                           "mask_lengths": [int(x) for x in (mask_lengths or lengths)],
                           "weights_hash": model.weights_hash})
    if out:
        save_all(res, Path(out), png=png)
    return res


def save_all(res: RetrievalResult, out: Path, png: bool = True) -> None:
    """Parquet + JSON summary + figures (HTML; PNG too where kaleido works offline) of a result."""
    res.save(out)
    figs = {"heads": res.plot("heads"), "grouped": res.plot("grouped"), "niah_none": res.plot("niah")}
    if len(res.masking):
        figs |= {"niah_top": res.plot("niah", condition="top"), "niah_random": res.plot("niah", condition="random"),
                 "masking": res.plot("masking")}
    names = []
    for name, fig in figs.items():
        write_figure(fig, out / f"{name}.html")  # atomic; plotly.min.js once, beside them: offline
        names.append(f"{name}.html")
        names += _png(fig, out / f"{name}.png") if png else []
    write_json(out / "figures.json", sorted(names))


def _png(fig, path: Path) -> list[str]:
    """Write a PNG if kaleido is installed and works (it is optional); never fails the scan."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return []
    try:
        write_figure(fig, path)
        return [path.name]
    except Exception:  # kaleido needs a browser it may not find offline: HTML is the figure of record
        return []


__all__ = ["detect", "RetrievalResult", "build_prompt", "sample_events", "head_scores", "add_cli"]


def add_cli(subparsers) -> None:
    from .cli import add_cli as _add

    _add(subparsers)
