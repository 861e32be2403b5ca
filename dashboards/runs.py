"""Small default runs of every analysis and the saved-results folder layout (no Streamlit here).

The dashboard, the timing bench and the tests share this: :data:`DEFAULTS` are the sizes of a
first run from a page (chosen to finish in well under two minutes on two CPU cores for the
embedded model), :func:`run` calls the analysis' own entry point with them and writes its files
where the analysis' CLI would, and :func:`find` / :func:`load` open folders written by the CLIs
(``headwise scan retrieval --out DIR`` and friends) with the analysis' own ``load``.
Nothing here computes what an analysis owns.

Layout under a results root (each analysis' CLI format; any folder depth is searched)::

    <root>/retrieval-<model>/summary.json   RetrievalResult.save / headwise scan retrieval
    <root>/sinks-<model>/profile.json       SinkProfile.save
    <root>/sinks-<model>/search.json        SearchResult.save (+ calib.json: headwise calibrate)
    <root>/circuits-<model>/summary.json    CircuitsResult.save / headwise scan circuits
    <root>/similarity-<model>/summary.json  SimilarityResult.save / headwise scan similarity
    <root>/grounding-<model>/summary.json   GroundingResult.save / headwise scan grounding
"""
from __future__ import annotations

import json
from pathlib import Path

ANALYSES = ("retrieval", "sinks", "circuits", "similarity", "grounding")

DEFAULTS: dict[str, dict] = {
    "retrieval": {"lengths": [250], "depths": [50.0], "needles": ["code"], "k": 5, "seeds": [0],
                  "max_new_tokens": 8},
    "sinks": {"task": "sentiment", "n_profile": 2, "first_layer": 27, "last_layer": 28, "n_random": 1},
    "circuits": {"tasks": ["ioi", "induction"], "n": 2, "n_boot": 50},
    "similarity": {"n_prompts": 3, "n_heldout": 1, "max_tokens": 48, "variants": ["matched"], "max_trials": 2},
    "grounding": {"limit": 40, "n_mitigate": 4, "k": 10, "n_perm": 10},
}


def defaults(kind: str, model) -> dict:
    """:data:`DEFAULTS` fitted to ``model`` (short contexts, few layers, tokenizers without names)."""
    d = json.loads(json.dumps(DEFAULTS[kind]))
    if kind == "retrieval":
        d["lengths"] = [min(L, model.n_ctx - d["max_new_tokens"] - 40) for L in d["lengths"]]
    elif kind == "sinks":                                  # the last candidate layers (reference: 2 .. L-2)
        d["last_layer"] = max(0, model.n_layers - 2)
        d["first_layer"] = max(0, d["last_layer"] - 1)
    elif kind == "circuits" and model.tokenizer.vocab_size < 1000:   # byte tokenizers: no one-token names
        d["tasks"] = ["induction", "greater_than"]
    return d


def result_dir(root: str | Path, analysis: str, model_id: str) -> Path:
    return Path(root) / f"{analysis}-{model_id.replace('/', '_')}"


