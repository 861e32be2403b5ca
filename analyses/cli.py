"""The ``headwise`` command line.

``headwise models`` lists models; ``headwise capture`` writes an AttentionRecord;
``headwise stats`` writes streaming HeadStats for long inputs; ``headwise dashboard`` serves the
app on localhost; ``headwise scan <analysis>`` runs an analysis (each analysis module adds its
own subcommand through ``add_cli``).
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

from probe.errors import HeadwiseError

# Analysis modules that contribute a ``scan`` subcommand (each defines add_cli(subparsers)).
SCAN_MODULES: list[str] = ["analyses.retrieval", "analyses.circuits", "analyses.similarity", "analyses.grounding"]
# Modules that contribute top-level commands (e.g. calibrate, generate).
COMMAND_MODULES: list[str] = ["analyses.sinks", "analyses.generate"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (HeadwiseError, FileNotFoundError) as exc:
        print(f"headwise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headwise: interrupted; finished work is saved, rerun the same command to resume", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwise", description="A workbench for attention heads.")
    sub = p.add_subparsers(title="commands")

    s = sub.add_parser("models", help="list the named models (the default first)")
    s.set_defaults(run=_models)

    s = sub.add_parser("prepare", help="convert the embedded model into the cache (done once by setup)")
    s.set_defaults(run=_prepare)

    s = sub.add_parser("capture", help="capture full patterns of a short text into an AttentionRecord")
    s.add_argument("--model", default=None)
    s.add_argument("--text", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--layers", type=_ints, default=None, help="comma-separated layers (default all)")
    s.add_argument("--heads", type=_ints, default=None, help="comma-separated heads (default all)")
    s.set_defaults(run=_capture)

    s = sub.add_parser("stats", help="streaming per-head statistics of a (long) text into a HeadStats file")
    s.add_argument("--model", default=None)
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("--text")
    group.add_argument("--file", help="read the text from this file")
    s.add_argument("--out", required=True)
    s.set_defaults(run=_stats)

    s = sub.add_parser("dashboard", help="serve the dashboard on localhost")
    s.add_argument("--port", type=int, default=8501)
    s.add_argument("--address", default="localhost")
    s.set_defaults(run=_dashboard)

    scan = sub.add_parser("scan", help="run an analysis").add_subparsers(title="analyses")
    for name in SCAN_MODULES:
        importlib.import_module(name).add_cli(scan)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return p


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _model(name):
    from probe import DEFAULT_MODEL, load_model

    return load_model(name or DEFAULT_MODEL)


def _models(args) -> int:
    from probe import list_models

    for i, info in enumerate(list_models()):
        print(f"{info.name:14s} {info.description}{'  [default]' if i == 0 else ''}")
    print("(also: any local Hugging Face model folder, or a hub id such as org/name)")
    return 0


def _prepare(args) -> int:
    from probe.models import embedded

    print(f"embedded model ready in {embedded.embedded_dir()}")
    return 0


def _capture(args) -> int:
    from probe import capture

    rec = capture(_model(args.model), args.text, layers=args.layers, heads=args.heads)
    rec.save(args.out)
    print(f"wrote {args.out}: patterns {list(rec.patterns.shape)} for {len(rec.token_ids)} tokens")
    return 0


def _stats(args) -> int:
    from probe import stream_stats

    text = args.text if args.text is not None else Path(args.file).read_text()
    st = stream_stats(_model(args.model), text)
    st.save(args.out)
    print(f"wrote {args.out}: {len(st.layers)} layers x {st.entropy.shape[1]} heads x {st.entropy.shape[2]} rows")
    return 0


def _dashboard(args) -> int:
    app = Path(__file__).resolve().parent.parent / "dashboards" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
