"""The ``headwise`` command line, generated from the registry.

``headwise scan <analysis>`` exists for every registered analysis, with one flag per field of its
config (typed, with the default in ``--help``), the shared model group (``--model --device --dtype
--threads``, and ``--device-map --max-memory --offload-folder`` to split a model over devices) and
``--out``; the run resumes when repeated with the same ``--out``. ``--workers N`` / ``--ray-address``
run the units on Ray (:mod:`analyses.distributed`).
``headwise models``, ``prepare``, ``capture``, ``stats``, ``generate`` and ``dashboard`` are the
commands around them; an analysis may add its own (``Analysis.commands``, e.g. ``headwise head L3H1``).

Every number and path is checked before any model loads (the config fields' own checks, positive
counts, writable outputs, UTF-8 inputs). One handler turns what remains (a typed
:class:`~probe.errors.HeadwiseError`, an ``OSError``, any other failure) into a one-line error;
``--debug`` (anywhere on the line) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from probe.errors import HeadwiseError, InputError

from . import registry
from .config import add_arguments, from_args
from .store import check_output_folder
from .terminal import layer_bar, quiet_libraries


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:                 # a bad flag (usage printed): its status; --help still exits
        if not exc.code:
            raise
        return int(exc.code)
    if args.run is None:
        parser.print_help()
        return 2
    quiet_libraries()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("headwise: interrupted; finished work is saved, rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # the one top-level handler: a line, not a traceback (--debug: the traceback)
        if debug:
            raise
        print(f"headwise: error: {describe(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (HeadwiseError, OSError, UnicodeError)) else 1


def describe(exc: BaseException) -> str:
    """One line for an error: typed errors as they are, OS errors with the file, anything else named."""
    if isinstance(exc, HeadwiseError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}: check the path and its permissions"
    return (f"unexpected {type(exc).__name__}: {exc} (a bug in headwise: rerun with --debug for the "
            "traceback and report it)")


def whole(text: str, lo: int) -> int:
    """``text`` as a whole number >= ``lo`` (``200.9`` is refused, never rounded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
    if value < lo:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {value}")
    return value


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return whole(text, 1)


def natural(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return whole(text, 0)


def gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of GiB > 0, got {text!r}")
    return value


def check_output_file(path: str | None, flag: str = "--out", suffix: str | None = None) -> None:
    """An output file we can write, checked before any work (its folder is created if missing)."""
    if path is None:
        return
    if not str(path).strip():
        raise InputError(f"{flag} is empty: name the file to write")
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a folder: name a file{f' ending in {suffix}' if suffix else ''}")
    if suffix and p.suffix != suffix:
        raise InputError(f"{flag} {str(path)!r} must end in {suffix}")
    check_output_folder(p.parent, flag)


def model_args(parser: argparse.ArgumentParser, out: str | None = None, out_required: bool = True) -> None:
    """The shared group every command that loads a model takes (and ``--out`` where it writes)."""
    g = parser.add_argument_group("model and output")
    g.add_argument("--model", default=None, help="a named model (headwise models), a local HF folder or a hub id")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--threads", type=positive, default=None, help="torch CPU threads (1 is faster on a busy machine)")
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
    s.add_argument("--budget-gb", type=gigabytes, default=None,
                   help="memory allowed for the T x T patterns (default: 2 GiB)")
    model_args(s, "the record file to write (.safetensors)")
    s.set_defaults(run=_capture)

    s = sub.add_parser("stats", help="streaming per-head statistics of a (long) text into a HeadStats file")
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("--text")
    group.add_argument("--file", help="read the text from this file")
    s.add_argument("--output", choices=("model", "pass"), default="model",
                   help="attention output while measuring: 'model' keeps the model's own bit for bit; 'pass' builds "
                        "it from the statistics pass (faster on long texts, equal to float32 rounding)")
    model_args(s, "the statistics file to write (.safetensors)")
    s.set_defaults(run=_stats)

    s = sub.add_parser("dashboard", help="serve the dashboard on localhost")
    s.add_argument("--port", type=_port, default=8501)
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
    for analysis in registry.analyses():                  # commands the analyses add (e.g. `headwise head`)
        for command in analysis.commands:
            c = sub.add_parser(command.name, help=command.help, description=command.help)
            command.arguments(c)
            if command.loads_model:
                model_args(c)
            c.set_defaults(run=lambda args, command=command: command.run(args, load))
    return p


def scan_parser(sub, command: str, analysis, help: str) -> argparse.ArgumentParser:
    """``command``: run ``analysis`` with its config's flags and the shared group."""
    s = sub.add_parser(command, help=help, description=f"{analysis.description} {analysis.citation()}.")
    add_arguments(s.add_argument_group(f"{analysis.name} settings"), analysis.config)
    model_args(s, "results folder (rerun with the same folder to resume)")
    s.add_argument("--png", action=argparse.BooleanOptionalAction, default=False,
                   help="also write PNG figures (needs kaleido and a Chromium; slow)")
    s.add_argument("--force", action="store_true",
                   help="replace the result of another run (other model or settings) in --out; its units whose "
                        "settings still match are reused (default: such a folder is refused)")
    d = s.add_argument_group("distributed (Ray: pip install 'headwise[distributed]')")
    d.add_argument("--workers", type=positive, default=None, metavar="N",
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
    g.add_argument("--max-new-tokens", type=positive, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (greedy only)")
    g.add_argument("--candidates", type=positive, default=8, help="sampled chunks per step (guided)")
    g.add_argument("--chunk", type=positive, default=8, help="tokens per chunk (guided)")
    g.add_argument("--seed", type=natural, default=0, help="sampling seed (guided)")
    g.add_argument("--html", default=None, help="write the token view coloured by grounding here (needs --guided)")
    model_args(g, "also write the generated text to this file", out_required=False)
    g.set_defaults(run=lambda args: command(args, load))


def _scan(args, analysis) -> int:
    from .runner import run

    config = from_args(analysis.config, args)        # bad flags and an unusable --out fail before the model loads
    out = check_output_folder(args.out)
    executor = executor_for(args)
    try:
        result = run(analysis, load(args), config, store=out, png=args.png, force=args.force, executor=executor)
    finally:
        if executor is not None:
            executor.close()
    print(f"wrote {out}")
    for stat in result.summary().values():      # text() already shows the interval; add its n
        print(f"  {stat.label}: {stat.text()}" + (f" (n = {stat.n})" if stat.n is not None else ""))
    return 0


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def _port(text: str) -> int:
    value = positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


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
    from probe.memory import DEFAULT_CAPTURE_BUDGET

    check_output_file(args.out, suffix=".safetensors")
    budget = int(args.budget_gb * 2**30) if args.budget_gb else DEFAULT_CAPTURE_BUDGET
    model = load(args)
    with layer_bar(model, "capture", layers=args.layers):
        rec = capture(model, args.text, layers=args.layers, heads=args.heads, budget=budget)
    rec.save(args.out)
    print(f"wrote {args.out}: patterns {list(rec.patterns.shape)} for {len(rec.token_ids)} tokens")
    return 0


def _stats(args) -> int:
    from probe import stream_stats

    from .data import read_utf8

    text = args.text if args.text is not None else read_utf8(args.file, "--file")
    check_output_file(args.out, suffix=".safetensors")
    model = load(args)
    with layer_bar(model, "stats"):
        st = stream_stats(model, text, output=args.output)
    st.save(args.out)
    print(f"wrote {args.out}: {len(st.layers)} layers x {st.entropy.shape[1]} heads x {st.entropy.shape[2]} rows")
    return 0


def _dashboard(args) -> int:
    import importlib.util

    app = Path(importlib.util.find_spec("dashboards").origin).parent / "app.py"   # located, not imported
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.showErrorDetails", "none"]
    env = dict(os.environ)
    if args.model:
        env["HEADWISE_DASHBOARD_MODEL"] = args.model
    if args.results:
        results = Path(args.results).expanduser()
        if results.exists() and not results.is_dir():
            raise InputError(f"--results {args.results!r} is a file: name the folder your scans write into")
        env["HEADWISE_RESULTS"] = str(results.resolve())
    return serve(cmd, env)


def serve(cmd: list[str], env: dict) -> int:
    """Run the server as a child; SIGINT/SIGTERM/SIGHUP to us go to it, and we exit with it."""
    child = subprocess.Popen(cmd, env=env)
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in forwarded}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:              # a handler raised in the wait: keep waiting for the child
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - code if code < 0 else code         # killed by signal N: the shell's 128 + N


if __name__ == "__main__":
    sys.exit(main())
