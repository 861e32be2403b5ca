"""Lookback-Lens-guided generation for ``headwise generate --guided``, with a token view coloured by grounding.

The context is the prompt up to its last line (the last line is the response header, e.g. ``A:``);
a one-line prompt keeps all but its last token as context. With ``--guided detector.json`` each
chunk of 8 tokens is the best of 8 samples by the detector (Chuang et al. 2024, §4); the token
view shows the detector's P(grounded) on each generated token's own row of lookback ratios.
"""
from __future__ import annotations

from probe.atomic import write_text

from .data import text_regions
from .detector import Detector
from .mitigate import guided_generate
from .result import token_scores, token_view_html


def guided_cli(model, det: Detector, args) -> int:
    """The ``--guided`` branch of ``headwise generate`` (:mod:`analyses.generate`)."""
    ids, reg = text_regions(model, args.prompt, reading=det.meta.get("reading", "code"))
    out = guided_generate(model, ids, det, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=args.max_new_tokens,
                          chunk=args.chunk, n_candidates=args.candidates, seed=args.seed,
                          reading=det.meta.get("reading", "code"))
    print(out.text)
    print(f"chunk scores (P grounded): {[round(s, 3) for s in out.chunk_scores]}")
    if args.html:
        toks = [model.tokenizer.decode([t]) for t in out.new_ids]
        write_text(args.html, token_view_html(toks, token_scores(det, out.row_lr), args.prompt))  # atomic
        print(f"token view: {args.html}")
    return 0
