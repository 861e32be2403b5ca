"""``headwise scan similarity --model M --out DIR``: similarity, echo costs, sharing plan, figures."""
from __future__ import annotations

from pathlib import Path


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("similarity", help="attention similarity across layers/heads and echo (sharing) cost")
    s.add_argument("--model", default=None)
    s.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    s.add_argument("--prompts", default="prompts", help="text set name in data/similarity or a file path")
    s.add_argument("--heldout", default="heldout", help="held-out text set for the echo loss")
    s.add_argument("--n-prompts", type=int, default=None, help="use only the first N prompts")
    s.add_argument("--n-heldout", type=int, default=None, help="use only the first N held-out texts")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--window", type=int, default=64, help="query rows per pass (memory O(L*H*window*T))")
    s.add_argument("--head-js", choices=("adjacent", "all", "none"), default="adjacent")
    s.add_argument("--variants", default="same,matched,random")
    s.add_argument("--clusters", type=int, default=8)
    s.add_argument("--budget", type=float, default=0.1, help="loss budget of the sharing plan (nats/token)")
    s.add_argument("--plan-variant", default="matched", choices=("same", "matched", "random"))
    s.add_argument("--max-trials", type=int, default=10)
    s.set_defaults(run=run)


def run(args) -> int:
    from probe import DEFAULT_MODEL, load_model

    from .data import load_texts
    from .scan import similarity_scan

    model = load_model(args.model or DEFAULT_MODEL)
    prompts = load_texts(args.prompts)[:args.n_prompts]
    heldout = load_texts(args.heldout)[:args.n_heldout]
    r = similarity_scan(model, prompts, heldout, max_tokens=args.max_tokens, window=args.window,
                        head_js=args.head_js, variants=tuple(v for v in args.variants.split(",") if v),
                        n_clusters=args.clusters, budget=args.budget, plan_variant=args.plan_variant,
                        max_trials=args.max_trials, work_dir=args.out)
    out = r.save(args.out)
    _write_figures(r, Path(out) / "figures.html")
    s = r.summary()
    print(f"wrote {out}: adjacent layer cosine first {s['first_pair_cos']:.3f}, inner mean "
          f"{s['inner_pairs_mean_cos']:.3f}, last {s['last_pair_cos']:.3f}")
    for k, c in s["spearman"].items():
        print(f"  spearman {k}: rho {c['rho']:+.3f} (p {c['p']:.3g}, n {c['n']})")
    print(f"  plan ({s['plan_variant']}, budget {s['plan_budget']}): {s['plan_blocks']} "
          f"shares {s['plan_shared_layers']} layers, measured loss +{s['plan_cost']:.4f}")
    return 0


def _write_figures(r, path: Path) -> None:
    """All four figures in one self-contained HTML file (plotly.js embedded once; works offline)."""
    from probe.atomic import atomic_path

    parts = [r.plot(k).to_html(full_html=False, include_plotlyjs=(i == 0))
             for i, k in enumerate(("layers", "heads", "clusters", "echo"))]
    with atomic_path(path) as tmp:
        tmp.write_text("<html><head><meta charset='utf-8'></head><body>" + "".join(parts) + "</body></html>")
