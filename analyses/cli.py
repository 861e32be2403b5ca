"""The ``headwise`` command line, generated from the registry.

``headwise scan <analysis>`` exists for every registered analysis, with one flag per field of its
config (typed, with the default in ``--help``), the shared model group (``--model --device --dtype
--threads``, and ``--device-map --max-memory --offload-folder`` to split a model over devices) and
``--out``; the run resumes when repeated with the same ``--out``. ``--workers N`` / ``--ray-address``
run the units on Ray (:mod:`analyses.distributed`).
``headwise models``, ``prepare``, ``capture``, ``stats``, ``generate`` and ``dashboard`` are the
commands around them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from probe.errors import HeadwiseError

from . import registry
from .config import add_arguments, from_args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run is None:
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


def model_args(parser: argparse.ArgumentParser, out: str | None = None, out_required: bool = True) -> None:
    """The shared group every command that loads a model takes (and ``--out`` where it writes)."""
    g = parser.add_argument_group("model and output")
    g.add_argument("--model", default=None, help="a named model (headwise models), a local HF folder or a hub id")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="split the layers with accelerate: auto, balanced, sequential, or a JSON {module: device} "
                        "(inline or a file); devices 0, cuda:1, cpu, disk")
    g.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="per-device limits for --device-map, e.g. 0=20GiB,cpu=64GiB")
    g.add_argument("--offload-folder", default=None, metavar="DIR", help="where --device-map puts layers sent to disk")
    if out is not None:
        g.add_argument("--out", required=out_required, default=None, help=out)


def load(args):
    """The model the shared flags name (the one loader of every command)."""
    import torch

    from probe import DEFAULT_MODEL, load_model

    if args.threads:
        if args.threads < 1:
            raise HeadwiseError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load_model(args.model or DEFAULT_MODEL, **load_options(args))


def load_options(args) -> dict:
    """``load_model`` keywords from the shared flags (also what a distributed worker loads with)."""
    from probe.models.placement import parse_device_map, parse_max_memory

    return dict(device=args.device, dtype=args.dtype, device_map=parse_device_map(args.device_map),
                max_memory=parse_max_memory(args.max_memory), offload_folder=args.offload_folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwise", description="A workbench for attention heads.")
    p.set_defaults(run=None)
    sub = p.add_subparsers(title="commands")

    s = sub.add_parser("models", help="list the named models (the default first)")
    s.set_defaults(run=_models)

    s = sub.add_parser("prepare", help="convert the embedded model into the cache (done once by setup)")
    s.set_defaults(run=_prepare)

    s = sub.add_parser("capture", help="capture full patterns of a short text into an AttentionRecord")
    s.add_argument("--text", required=True)
    s.add_argument("--layers", type=_ints, default=None, help="comma-separated layers (default all)")
    s.add_argument("--heads", type=_ints, default=None, help="comma-separated heads (default all)")
    model_args(s, "the record file to write (.safetensors)")
    s.set_defaults(run=_capture)

    s = sub.add_parser("stats", help="streaming per-head statistics of a (long) text into a HeadStats file")
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("--text")
    group.add_argument("--file", help="read the text from this file")
    model_args(s, "the statistics file to write (.safetensors)")
    s.set_defaults(run=_stats)

    s = sub.add_parser("dashboard", help="serve the dashboard on localhost")
    s.add_argument("--port", type=int, default=8501)
    s.add_argument("--address", default="localhost")
    s.add_argument("--model", default=None, help="model selected at start (default: the embedded one)")
    s.add_argument("--results", default=None, help="results folder the pages open (default: ./results)")
    s.set_defaults(run=_dashboard)

    scan = sub.add_parser("scan", help="run an analysis (rerun with the same --out to resume)")
    names = scan.add_subparsers(title="analyses")
    for analysis in registry.analyses():
        scan_parser(names, analysis.name, analysis, help=f"{analysis.title} ({analysis.paper.split(',')[0]})")
    scan_parser(sub, "calibrate", registry.get("sinks"), help="alias of `headwise scan sinks` (ACT: writes calib.json)")
    _generate_parser(sub)
    return p


def scan_parser(sub, command: str, analysis, help: str) -> argparse.ArgumentParser:
    """``command``: run ``analysis`` with its config's flags and the shared group."""
    s = sub.add_parser(command, help=help, description=f"{analysis.description} {analysis.citation()}.")
    add_arguments(s.add_argument_group(f"{analysis.name} settings"), analysis.config)
    model_args(s, "results folder (rerun with the same folder to resume)")
    s.add_argument("--png", action=argparse.BooleanOptionalAction, default=False,
                   help="also write PNG figures (needs kaleido and a Chromium; slow)")
    d = s.add_argument_group("distributed (Ray: pip install 'headwise[distributed]')")
    d.add_argument("--workers", type=int, default=None, metavar="N",
                   help="compute the units on N Ray workers, each loading the model once (a local cluster on "
                        "127.0.0.1 unless --ray-address)")
    d.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join a running Ray cluster (host:port or auto); --out must be on a filesystem the "
                        "driver writes (workers only compute)")
    d.add_argument("--worker-gpus", type=float, default=0.0, metavar="G", help="GPUs each Ray worker reserves")
    d.add_argument("--retries", type=int, default=1,
                   help="retries of a unit whose worker died (then it is left for the rerun)")
    s.set_defaults(run=lambda args: _scan(args, analysis))
    return s


