"""The five analyses' entry points, end to end, on tiny models of five families (and one in bfloat16).

Each test checks a number the analysis reports against a reference computed independently from
Hugging Face eager attention (``output_attentions=True``) or the model's own logits, so a family
whose windows, softcaps or sinks the pipeline mishandled would fail here, not only crash.
"""
import numpy as np
import pytest
import torch

from conftest import eager_patterns, layer_windows

FIVE = ("llama", "mistral", "gemma2", "gpt2", "gpt_oss")


def _greedy_eager(m, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation from full forwards under HF eager attention (no cache, no headwise)."""
    from probe import install

    hf, seq = m.hf, ids
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            for _ in range(n):
                nxt = hf(seq).logits[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], 1)
    finally:
        install(hf)
    return seq[0, ids.shape[1]:].tolist()


def _lookback(A: torch.Tensor, rows, c0: int, c1: int, new_start: int) -> torch.Tensor:
    """Reference lookback ratios ``[rows, L, H]`` from full patterns ``A [L, H, T, T]`` (means over key counts)."""
    out = []
    for p in rows:
        a_ctx = A[:, :, p, c0:min(p + 1, c1)].sum(-1) / (min(p + 1, c1) - c0)
        n_new = p + 1 - new_start
        a_new = A[:, :, p, new_start:p + 1].sum(-1) / n_new if n_new > 0 else torch.zeros_like(a_ctx)
        out.append(a_ctx / (a_ctx + a_new))
    return torch.stack(out)


# ----------------------------------------------------------------------------- retrieval heads

@pytest.mark.parametrize("name", [n for n in FIVE])
def test_retrieval_on_five_families(family_model, name, tmp_path):
    from analyses import run
    from analyses.retrieval import RETRIEVAL, RetrievalConfig
    from analyses.retrieval.decode import decode, prefill
    from analyses.retrieval.harness import build_prompt, load_needles

    m = family_model(name)
    cfg = RetrievalConfig(cells=(("code", 200, 50.0),), mask_cells=(("code", 200, 50.0),), k=2, seeds=(0,),
                          max_new_tokens=3)
    r = run(RETRIEVAL, m, cfg, store=tmp_path, progress=False)
    assert r.scores.shape == (m.n_layers, m.n_heads) and set(r.masking.condition) == {"top", "random0"}
    needle = next(n for n in load_needles() if n.name == "code")
    p = build_prompt(m, needle, 200, 50, max_new_tokens=3)
    new, st = decode(m, p.ids, prefill(m, p.ids), max_new_tokens=3, span=(p.start, p.stop))
    assert new == list(r.samples.new_ids[0]) == _greedy_eager(m, p.ids, len(new))
    T = p.ids.shape[1]
    A = eager_patterns(m, torch.cat([p.ids, torch.tensor([new[:-1]], dtype=torch.long)], 1))   # rows T-1.. produce the new tokens
    rows = list(range(T - 1, T - 1 + len(new)))
    assert st.query_pos.tolist() == rows
    assert torch.equal(st.argmax, A[:, :, rows].argmax(-1))                   # the copy-paste rule's input
    assert torch.allclose(st.mass("answer"), A[:, :, rows, p.start:p.stop].sum(-1), atol=1e-5)


# ----------------------------------------------------------------------------- sinks and ACT

@pytest.mark.parametrize("name", [n for n in FIVE])
def test_sinks_on_five_families(family_model, name):
    from analyses import run
    from analyses.sinks import SINKS, SinksConfig, load_task
    from analyses.sinks.search import evaluate
    from analyses.sinks.tasks import label_token_ids, task_batches
    from probe import HeadId, SinkCalibration

    m = family_model(name)
    cfg = SinksConfig(limit=4, first_layer=1, last_layer=1, n_random=0, n_profile=1,
                      act=SinkCalibration(rule="alpha", alpha=2.0))
    res = run(SINKS, m, cfg, progress=False)
    task = load_task(cfg.task).limited(cfg.limit)        # the 4 calibration and 4 held-out items it ran on
    assert [r["head"] for r in res.search.candidates] == [str(HeadId(1, h)) for h in range(m.n_heads)]
    batches = task_batches(m, task, "calib", cfg.shots, cfg.batch_size)
    labels = label_token_ids(m.tokenizer, task.labels)
    row = res.search.candidates[1]                       # run from layer 1 == a full forward with that head edited
    full = evaluate(m, batches, labels, cfg.spec([HeadId.parse(row["head"])]))
    assert row["gold_logprob"] == pytest.approx(full["gold_logprob"], abs=1e-5) and row["gold_logprob"] < 0
    text = task.prompt(task.split("heldout")[0], 0)      # the profile stage's one prompt
    prof = res.profile
    mass = prof.mass.groupby(["layer", "head"]).mass.sum().to_numpy()
    A = eager_patterns(m, m.encode(text)).double()       # [L, H, T, T]
    share = 1.0 - A.sum(-1).mean(-1).flatten().numpy()   # what a learned sink (gpt-oss) takes from each row
    assert np.allclose(mass + share, 1.0, atol=1e-4)     # each query's attention, split over token types
    assert (share > 1e-3).any() == (name == "gpt_oss")   # only the sink family leaves mass outside the keys
    visible = (A > 0).sum(-2).clamp(min=1)               # queries that see each key (windows included)
    for s in prof.sinks.itertuples():
        want = A[s.layer, s.head, :, s.pos].sum() / visible[s.layer, s.head, s.pos]
        assert s.col_mean == pytest.approx(float(want), abs=1e-5)


# ----------------------------------------------------------------------------- circuits

@pytest.mark.parametrize("name", [n for n in FIVE])
def test_circuits_on_five_families(family_model, name, tmp_path):
    from analyses import run
    from analyses.circuits import CIRCUITS, CircuitsConfig
    from analyses.circuits import patching as P
    from analyses.circuits.tasks import make_task, token_range
    from probe import HeadId

    m = family_model(name)
    cfg = CircuitsConfig(tasks=("induction",), n=2, ig_steps=1, frac=0.25, n_boot=5)
    r = run(CIRCUITS, m, cfg, store=tmp_path, progress=False)
    ind = r.tasks[0]
    L, H = m.n_layers, m.n_heads
    assert {k: v.shape for k, v in ind.effects.items()} == {k: (2, L, H) for k in ("exact", "eap", "eap_ig")}
    assert len(ind.circuit) == round(0.25 * L * H) and np.isfinite(ind.effects["eap_ig"]).all()
    task = make_task(m, "induction", 2, 0)
    head = HeadId(L - 1, 1)                              # exact patching == the engine's MeanAblate per position
    want = P.patch_one(m, task, 1, head, P.record_z(m, task.corrupt))
    assert ind.effects["exact"][1, head.layer, head.head] + ind.ld_clean[1] == pytest.approx(want, abs=1e-4)
    g = torch.Generator().manual_seed(0)                 # the repeated-token prompts of repeated_token_roles
    seq = torch.randint(*token_range(m), (8, 10), generator=g)
    A = eager_patterns(m, torch.cat([seq, seq], 1), batch=True)                    # [L, B, H, T, T]
    j = torch.arange(1, 20)
    assert np.allclose(r.roles_scores["previous_token"], A[..., j, j - 1].mean((1, 3)).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- similarity

@pytest.mark.parametrize("name", [n for n in FIVE])
def test_similarity_on_five_families(family_model, name, tmp_path):
    from analyses import run
    from analyses.similarity import SIMILARITY, SimilarityConfig

    m = family_model(name)
    texts = ["The cat sat on the mat, and then it slept.", "A dog ran in the park."]
    for i, t in enumerate(texts):
        (tmp_path / f"texts{i}.txt").write_text(t)
    cfg = SimilarityConfig(prompts=str(tmp_path / "texts0.txt"), heldout=str(tmp_path / "texts1.txt"),
                           variants=("same",), max_trials=1, max_tokens=24, window=8)
    r = run(SIMILARITY, m, cfg, progress=False)
    ids = m.tokenizer(texts[0], return_tensors="pt").input_ids[:, :24]
    avg = eager_patterns(m, ids).double().mean(1).flatten(1)          # head-averaged maps [L, T*T]
    cos = (avg @ avg.T) / (avg.norm(dim=1)[:, None] * avg.norm(dim=1)[None])
    assert np.allclose(r.layer_cos, cos.numpy(), atol=1e-5) and np.allclose(np.diag(r.layer_cos), 1.0)
    P = eager_patterns(m, ids).double()                                 # [L, H, T, T]: the other three matrices
    heads = P.flatten(2).reshape(-1, P.shape[-1] ** 2)
    hcos = (heads @ heads.T) / (heads.norm(dim=1)[:, None] * heads.norm(dim=1)[None])
    js = lambda p, q: (0.5 * (torch.xlogy(p, 2 * p / (p + q)) + torch.xlogy(q, 2 * q / (p + q)))  # noqa: E731
                       ).nan_to_num().sum(-1).mean(-1) / np.log(2)
    avg_maps = P.mean(1)
    assert np.allclose(r.head_cos, hcos.numpy(), atol=1e-5)
    assert np.allclose(r.layer_js, js(avg_maps[:, None], avg_maps[None]).numpy(), atol=1e-5)
    assert np.allclose(r.head_js, js(P[:-1, :, None], P[1:, None]).numpy(), atol=1e-5)
    held = m.tokenizer(texts[1], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = m.hf(held).logits[0, :-1].float()
    assert r.baseline_loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, held[0, 1:])), rel=1e-5)
    assert r.echo["same"].shape == (m.n_layers - 1,) and np.isfinite(r.echo["same"]).all()


# ----------------------------------------------------------------------------- grounding

def _detector(m, seed=0):
    from analyses.grounding import Detector

    rng, n = np.random.default_rng(seed), m.n_layers * m.n_heads
    return Detector(rng.normal(size=n), 0.0, np.full(n, 0.5), np.full(n, 0.2), m.n_layers, m.n_heads)


@pytest.mark.parametrize("name", [n for n in FIVE])
def test_grounding_on_five_families(family_model, name, tmp_path):
    from analyses.grounding import GROUNDING, GroundingConfig, boost_spec, guided_generate
    from analyses.grounding.data import answer_item, build_items, item_regions
    from analyses.runner import run_stage
    from analyses.units import UnitStore

    m = family_model(name)
    cfg = GroundingConfig(limit=1, max_new_tokens=3)      # the items stage: one item (no detector to fit on it)
    df = run_stage(GROUNDING, GROUNDING.stage("items"), m, cfg, None, UnitStore(tmp_path))["df"]
    item = build_items(limit=1)[0]
    ids, reg = item_regions(m, item)
    row, T = df.iloc[0], ids.shape[1]
    new = _greedy_eager(m, ids, int(row.n_new))
    A = eager_patterns(m, torch.cat([ids, torch.tensor([new[:-1]], dtype=torch.long)], 1))
    want = _lookback(A, range(T - 1, T - 1 + len(new)), reg.ctx_start, reg.ctx_stop, reg.new_start)
    got = np.asarray(row.row_lr).reshape(-1, m.n_layers, m.n_heads)
    assert np.allclose(got, want.numpy(), atol=1e-5)
    for l, w in enumerate(layer_windows(m.hf.config)):    # docs/methods.md §5: a passage out of a layer's window
        rows = [i for i, p in enumerate(range(T - 1, T - 1 + len(new))) if w and p - (reg.ctx_stop - 1) >= w]
        assert bool(rows) == bool(w) and (got[rows, l] == 0).all()   # counts in N_ctx, gets ratio 0 there
    det = _detector(m)
    out = guided_generate(m, ids, det, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=4, chunk=2, n_candidates=2)
    A = eager_patterns(m, torch.cat([ids, torch.tensor([out.new_ids[:-1]], dtype=torch.long)], 1))
    want = _lookback(A, range(T - 1, T - 1 + len(out.new_ids)), reg.ctx_start, reg.ctx_stop, reg.new_start)
    assert np.allclose(out.row_lr, want.numpy(), atol=1e-5) and all(0 <= s <= 1 for s in out.chunk_scores)
    boosted = answer_item(m, item, max_new_tokens=1, spec=boost_spec(["L2H0", "L2H3"], (reg.ctx_start, reg.ctx_stop)))
    plain, more = (np.asarray(x).reshape(-1, m.n_layers, m.n_heads)[0] for x in (row.row_lr, boosted["row_lr"]))
    assert np.array_equal(plain[:2], more[:2])           # layers before the boost see nothing of it
    seen = plain[2, [0, 3]] > 0                           # the passage is inside layer 2's window for these heads
    assert (more[2, [0, 3]][seen] > plain[2, [0, 3]][seen]).all() and np.allclose(more[2, [1, 2]], plain[2, [1, 2]], atol=1e-6)
    assert np.array_equal(more[2, [0, 3]][~seen], plain[2, [0, 3]][~seen])   # keys outside a window cannot be boosted
    assert seen.all() or m.hf.config.model_type in ("mistral", "gemma2", "gpt_oss")  # only windowed layers hide it


# ----------------------------------------------------------------------------- bfloat16 keeps fp32 statistics

def test_bf16_smoke_of_the_gpu_check(tmp_path):
    """``bench/gpu_check.py --smoke``: the same seeded model in bf16 and fp32 on the CPU; every entry point runs,
    returns float32/float64 statistics, within the script's bf16 tolerances of fp32; the accelerate slot runs its
    split over cpu and disk offload (on CUDA: cuda:0 and cpu) within the float32 bounds."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = json.loads(json.dumps(gpu_check.run(gpu_check._args(["--smoke"]))))
    checks = {c["check"]: c for c in out["checks"]}
    assert set(checks) == {"family/llama", "retrieval/llama", "sinks/llama", "circuits/llama", "similarity/llama",
                           "grounding/llama", "accelerate/split"} and out["dtypes"] == ["bfloat16"]
    assert not [c for c in out["checks"] if not c["ok"]]
    for name, c in checks.items():
        if name != "accelerate/split":
            assert c["dtypes"] and set(c["dtypes"].values()) <= {"float32", "float64"}, name
    split = checks["accelerate/split"]
    assert "skipped" not in split and split["devices"] == ["cpu", "disk"] and split["weights_hash_equal"]
    assert split["same_new_tokens"] and split["stats_device"] == "cpu" and len(split["quantities"]) == 10
    for name in ("llama", "gpt2"):                       # the slot's device map: half the blocks on each device
        dmap = gpu_check.split_device_map(gpu_check.Zoo(tmp_path).folder(name))
        blocks = [k for k in dmap if k.rsplit(".", 1)[-1].isdigit()]
        assert [dmap[b] for b in blocks] == ["cuda:0", "cpu", "cpu"]
        assert list(dmap.values()).count("cpu") == 2 + 2                     # and the final norm and unembedding
