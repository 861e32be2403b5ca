"""``headwise generate``: generation with what the analyses found applied at inference.

One command for the training-free edits: ``--calibration calib.json`` applies the ACT sink
calibration found by ``headwise scan sinks`` (:mod:`analyses.sinks`, Yu et al. 2024) to every
forward of ``generate``; ``--guided detector.json`` decodes with the Lookback Lens detector of
``headwise scan grounding`` (:mod:`analyses.grounding`, Chuang et al. 2024), best of
``--candidates`` sampled chunks, and ``--html`` writes the token view coloured by P(grounded).
Both may be combined: the calibration stays applied while guided decoding samples. Without
either, plain greedy decoding (:func:`generate_text`).

>>> from probe import load_model
>>> m = load_model("tiny-llama")
>>> len(generate_text(m, "abc", max_new_tokens=3)) > 0
True
"""
from __future__ import annotations

import sys

import torch

from probe.atomic import write_text
from probe.checks import check_generation
from probe.errors import InputError


def generate_text(model, prompt: str, *, max_new_tokens: int = 32, chat: bool = False) -> str:
    """Greedy continuation of ``prompt`` through Hugging Face ``generate`` (applied edits act on every step)."""
    ids = model.encode(model.chat(prompt) if chat else prompt)
    check_generation(model, ids.shape[1], max_new_tokens)  # before any work
    with torch.no_grad():
        out = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
    return model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def check(args) -> None:
    """Option combinations and outputs that cannot work, refused before the model loads."""
    from .cli import check_output_file

    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if not args.prompt.strip():
        raise InputError("the prompt is empty: give the text to continue")
    check_output_file(args.out)
    check_output_file(args.html, "--html", suffix=".html")
    if args.html and not args.guided:
        raise InputError("--html colours tokens by a detector: give --guided detector.json too")
    if args.chat and args.guided:
        raise InputError("--chat applies to greedy generation; a guided prompt keeps its own passage/question layout")


def command(args, model_loader) -> int:
    """The body of ``headwise generate`` (``model_loader(args)`` gives the model of the shared flags)."""
    from .grounding import Detector, guided_view, token_view_html
    from .sinks import apply_calibration, load_calibration

    check(args)
    det = Detector.load(args.guided) if args.guided else None  # bad files fail before the model loads
    calib = load_calibration(args.calibration) if args.calibration else None
    if calib is not None and not calib.heads:
        print(f"headwise: warning: {args.calibration} keeps no heads (its search found none that help "
              f"{calib.task or 'the task'}): the generation is the plain model's. Rerun the search with "
              "`headwise scan sinks --selection gold_logprob --out DIR` for a calibration with heads.", file=sys.stderr)
    model = model_loader(args)
    if det is not None:
        det.check_model(model, required=True)       # a detector of other weights: refused, naming both models
    handle = apply_calibration(model, calib) if calib is not None else None
    try:
        if det is None:
            text = generate_text(model, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat)
        else:
            out, toks, scores = guided_view(model, det, args.prompt, max_new_tokens=args.max_new_tokens,
                                            chunk=args.chunk, n_candidates=args.candidates, seed=args.seed)
            text = out.text
            print(f"chunk scores (P grounded): {[round(s, 3) for s in out.chunk_scores]}")
            if args.html:
                write_text(args.html, token_view_html(toks, scores, args.prompt))
                print(f"token view: {args.html}")
    finally:
        if handle is not None:
            handle.remove()
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0
