"""``headwise scan retrieval``: the NIAH retrieval-head scan from the command line."""
from __future__ import annotations

import argparse


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("retrieval", help="retrieval heads via needle-in-a-haystack (Wu et al. 2024)")
    s.add_argument("--model", default=None)
    s.add_argument("--lengths", type=_floats, default=None, help="context lengths in tokens, e.g. 500,1000,2000")
    s.add_argument("--depths", type=_floats, default=None, help="needle depths in percent, e.g. 0,25,50,75,100")
    s.add_argument("--needles", default=None, help="comma-separated needle names (default: all shipped)")
    s.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    s.add_argument("--threshold", type=float, default=0.1)
    s.add_argument("--k", type=int, default=10, help="number of heads masked (top-K and random-K)")
    s.add_argument("--seeds", type=_floats, default=[0, 1, 2], help="seeds of the random-K head sets")
    s.add_argument("--mask-lengths", type=_floats, default=None, help="lengths used for the masking runs")
    s.add_argument("--no-mask", action="store_true", help="skip the masking experiment")
    s.add_argument("--row", choices=["producing", "consuming"], default="producing",
                   help="attention row scored for the emitted token (reference: producing)")
    s.add_argument("--max-new-tokens", type=int, default=50)
    s.add_argument("--no-png", action="store_true", help="HTML figures only (PNG needs kaleido and is slow)")
    s.set_defaults(run=_run)


def _run(args) -> int:
    from analyses.cli import _model

    from . import DEFAULT_DEPTHS, DEFAULT_LENGTHS, detect

    res = detect(_model(args.model), lengths=[int(x) for x in (args.lengths or DEFAULT_LENGTHS)],
                 depths=args.depths or list(DEFAULT_DEPTHS),
                 needles=args.needles.split(",") if args.needles else None, out=args.out,
                 threshold=args.threshold, k=args.k, seeds=[int(x) for x in args.seeds], mask=not args.no_mask,
                 mask_lengths=[int(x) for x in args.mask_lengths] if args.mask_lengths else None,
                 max_new_tokens=args.max_new_tokens, row=args.row, png=not args.no_png)
    s = res.summary()
    print(f"wrote {args.out}: {s['n_success']}/{s['n_samples']} samples answered; "
          f"{s['fraction_above_threshold']:.1%} of heads > {res.threshold}; NIAH success {s['niah_success']}")
    if not s["n_success"]:
        print("note: no sample was answered, so every score is 0 and the top-K set is arbitrary; "
              "use lengths the model can handle or completion-style needles")
    print("top heads:", ", ".join(f"{h['head']}={h['score']:.3f}" for h in s["top_heads"][:10]))
    return 0
