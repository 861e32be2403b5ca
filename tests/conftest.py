"""Shared fixtures: tiny seeded models (fast) and the embedded model (integration). Nothing loads at import."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch


# The suite runs on two workers (pytest-xdist, scripts/test.sh): the minute-long tests (notebooks, the
# headless browser) start first, so that no worker is left with one of them at the end.
LONG_FIRST = ("tests/test_notebooks.py::test_notebook_runs", "tests/test_dashboard_browser.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))   # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_llama():
    from probe import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from probe import load_model

    return load_model("tiny-gpt2", device="cpu")


@pytest.fixture(scope="session")
def smol():
    from probe import load_model

    return load_model("smollm2-135m", device="cpu")


def eager_patterns(model, ids, batch: bool = False):
    """Reference patterns ``[layer, head, T, T]`` (``batch``: ``[layer, B, head, T, T]``) from HF eager attention."""
    from probe import install

    hf = model.hf
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(ids, output_attentions=True)
    finally:
        install(hf)
    pats = torch.stack(out.attentions).float()
    return pats if batch else pats[:, 0]


def layer_windows(cfg) -> list[int | None]:
    """Sliding window of every layer (None: full attention), from the config alone: an independent rule
    for which keys a row sees."""
    L = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [cfg.sliding_window if t == "sliding_attention" else None for t in types[:L]]
    return [getattr(cfg, "sliding_window", None)] * L


@pytest.fixture
def reference_patterns():
    return eager_patterns


# ----------------------------------------------------------------------------- saved results for the dashboard tests

def _grounding(root: Path, L: int, H: int) -> None:
    from analyses.grounding import GroundingResult, heldout_roc
    from analyses.grounding.detector import evaluate

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    X = rng.normal(size=(40, L * H)) * 0.1 + 0.5
    X[:, 3] += 0.3 * y                                         # head L0H3 looks back when grounded
    det, summary = evaluate(X[:28], y[:28], X[28:], y[28:], L, H, n_boot=50, n_perm=5)
    mit = pd.DataFrame({"condition": ["greedy", "guided"], "n": [6, 6], "grounded_rate": [0.25, 0.5],
                        "contradicted_rate": [0.5, 0.25], "heads": ["", ""], "d_greedy": [0.0, 0.25]})
    answers = pd.DataFrame([{"item_id": f"i{i}", "split": "train" if i < 28 else "heldout", "label": float(y[i]),
                             "n_new": 1, "answer": "x", "row_lr": X[i].tolist()} for i in range(40)])
    GroundingResult("tiny-llama", summary, det.head_weights(), mit, heldout_roc(det, answers),
                    answers.drop(columns="row_lr"), det).save(root / "grounding-tiny-llama")


def _sinks(folder: Path, model) -> None:
    """The ACT scan on 4 items per split (fast), with the paper's alpha/N sink rule."""
    from analyses import run
    from analyses.sinks import SINKS, SinksConfig
    from probe import SinkCalibration

    cfg = SinksConfig(limit=4, n_profile=2, act=SinkCalibration(rule="alpha", alpha=2.0), first_layer=0,
                      last_layer=1, n_random=1)
    run(SINKS, model, cfg, store=folder, progress=False)


def scan(root: Path, name: str, model, **overrides):
    """Run analysis ``name`` on ``model`` with its small config (and ``overrides``) into ``root/<name>-<model>``,
    where the dashboard's run button writes it."""
    import dataclasses

    from analyses import registry, run

    analysis = registry.get(name)
    cfg = dataclasses.replace(analysis.config.small(model), **overrides)
    return run(analysis, model, cfg, store=root / f"{name}-{model.model_id}", progress=False)


@pytest.fixture(scope="session")
def results(tmp_path_factory, tiny_llama):
    """A results folder with every analysis' files, written as each analysis' scan writes them."""
    root = tmp_path_factory.mktemp("results")
    scan(root, "retrieval", tiny_llama, lengths=(230,), depths=(30.0, 70.0), k=2, max_new_tokens=6)
    _sinks(root / "sinks-tiny-llama", tiny_llama)
    scan(root, "circuits", tiny_llama, n=2, n_boot=5)
    scan(root, "similarity", tiny_llama, n_prompts=2, n_heldout=1, max_tokens=24, variants=("same",), max_trials=1)
    _grounding(root, tiny_llama.n_layers, tiny_llama.n_heads)
    scan(root, "atlas", tiny_llama, results=(str(root),), shipped=False, run_missing=False)   # the study of the five
    return root


# ----------------------------------------------------------------------------- tiny models of many families

@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``family_model(name, dtype)``: the tiny model of family ``name`` (:func:`probe.models.tiny.tiny_family`)
    saved to a folder and loaded with ``load_model`` (cached per name and dtype)."""
    from probe import load_model
    from probe.models.tiny import save_family

    root, cache = tmp_path_factory.mktemp("families"), {}

    def get(name: str, dtype: str = "float32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = load_model(str(save_family(name, root / name)), device="cpu", dtype=dtype)
        return cache[name, dtype]

    return get
