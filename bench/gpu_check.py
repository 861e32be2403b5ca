"""GPU check: every analysis entry point and the family matrix on CUDA in bf16 and fp16 vs CPU fp32; prints JSON.

For the day a GPU is lent (issue 15 item 5). Each check loads the same seeded tiny model twice, as
the reference (CPU, float32) and under test (``--device``, each of ``--dtypes``), runs the same thing on
both and reports the largest difference per quantity against a stated tolerance:

  quantity   compared                                         bf16    fp16
  prob       patterns, group masses, max_prob, lookback ratios 0.06    0.01   (absolute)
  entropy    row entropy (nats)                                0.15    0.03   (absolute)
  logit      logits / std of the fp32 logits                   0.25    0.04   (relative)
  nats       log-probabilities, logit differences, losses      0.30    0.05   (absolute)
  cos        layer cosine similarity                           0.03    0.005  (absolute)

bf16 keeps 8 bits of mantissa (fp16 11): on the tiny test models, whose weights are drawn large so
windows, softcaps and sinks matter, the model's *own* eager attention in bf16 is off from fp32 by up to
two thirds of these bounds (reported beside each family as ``hf_eager``: the same comparison without headwise).
Every statistic an analysis returns must be float32 or float64 whatever the model's dtype (``dtypes``).

Family matrix (every supported family of ``probe.models.tiny.tiny_family``): idle logits, streaming statistics
(prefill), captured patterns (engine observer), a zero-ablation, and decode-row statistics while the
greedy tokens agree. Analyses (llama, mistral, gemma2, gpt2, gpt_oss by default): retrieval decode
statistics, the ACT search, exact patching and EAP, layer similarity and loss, grounding lookback ratios.
On CUDA the fused Triton kernels run where they apply, so this also checks them against CPU eager.
The accelerate slot (issue 17: layers split by ``load_model(device_map=...)`` over cuda:0 and cpu; with
``--smoke``, over cpu and disk offload) compares logits, an intervention, a rerun from a layer, streaming
and decode statistics, patterns and two analysis entry points with the float32 bounds of ``TOL``.

Usage: python bench/gpu_check.py [--dtypes bf16 fp16] [--families ...] [--analyses-families ...]
       python bench/gpu_check.py --smoke    # CPU, bf16, one family: what the test suite runs
Exit status 1 if any check fails. Without CUDA (and without --smoke) it prints {"cuda": false} and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "bfloat16": "bfloat16", "float16": "float16"}
TOL = {"bfloat16": {"prob": 0.06, "entropy": 0.15, "logit": 0.25, "nats": 0.30, "cos": 0.03},
       "float16": {"prob": 0.01, "entropy": 0.03, "logit": 0.04, "nats": 0.05, "cos": 0.005},
       "float32": {"prob": 1e-4, "entropy": 1e-4, "logit": 1e-4, "nats": 1e-4, "cos": 1e-5}}  # the accelerate split
FLOAT32 = ("float32", "float64")
ANALYSES_FAMILIES = ("llama", "mistral", "gemma2", "gpt2", "gpt_oss")


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    ap.add_argument("--families", nargs="+", default=None, help="family matrix (default: every tiny family)")
    ap.add_argument("--analyses-families", nargs="+", default=list(ANALYSES_FAMILIES))
    ap.add_argument("--smoke", action="store_true", help="CPU, bf16, the llama family only (the suite's smoke run)")
    return ap.parse_args(argv)


class Zoo:
    """Tiny family models saved once to a temporary folder and loaded per (family, device, dtype)."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def folder(self, name: str) -> Path:
        from transformers.utils import logging as hf_logging

        from probe.models.tiny import save_family  # the tests' builder: one function

        hf_logging.disable_progress_bar()
        return save_family(name, self.root / name)

    def get(self, name: str, device: str = "cpu", dtype: str = "float32"):
        from probe import load_model

        key = (name, device, dtype)
        if key not in self.cache:
            self.cache[key] = load_model(str(self.folder(name)), device=device, dtype=dtype)
        return self.cache[key]


def _diff(a, b) -> float:
    a, b = (x if torch.is_tensor(x) else torch.tensor(np.asarray(x, dtype=np.float64)) for x in (a, b))
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def _dtype(x) -> str:
    if isinstance(x, float):
        return "float64"  # a Python float
    return str(x.dtype).replace("torch.", "") if hasattr(x, "dtype") else type(x).__name__


