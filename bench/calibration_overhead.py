"""Benchmark: ACT-calibrated vs plain forward and generation time (issue 5; target: forward <= 1.3x at 2048).

Prints JSON. For each prompt length: best-of-``--repeats`` wall time (plain and calibrated interleaved)
of a plain forward (SDPA) and a calibrated forward (the engine's SinkCalibration on the calibrated heads,
other heads SDPA); the same calibrated forward with every layer forced through the eager engine (the
path before the subset fast path, for reference); greedy generation of ``--new`` tokens plain vs
calibrated (``hf.generate``).

    PYTHONPATH=$PWD python bench/calibration_overhead.py [--calibration calib.json] [--lengths 512,2048]
    PYTHONPATH=$PWD python bench/calibration_overhead.py --quick     # 64 tokens, 2 heads: the suite's smoke test

It also reports how far the calibrated logits moved from the plain ones (``logits_max_abs_change``): a
calibration that changed nothing would time a no-op.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from contextlib import contextmanager

import torch

from probe import HeadId, apply, load_model, runtime


def _pair(model, spec, fn, repeats: int) -> tuple[float, float]:
    """(plain, calibrated) best-of-``repeats`` times of ``fn``, measured back to back."""
    plain = _best(fn, repeats)
    handle = apply(model, spec)
    try:
        return plain, _best(fn, repeats)
    finally:
        handle.remove()


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@contextmanager
def _all_layers_eager():
    orig = runtime.Engine._unobserved
    runtime.Engine._unobserved = lambda self, layer, decoding, plan: False
    try:
        yield
    finally:
        runtime.Engine._unobserved = orig


def _change(model, spec, ids: torch.Tensor) -> float:
    """Largest change of any logit when the calibration is applied (all positions)."""
    plain = model.hf(ids, use_cache=False).logits
    handle = apply(model, spec)
    try:
        return float((model.hf(ids, use_cache=False).logits - plain).abs().max())
    finally:
        handle.remove()


def _ids(model, n: int) -> torch.Tensor:
    from analyses.data import data_path

    text = "\n".join(p.read_text() for p in sorted(data_path("sinks").glob("*.txt")))
    ids = model.tokenizer(text * (1 + 4 * n // max(len(text) // 4, 1)), return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n, "not enough text for the requested length"
    return ids.to(model.device)


def _spec(model, args):
    from analyses.sinks import Calibration, load_calibration

    if args.calibration:
        return load_calibration(args.calibration)
    cands = [HeadId(l, h) for l in range(2, model.n_layers - 1) for h in range(model.n_heads)]
    heads = sorted(random.Random(0).sample(cands, args.heads))
    return Calibration.from_heads(model, heads)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default=None, help="calibration file (default: --heads random heads)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=16, help="tokens to generate")
    ap.add_argument("--no-eager-reference", action="store_true")
    ap.add_argument("--quick", action="store_true", help="64 tokens, 2 heads, one repeat (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats, args.new, args.heads = "64", 1, 4, 2     # the embedded model: real sinks
    m = load_model(args.model)
    calib = _spec(m, args)
    spec = calib.spec()
    out = {"model": m.model_id, "heads": [str(h) for h in calib.heads], "beta": calib.edit.beta, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "repeats": args.repeats, "lengths": {}}
    for n in (int(x) for x in args.lengths.split(",")):
        ids = _ids(m, n)
        fwd = lambda ids=ids: m.hf(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        gen = lambda ids=ids: m.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,  # noqa: E731
                                    min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        r = {}
        with torch.no_grad():
            fwd()
            pairs = [_pair(m, spec, fwd, 1) for _ in range(args.repeats)]  # interleaved: drift hits both
            r["forward_plain_s"] = min(p for p, _ in pairs)
            r["forward_calibrated_s"] = min(c for _, c in pairs)
            r["forward_ratio_median_of_pairs"] = sorted(c / p for p, c in pairs)[len(pairs) // 2]
            r["generate_plain_s"], r["generate_calibrated_s"] = _pair(m, spec, gen, 1)
            r["logits_max_abs_change"] = _change(m, spec, ids)
            if not args.no_eager_reference:
                handle = apply(m, spec)
                try:
                    with _all_layers_eager():
                        r["forward_calibrated_all_layers_eager_s"] = _best(fwd, 1)
                finally:
                    handle.remove()
        r["forward_ratio"] = r["forward_calibrated_s"] / r["forward_plain_s"]
        r["generate_ratio"] = r["generate_calibrated_s"] / r["generate_plain_s"]
        r["forward_target_1_3x_met"] = bool(r["forward_ratio"] <= 1.3) if n >= 2048 else None
        out["lengths"][str(n)] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