def executor_for(args):
    """The executor the scan flags ask for: serial, or Ray workers (checked before the model loads)."""
    if args.workers is None and args.ray_address is None:
        return None
    from probe import DEFAULT_MODEL

    from .distributed import ModelRecipe, RayExecutor

    recipe = ModelRecipe(args.model or DEFAULT_MODEL, load_options(args), threads=args.threads or 1)
    return RayExecutor(recipe, args.workers, address=args.ray_address, retries=args.retries,
                       gpus_per_worker=args.worker_gpus)


def _generate_parser(sub) -> None:
    from .generate import command

    g = sub.add_parser("generate", help="greedy generation, with an ACT calibration (--calibration) "
                                        "and/or Lookback Lens guided decoding (--guided)")
    g.add_argument("prompt")
    g.add_argument("--calibration", default=None, help="calib.json from `headwise scan sinks` (ACT)")
    g.add_argument("--guided", default=None, help="detector.json from `headwise scan grounding`")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (greedy only)")
    g.add_argument("--candidates", type=int, default=8, help="sampled chunks per step (guided)")
    g.add_argument("--chunk", type=int, default=8, help="tokens per chunk (guided)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (guided)")
    g.add_argument("--html", default=None, help="write the token view coloured by grounding here (needs --guided)")
    model_args(g, "also write the generated text to this file", out_required=False)
    g.set_defaults(run=lambda args: command(args, load))


def _scan(args, analysis) -> int:
    from .runner import run

    config = from_args(analysis.config, args)        # bad flags fail before the model loads
    executor = executor_for(args)
    try:
        result = run(analysis, load(args), config, store=args.out, png=args.png, executor=executor)
    finally:
        if executor is not None:
            executor.close()
    print(f"wrote {args.out}")
    for stat in result.summary().values():
        note = stat.help()
        print(f"  {stat.label}: {stat.text()}" + (f" ({note})" if note else ""))
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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

    rec = capture(load(args), args.text, layers=args.layers, heads=args.heads)
    rec.save(args.out)
    print(f"wrote {args.out}: patterns {list(rec.patterns.shape)} for {len(rec.token_ids)} tokens")
    return 0


def _stats(args) -> int:
    from probe import stream_stats

    text = args.text if args.text is not None else Path(args.file).read_text()
    st = stream_stats(load(args), text)
    st.save(args.out)
    print(f"wrote {args.out}: {len(st.layers)} layers x {st.entropy.shape[1]} heads x {st.entropy.shape[2]} rows")
    return 0


def _dashboard(args) -> int:
    import importlib.util

    app = Path(importlib.util.find_spec("dashboards").origin).parent / "app.py"   # located, not imported
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    env = dict(os.environ)
    if args.model:
        env["HEADWISE_DASHBOARD_MODEL"] = args.model
    if args.results:
        env["HEADWISE_RESULTS"] = str(Path(args.results).resolve())
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