def _summary(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def kind_of(path: Path) -> str | None:
    """Which analysis wrote ``path`` (a ``summary.json`` or a sinks JSON), from its format field."""
    d = _summary(path)
    fmt = d.get("format")
    if path.name == "summary.json":
        return {"headwise.retrieval": "retrieval", "headwise.circuits": "circuits", "headwise.similarity": "similarity",
                "headwise.grounding_result": "grounding"}.get(fmt)
    return {"headwise.act_search": "sinks", "headwise.sink_profile": "sinks"}.get(fmt)


SHIPPED = Path(__file__).resolve().parents[1] / "data"   # validation runs shipped with the analyses' data


UNIT_DIRS = {"units", "samples", "masking", "dataset", "mitigation"}


def find(root: str | Path, shipped: bool = False) -> dict[str, list[Path]]:
    """Saved results under ``root``: analysis -> result folders (sinks: JSON files), newest first;
    with ``shipped``, also the runs shipped under ``data/`` (after those of ``root``)."""
    found = _find(Path(root))
    if shipped and SHIPPED.is_dir() and Path(root).resolve() != SHIPPED:
        for kind, paths in _find(SHIPPED).items():
            found[kind] += [p for p in paths if p not in found[kind]]
    return found


def _find(root: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {a: [] for a in ANALYSES}
    if not root.is_dir():
        return found
    for path in root.rglob("*.json"):
        if any(p.startswith(".") or p in UNIT_DIRS for p in path.relative_to(root).parts[:-1]):
            continue                                   # per-unit files of resumable runs are not results
        kind = kind_of(path)
        if kind:
            found[kind].append(path if kind == "sinks" else path.parent)
    for paths in found.values():
        paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def load(kind: str, path: str | Path):
    """Open a saved result with the analysis' own loader (sinks: a profile or a search result)."""
    path = Path(path)
    if kind == "retrieval":
        from analyses.retrieval import RetrievalResult
        return RetrievalResult.load(path)
    if kind == "circuits":
        from analyses.circuits import CircuitsResult
        return CircuitsResult.load(path)
    if kind == "similarity":
        from analyses.similarity import SimilarityResult
        return SimilarityResult.load(path)
    if kind == "grounding":
        from analyses.grounding import GroundingResult
        return GroundingResult.load(path)
    if kind == "sinks":
        from analyses.sinks import SearchResult, SinkProfile
        fmt = _summary(path).get("format")
        return SinkProfile.load(path) if fmt == "headwise.sink_profile" else SearchResult.load(path)
    raise ValueError(f"unknown analysis {kind!r}: one of {ANALYSES}")


# ----------------------------------------------------------------------------- runs with small defaults

def run(kind: str, model, root: str | Path, **options):
    """Run ``kind`` on ``model`` with :data:`DEFAULTS` (overridden by ``options``); files go under ``root``."""
    if kind not in DEFAULTS:
        from probe.errors import InputError
        raise InputError(f"unknown analysis {kind!r}: use one of {ANALYSES}")
    unknown = set(options) - set(DEFAULTS[kind]) - {"profile"}
    if unknown:
        from probe.errors import InputError
        raise InputError(f"unknown option(s) {sorted(unknown)} for {kind}: use {sorted(DEFAULTS[kind])}")
    opts = {**defaults(kind, model), **options}
    out = result_dir(root, kind, model.model_id)
    out.mkdir(parents=True, exist_ok=True)
    return globals()[f"_run_{kind}"](model, out, **opts)


def _run_retrieval(model, out, **o):
    from analyses import run
    from analyses.retrieval import RETRIEVAL, RetrievalConfig
    cfg = RetrievalConfig(lengths=o["lengths"], depths=o["depths"], needles=o["needles"], k=o["k"], seeds=o["seeds"],
                          max_new_tokens=o["max_new_tokens"])
    return run(RETRIEVAL, model, cfg, store=out)


def _run_sinks(model, out, **o):
    from analyses.sinks import Calibration, SearchConfig, load_task, profile_sinks, search_act
    task = load_task(o["task"])
    texts = [task.prompt(it, 0) for it in task.split("heldout")[:o["n_profile"]]]
    profile = profile_sinks(model, texts, progress=True, **o.get("profile", {}))
    profile.save(out / "profile.json")
    cfg = SearchConfig(first_layer=o["first_layer"], last_layer=o["last_layer"], n_random=o["n_random"])
    search = search_act(model, task, cfg, out=out / "search.json")
    Calibration.from_search(search).save(out / "calib.json")
    return profile, search


def _run_circuits(model, out, **o):
    from analyses import run
    from analyses.circuits import CIRCUITS, CircuitsConfig
    return run(CIRCUITS, model, CircuitsConfig(**o), store=out)


def _run_similarity(model, out, **o):
    from analyses import run
    from analyses.similarity import SIMILARITY, SimilarityConfig
    return run(SIMILARITY, model, SimilarityConfig(**o), store=out)


def _run_grounding(model, out, **o):
    from analyses import run
    from analyses.grounding import GROUNDING, GroundingConfig
    return run(GROUNDING, model, GroundingConfig(**o), store=out)