def _report(check: str, dtype: str, diffs: dict[str, tuple[str, float]], outputs: dict | None = None, **extra) -> dict:
    """One JSON row: per quantity its largest difference, the tolerance of its kind, and pass/fail.

    ``outputs``: what the run under test returned, by name; their dtypes must be float32/float64.
    """
    tol = TOL[dtype]
    rows = {q: {"max_diff": d, "kind": kind, "tol": tol[kind], "ok": bool(d <= tol[kind])} for q, (kind, d) in diffs.items()}
    dtypes = {k: _dtype(v) for k, v in (outputs or {}).items()}
    ok = all(r["ok"] for r in rows.values()) and all(d in FLOAT32 for d in dtypes.values())
    return {"check": check, "dtype": dtype, "ok": ok, "quantities": rows, "dtypes": dtypes, **extra}


def _guarded(check: str, dtype: str, fn) -> dict:
    try:
        return fn()
    except Exception as exc:  # a check that crashes is a failed check, reported with its error
        return {"check": check, "dtype": dtype, "ok": False, "error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- the family matrix

def _ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _family_run(m, ids):
    from probe import InterventionSpec, KeyGroup, ZeroAblate, capture, generate_with_stats, intervene, stream_stats

    ids = ids.to(m.device)
    with torch.no_grad():
        logits = m.hf(ids).logits.float()
        with intervene(m, InterventionSpec([ZeroAblate(heads=["L1H0"])])):
            ablated = m.hf(ids).logits.float()
    st = stream_stats(m, ids, groups=[KeyGroup("first", 0, 1)], verbose=False)
    pats = capture(m, ids, source="observer").patterns
    gen = generate_with_stats(m, ids, max_new_tokens=4, groups=[KeyGroup("first", 0, 1)])
    return {"logits": logits, "ablated": ablated, "stats": st, "patterns": pats, "gen": gen}


def _hf_eager(m, ids) -> torch.Tensor:
    """The model's own logits with HF eager attention (headwise out of the way), float32."""
    from probe import install

    m.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return m.hf(ids.to(m.device)).logits.float()
    finally:
        install(m.hf)


def family_check(zoo: Zoo, name: str, device: str, dtype: str) -> dict:
    ref_m, m = zoo.get(name), zoo.get(name, device, dtype)
    ref, got = _family_run(ref_m, _ids()), _family_run(m, _ids())
    scale = float(ref["logits"].std())
    hf_own = _diff(_hf_eager(ref_m, _ids()), _hf_eager(m, _ids())) / scale
    same = 0  # decode rows are comparable while the greedy tokens agree
    for a, b in zip(ref["gen"].new_ids[0].tolist(), got["gen"].new_ids[0].tolist()):
        if a != b:
            break
        same += 1
    rows = slice(0, max(1, same))
    sr, sg = ref["stats"], got["stats"]
    dr, dg = ref["gen"].stats, got["gen"].stats
    return _report(f"family/{name}", dtype, {
        "logits": ("logit", _diff(ref["logits"], got["logits"]) / scale),
        "ablated_logits": ("logit", _diff(ref["ablated"], got["ablated"]) / scale),
        "prefill_entropy": ("entropy", _diff(sr.entropy, sg.entropy)),
        "prefill_max_prob": ("prob", _diff(sr.max_prob, sg.max_prob)),
        "prefill_mass_first": ("prob", _diff(sr.mass("first"), sg.mass("first"))),
        "patterns": ("prob", _diff(ref["patterns"], got["patterns"])),
        "decode_mass_first": ("prob", _diff(dr.mass("first")[..., rows], dg.mass("first")[..., rows])),
    }, {"entropy": sg.entropy, "group_mass": sg.group_mass, "patterns": got["patterns"], "decode_mass": dg.group_mass},
        decode_rows_compared=max(1, same), hf_eager={"logits": hf_own})


# ----------------------------------------------------------------------------- the analyses' entry points

def _retrieval(m):
    from analyses.retrieval.decode import decode, prefill
    from analyses.retrieval.harness import build_prompt, load_needles

    needle = next(n for n in load_needles() if n.name == "code")
    p = build_prompt(m, needle, 200, 50, max_new_tokens=2)
    _, st = decode(m, p.ids, prefill(m, p.ids), max_new_tokens=2, span=(p.start, p.stop))
    return st.mass("answer")[..., 0]


def _sinks(m):
    from analyses import run
    from analyses.sinks import SINKS, SinksConfig

    cfg = SinksConfig(limit=4, first_layer=1, last_layer=1, n_random=0, n_profile=1)
    search = run(SINKS, m, cfg, progress=False).search
    return np.array([search.baseline["gold_logprob"]] + [r["gold_logprob"] for r in search.candidates])


def _circuits(m):
    from analyses.circuits import run_task

    r = run_task(m, "induction", n=2, ig_steps=1, frac=0.25)
    return r.ld_clean, r.effects["exact"], r.effects["eap"]


def _similarity(m, folder: Path):
    from analyses import run
    from analyses.similarity import SIMILARITY, SimilarityConfig

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("The cat sat on the mat, and then it slept.")
    (folder / "heldout.txt").write_text("A dog ran in the park.")
    cfg = SimilarityConfig(prompts=str(folder / "prompts.txt"), heldout=str(folder / "heldout.txt"),
                           variants=("same",), max_trials=1, max_tokens=24, window=8)
    r = run(SIMILARITY, m, cfg, progress=False)
    return r.layer_cos, r.baseline_loss


def _grounding(m, folder: Path):
    from analyses.grounding import GROUNDING, GroundingConfig
    from analyses.runner import run_stage
    from analyses.units import UnitStore

    cfg = GroundingConfig(limit=1, max_new_tokens=1)          # the items stage: answers and lookback ratios
    df = run_stage(GROUNDING, GROUNDING.stage("items"), m, cfg, None, UnitStore(folder))["df"]
    return np.asarray(df.row_lr[0])


def analyses_check(zoo: Zoo, name: str, device: str, dtype: str, work: Path) -> list[dict]:
    ref, m = zoo.get(name), zoo.get(name, device, dtype)
    def pair(fn):
        return fn(ref), fn(m)

    def retrieval():
        a, x = pair(_retrieval)
        return _report(f"retrieval/{name}", dtype, {"span_mass": ("prob", _diff(a, x))}, {"span_mass": x})

    def sinks():
        a, x = pair(_sinks)
        return _report(f"sinks/{name}", dtype, {"gold_logprob": ("nats", _diff(a, x))}, {"gold_logprob": x})

    def circuits():
        (a, b, c), (x, y, z) = pair(_circuits)
        return _report(f"circuits/{name}", dtype, {"ld_clean": ("nats", _diff(a, x)), "exact": ("nats", _diff(b, y)),
                                                   "eap": ("nats", _diff(c, z))}, {"ld_clean": x, "exact": y, "eap": z})

    def similarity():
        (a, b), (x, y) = _similarity(ref, work / f"{name}-texts"), _similarity(m, work / f"{name}-texts")
        return _report(f"similarity/{name}", dtype, {"layer_cos": ("cos", _diff(a, x)), "loss": ("nats", abs(b - y))},
                       {"layer_cos": x, "loss": y})

    def grounding():
        a, x = _grounding(ref, work / f"{name}-ref"), _grounding(m, work / f"{name}-{dtype}")
        return _report(f"grounding/{name}", dtype, {"lookback_ratio": ("prob", _diff(a, x))}, {"lookback_ratio": x})

    return [_guarded(f"{fn.__name__}/{name}", dtype, fn) for fn in (retrieval, sinks, circuits, similarity, grounding)]


# ----------------------------------------------------------------------------- accelerate: layers over cuda:0 and cpu

def split_device_map(folder: Path, first: str = "cuda:0", second: str = "cpu") -> dict[str, str]:
    """Embedding and the first half of the blocks on ``first``; the other blocks, final norm and unembedding on
    ``second``; any other module (rotary tables, ...) on ``first``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from probe import families

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    path = {id(mod): n for n, mod in hf.named_modules()}
    blocks = families.blocks(hf)
    cut = len(blocks) // 2
    dmap = {path[id(families.embedding(hf))]: first, path[id(families.unembedding(hf))]: second}
    dmap |= {path[id(b)]: (first if i < cut else second) for i, b in enumerate(blocks)}
    norm = families.final_norm(hf)
    if norm is not None:
        dmap[path[id(norm)]] = second
    for name, p in list(hf.named_parameters()) + list(hf.named_buffers()):   # whatever the map leaves out
        if not any(name == k or name.startswith(k + ".") for k in dmap):
            owner = name.rpartition(".")[0]
            dmap[owner] = first
    return dmap


def _split_run(m, ids) -> dict:
    from probe import InterventionSpec, KeyGroup, ZeroAblate, capture, families, generate_with_stats, intervene
    from probe import stream_stats

    ids = ids.to(m.device)
    last = m.n_layers - 1                       # a layer on the second device
    with torch.no_grad():
        logits = m.hf(ids).logits.float()
        with intervene(m, InterventionSpec([ZeroAblate(heads=[f"L{last}H0"]), ZeroAblate(heads=["L0H1"])])):
            ablated = m.hf(ids).logits.float()
        rec = families.record(m, ids, start=last)
        rerun = rec.run(last, rec.inputs[last] * 0.5).float()
    st = stream_stats(m, ids, groups=[KeyGroup("first", 0, 1)], verbose=False)
    gen = generate_with_stats(m, ids, max_new_tokens=4, groups=[KeyGroup("first", 0, 1)])
    return {"logits": logits, "ablated": ablated, "rerun": rerun, "stats": st, "gen": gen,
            "patterns": capture(m, ids).patterns}


def accelerate_check(zoo: Zoo, name: str = "llama", device: str = "cuda") -> dict:
    """Layers split by accelerate vs the one-device fp32 run: logits, an intervention, a rerun from a layer,
    streaming and decode statistics, captured patterns, a retrieval and a grounding entry point.

    On CUDA the split is cuda:0 + cpu; on the CPU (``--smoke``) it is cpu + disk offload, the same code path
    with accelerate paging the second half's weights in from disk.
    """
    from probe import load_model

    if device.startswith("cuda") and not torch.cuda.is_available():
        return {"check": "accelerate/split", "ok": True, "skipped": "needs CUDA"}
    folder = zoo.folder(name)
    first, second = ("cuda:0", "cpu") if device.startswith("cuda") else ("cpu", "disk")
    with tempfile.TemporaryDirectory() as offload:
        split = load_model(str(folder), device_map=split_device_map(folder, first, second), dtype="float32",
                           offload_folder=offload)
        ref, ids = zoo.get(name), _ids()
        a, b = _split_run(ref, ids), _split_run(split, ids)
        ra, rb = _retrieval(ref), _retrieval(split)
        ga, gb = _grounding(ref, Path(offload) / "g-ref"), _grounding(split, Path(offload) / "g-split")
        devices = sorted({str(v) for v in split.device_map.values()})
        hashes = (ref.weights_hash, split.weights_hash)
        del split
    scale = float(a["logits"].std())
    same_new = torch.equal(a["gen"].new_ids, b["gen"].new_ids)
    diffs = {"logits": ("logit", _diff(a["logits"], b["logits"]) / scale),
             "ablated_logits": ("logit", _diff(a["ablated"], b["ablated"]) / scale),
             "rerun_from_layer": ("logit", _diff(a["rerun"], b["rerun"]) / scale),
             "entropy": ("entropy", _diff(a["stats"].entropy, b["stats"].entropy)),
             "mass_first": ("prob", _diff(a["stats"].mass("first"), b["stats"].mass("first"))),
             "received_sum": ("prob", _diff(a["stats"].received_sum, b["stats"].received_sum) / ids.shape[1]),
             "decode_mass_first": ("prob", _diff(a["gen"].stats.mass("first"), b["gen"].stats.mass("first"))
                                   if same_new else 1.0),
             "patterns": ("prob", _diff(a["patterns"], b["patterns"])),
             "retrieval_span_mass": ("prob", _diff(ra, rb)), "grounding_lookback": ("prob", _diff(ga, gb))}
    out = _report("accelerate/split", "float32", diffs, {"entropy": b["stats"].entropy}, devices=devices,
                  stats_device=str(b["stats"].entropy.device), same_new_tokens=same_new,
                  weights_hash_equal=hashes[0] == hashes[1])
    out["ok"] = out["ok"] and same_new and hashes[0] == hashes[1] and out["stats_device"] == "cpu"
    return out


# ----------------------------------------------------------------------------- main

def run(args) -> dict:
    from probe.models.tiny import SUPPORTED

    device = "cpu" if args.smoke else args.device
    dtypes = ["bfloat16"] if args.smoke else [DTYPES[d] for d in args.dtypes]
    fams = ["llama"] if args.smoke else (args.families or list(SUPPORTED))
    ana = ["llama"] if args.smoke else args.analyses_families
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        zoo = Zoo(Path(tmp))
        for dtype in dtypes:
            checks += [_guarded(f"family/{f}", dtype, lambda f=f, d=dtype: family_check(zoo, f, device, d)) for f in fams]
            for f in ana:
                checks += analyses_check(zoo, f, device, dtype, Path(tmp))
        checks.append(_guarded("accelerate/split", "float32", lambda: accelerate_check(zoo, device=device)))
    return {"device": device, "torch": torch.__version__, "cuda": torch.cuda.is_available(), "dtypes": dtypes,
            "tolerances": TOL, "n_checks": len(checks), "n_failed": sum(not c["ok"] for c in checks),
            "ok": all(c["ok"] for c in checks), "checks": checks}


def main(argv=None) -> int:
    args = _args(argv)
    if not args.smoke and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "skipped": "no CUDA device: run on a GPU, or --smoke on the CPU"}))
        return 0
    out = run(args)
    print(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
