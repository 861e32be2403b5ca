"""``headwise generate``: greedy or Lookback-Lens-guided generation with a token view coloured by grounding.

The context is the prompt up to its last line (the last line is the response header, e.g. ``A:``);
a one-line prompt keeps all but its last token as context. With ``--guided detector.json`` each
chunk of 8 tokens is the best of 8 samples by the detector (Chuang et al. 2024, §4); the token
view shows the detector's P(grounded) on each generated token's own row of lookback ratios.
"""
from __future__ import annotations

from pathlib import Path

from .data import text_regions
from .detector import Detector
from .mitigate import guided_generate
from .result import token_scores, token_view_html


def add_cli(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate (greedy, or Lookback Lens guided with --guided)")
    g.add_argument("--model", default=None)
    g.add_argument("--guided", default=None, help="detector.json from `headwise scan grounding`")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--candidates", type=int, default=8, help="sampled chunks per step (guided)")
    g.add_argument("--chunk", type=int, default=8, help="tokens per chunk (guided)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--html", default=None, help="write the token view coloured by grounding here (needs --guided)")
    g.add_argument("prompt")
    g.set_defaults(run=_cli_generate)


def _cli_generate(args) -> int:
    from probe.errors import InputError
    from probe.streaming import generate_with_stats

    from .run import _load

    if args.html and not args.guided:
        raise InputError("--html colours tokens by a detector: give --guided detector.json too")
    det = Detector.load(args.guided) if args.guided else None
    model = _load(args.model)
    if det is None:
        gen = generate_with_stats(model, args.prompt, max_new_tokens=args.max_new_tokens, stop_at_newline=True)
        print(model.tokenizer.decode(gen.new_ids[0]))
        return 0
    ids, reg = text_regions(model, args.prompt, reading=det.meta.get("reading", "code"))
    out = guided_generate(model, ids, det, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=args.max_new_tokens,
                          chunk=args.chunk, n_candidates=args.candidates, seed=args.seed,
                          reading=det.meta.get("reading", "code"))
    print(out.text)
    print(f"chunk scores (P grounded): {[round(s, 3) for s in out.chunk_scores]}")
    if args.html:
        toks = [model.tokenizer.decode([t]) for t in out.new_ids]
        Path(args.html).write_text(token_view_html(toks, token_scores(det, out.row_lr), args.prompt))
        print(f"token view: {args.html}")
    return 0
