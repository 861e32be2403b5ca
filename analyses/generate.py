"""``headwise generate``: generation with what the analyses found applied at inference.

One command for the training-free edits: ``--calibration calib.json`` applies the ACT sink
calibration found by ``headwise calibrate`` (:mod:`analyses.sinks`, Yu et al. 2024) to every
forward of ``generate``; ``--guided detector.json`` decodes with the Lookback Lens detector of
``headwise scan grounding`` (:mod:`analyses.grounding`, Chuang et al. 2024), best of
``--candidates`` sampled chunks, and ``--html`` writes the token view coloured by P(grounded).
Both may be combined: the calibration stays applied while guided decoding samples. Without
either, plain greedy decoding.
"""
from __future__ import annotations

import torch

from probe.checks import check_generation
from probe.errors import InputError


def add_cli(sub) -> None:
    g = sub.add_parser("generate", help="greedy generation, with an ACT calibration (--calibration) "
                                        "and/or Lookback Lens guided decoding (--guided)")
    g.add_argument("prompt")
    g.add_argument("--model", default=None)
    g.add_argument("--calibration", default=None, help="calib.json from `headwise calibrate` (ACT)")
    g.add_argument("--guided", default=None, help="detector.json from `headwise scan grounding`")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (greedy only)")
    g.add_argument("--candidates", type=int, default=8, help="sampled chunks per step (guided)")
    g.add_argument("--chunk", type=int, default=8, help="tokens per chunk (guided)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (guided)")
    g.add_argument("--html", default=None, help="write the token view coloured by grounding here (needs --guided)")
    g.set_defaults(run=_run)


def _check(args) -> None:
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if args.html and not args.guided:
        raise InputError("--html colours tokens by a detector: give --guided detector.json too")
    if args.chat and args.guided:
        raise InputError("--chat applies to greedy generation; a guided prompt keeps its own passage/question layout")


def _run(args) -> int:
    from probe import DEFAULT_MODEL, load_model

    from .grounding.detector import Detector
    from .grounding.generate import guided_cli
    from .sinks.calibration import apply_calibration, load_calibration

    _check(args)
    det = Detector.load(args.guided) if args.guided else None  # bad files fail before the model loads
    calib = load_calibration(args.calibration) if args.calibration else None
    model = load_model(args.model or DEFAULT_MODEL)
    handle = apply_calibration(model, calib) if calib is not None else None
    try:
        if det is not None:
            return guided_cli(model, det, args)
        _greedy(model, args)
    finally:
        if handle is not None:
            handle.remove()
    return 0


def _greedy(model, args) -> None:
    ids = model.encode(model.chat(args.prompt) if args.chat else args.prompt)
    check_generation(model, ids.shape[1], args.max_new_tokens)
    with torch.no_grad():
        out = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
    print(model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
