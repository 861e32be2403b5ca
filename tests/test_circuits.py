"""Tests of the circuits analysis (Merullo et al. 2024): patching, attribution, overlap, bootstrap, bad inputs."""
import numpy as np
import pytest
import torch

from analyses.circuits import patching as P
from analyses.circuits.overlap import (bootstrap_ci, jaccard, overlap_coefficient, random_null, rank_correlation,
                                       select_circuit)
from analyses.circuits.tasks import TaskBatch, make_pair, make_task
from analyses import run
from analyses.circuits import CIRCUITS, CircuitsConfig
from probe import HeadId, InputError, families


def _toy_task(model, n=3, T=6, seed=0):
    """Random clean/corrupted byte sequences with one good and one bad token each."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(40, 120, (n, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:3] = torch.randint(40, 120, (n, 2), generator=g)
    good, bad = torch.randint(40, 120, (n, 1), generator=g), torch.randint(40, 120, (n, 1), generator=g)
    return TaskBatch("toy", clean, corrupt, good, bad, tuple({} for _ in range(n)))


def _reference_patch(model, task, head: HeadId) -> torch.Tensor:
    """Independent reference: Hugging Face eager attention, the head's slice of o_proj's input replaced."""
    hf, D = model.hf, model.d_head
    o_proj = families.attention_out(hf, head.layer)
    sl = slice(head.head * D, (head.head + 1) * D)
    saved = {}
    hf.set_attn_implementation("eager")
    try:
        h = o_proj.register_forward_pre_hook(lambda m, a: saved.__setitem__("z", a[0][..., sl].clone()))
        with torch.no_grad():
            hf(task.corrupt)
        h.remove()

        def patch(m, a):
            x = a[0].clone()
            x[..., sl] = saved["z"]
            return (x,)

        h = o_proj.register_forward_pre_hook(patch)
        with torch.no_grad():
            logits = hf(task.clean).logits[:, -1]
        h.remove()
    finally:
        from probe import install

        install(hf)
    return (logits.gather(1, task.good) - logits.gather(1, task.bad))[:, 0]


def test_exact_patching_matches_hand_reference(tiny_llama):
    task = _toy_task(tiny_llama)
    ld = P.exact_patching(tiny_llama, task, rows=8)  # small rows: several forwards per layer
    assert ld.shape == (3, 2, 4)
    for head in [HeadId(0, 1), HeadId(1, 3)]:
        ref = _reference_patch(tiny_llama, task, head)
        assert torch.allclose(ld[:, head.layer, head.head], ref, atol=1e-4)
        z_corr = P.record_z(tiny_llama, task.corrupt)
        assert abs(P.patch_one(tiny_llama, task, 2, head, z_corr) - float(ref[2])) < 1e-4


def test_exact_patching_resumes_from_the_patched_layer(tiny_llama):
    """Same numbers as rerunning the whole model per layer; block l runs l + 2 times per prompt batch, not L."""
    from probe import families

    task = _toy_task(tiny_llama)
    z_corr = P.record_z(tiny_llama, task.corrupt)
    calls = {l: 0 for l in range(tiny_llama.n_layers)}
    hooks = [blk.register_forward_pre_hook(lambda m, a, l=l: calls.__setitem__(l, calls[l] + 1))
             for l, blk in enumerate(families.blocks(tiny_llama))]
    try:
        fast = P.exact_patching(tiny_llama, task, z_corr, rows=8)
        resumed = dict(calls)
        full = P.exact_patching(tiny_llama, task, z_corr, rows=8, resume=False)
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(fast, full, atol=1e-5) and not fast.isnan().any()
    n_batches = -(-task.n // (8 // tiny_llama.n_heads))
    # resumed: block l runs in the recording and in the patches of layers 0..l; the old path: L times each
    assert resumed == {l: (l + 2) * n_batches for l in calls}
    assert {l: calls[l] - resumed[l] for l in calls} == {l: tiny_llama.n_layers * n_batches for l in calls}


def test_normalised_score_hand_case():
    patched = torch.tensor([[[3.0, 1.0]], [[5.0, 1.0]]])  # [N=2, L=1, H=2]
    clean, corr = torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0])
    s = P.normalised(patched, clean, corr)
    assert torch.allclose(s, torch.tensor([[0.75, 0.0]]))  # (4-1)/(5-1), (1-1)/4


def test_patching_clean_into_clean_is_zero_effect(tiny_llama):
    task = _toy_task(tiny_llama)
    same = TaskBatch("same", task.clean, task.clean, task.good, task.bad, task.positions)
    ld = P.exact_patching(tiny_llama, same)
    clean = P.run_ld(tiny_llama, task.clean, task.good, task.bad)
    assert torch.allclose(ld, clean[:, None, None].expand_as(ld), atol=1e-4)


def test_eap_is_the_exact_linear_approximation(tiny_llama):
    """For a small patch z_clean + eps*d, EAP equals the central finite difference of exact patching."""
    task = _toy_task(tiny_llama, n=2)
    z_clean = P.record_z(tiny_llama, task.clean)
    direction = torch.randn(z_clean.shape, generator=torch.Generator().manual_seed(1))
    eps = 1e-2
    eap = P.attribution_patching(tiny_llama, task, z_clean, z_clean + eps * direction)
    plus = P.exact_patching(tiny_llama, task, z_clean + eps * direction)
    minus = P.exact_patching(tiny_llama, task, z_clean - eps * direction)
    fd = (plus - minus) / 2
    assert torch.allclose(eap, fd, atol=2e-4 + 1e-2 * fd.abs().max())
    # on the same input the interpolation path is constant, so EAP-IG equals EAP
    same = TaskBatch("same", task.clean, task.clean, task.good, task.bad, task.positions)
    ig = P.attribution_patching(tiny_llama, same, z_clean, z_clean + eps * direction, ig_steps=3)
    assert torch.allclose(ig, eap, atol=1e-5)


def test_faithfulness_full_and_empty_circuit(tiny_llama):
    task = _toy_task(tiny_llama)
    means = P.mean_values(P.record_z(tiny_llama, task.clean))
    clean = P.run_ld(tiny_llama, task.clean, task.good, task.bad)
    everyone = tiny_llama.layout.all_heads()
    f = P.faithfulness(tiny_llama, task, everyone, means, clean)
    assert f["kept"] == pytest.approx(1.0, abs=1e-4) and f["ld_circuit_ablated"] == pytest.approx(f["ld_all_ablated"])
    empty = P.faithfulness(tiny_llama, task, [], means, clean)          # nothing kept, nothing removed
    assert empty["ld_circuit_only"] == pytest.approx(empty["ld_all_ablated"], abs=1e-5)
    assert empty["kept_normalised"] == pytest.approx(0.0, abs=1e-4)
    assert empty["ld_circuit_ablated"] == pytest.approx(float(clean.mean()), abs=1e-5)
    assert empty["removed"] == pytest.approx(0.0, abs=1e-4)
    assert empty["ld_all_ablated"] == pytest.approx(f["ld_all_ablated"], abs=1e-5)


def test_faithfulness_ratios_and_intervals_by_hand():
    per = {"ld_clean": [2.0, 4.0], "ld_all_ablated": [0.0, 0.0], "ld_circuit_only": [1.0, 3.0],
           "ld_circuit_ablated": [1.0, 1.0]}
    r = P.faithfulness_ratios(per)                       # ratios of means: 2/3, (2 - 0)/(3 - 0), 1 - 1/3
    assert r == pytest.approx({"kept": 2 / 3, "kept_normalised": 2 / 3, "removed": 2 / 3})
    assert P.faithfulness_ratios(per, [1, 1]) == pytest.approx({"kept": 0.75, "kept_normalised": 0.75, "removed": 0.75})
    flat = {"ld_clean": [2.0, 4.0, 6.0], "ld_all_ablated": [0.0] * 3, "ld_circuit_only": [1.0, 2.0, 3.0],
            "ld_circuit_ablated": [2.0, 2.0, 8.0]}        # every prompt keeps half: the interval is the point
    ci = P.faithfulness_ci({"per_prompt": flat}, n_boot=200)
    assert ci["kept_normalised"] == pytest.approx([0.5, 0.5])
    lo, hi = ci["removed"]
    assert lo < P.faithfulness_ratios(flat)["removed"] < hi   # removed varies by prompt (1 - 12/12 ... )


def test_faithfulness_versus_random_draws_by_hand():
    from analyses.circuits.paths import versus_random

    def per(keep):                                        # kept_normalised = keep on every prompt
        return {"per_prompt": {"ld_clean": [2.0, 4.0], "ld_all_ablated": [0.0, 0.0],
                               "ld_circuit_only": [2 * keep, 4 * keep], "ld_circuit_ablated": [1.0, 1.0]}}

    v = versus_random(per(0.5), [per(0.1), per(0.3)], "kept_normalised", n_boot=400)
    # the draws' resampled mean is 0.1, 0.2 or 0.3 (1/4, 1/2, 1/4): the difference 0.4, 0.3 or 0.2
    assert v["estimate"] == pytest.approx(0.3) and v["n"] == 2 and v["n_draws"] == 2
    assert v["lo"] == pytest.approx(0.2) and v["hi"] == pytest.approx(0.4)


def test_overlap_metrics_known_sets():
    a, b = {HeadId(0, 0), HeadId(0, 1), HeadId(1, 2)}, {HeadId(0, 1), HeadId(1, 2), HeadId(2, 0), HeadId(2, 1)}
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert overlap_coefficient(a, b) == pytest.approx(2 / 3)
    assert jaccard(a, a) == 1.0 and jaccard(a, {HeadId(5, 5)}) == 0.0
    s = np.array([[0.1, -0.9], [0.3, 0.05]])
    assert select_circuit(s, frac=0.5) == [HeadId(0, 1), HeadId(1, 0)]
    assert rank_correlation(s, s ** 3) == pytest.approx(1.0)
    null = random_null(100, 10, 10, n_draws=3000)
    assert null["overlap_coefficient"][0] == pytest.approx(0.1, abs=0.01)  # E|A∩B| = k*k/n = 1 of 10


def test_bootstrap_interval_covers_truth():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(60):
        x = rng.normal(1.0, 2.0, 40)
        lo, hi = bootstrap_ci(lambda idx, x=x: x[idx].mean(), len(x), n_boot=200, seed=trial)
        covered += lo <= 1.0 <= hi
    assert covered >= 51  # nominal 95%: >= 85% of 60 trials


def test_bad_inputs(tiny_llama):
    with pytest.raises(InputError, match="unknown task"):
        make_task(tiny_llama, "sorting")
    with pytest.raises(InputError, match="unknown task"):
        CircuitsConfig(tasks=("ioi", "nope"))
    with pytest.raises(InputError, match="single tokens"):  # byte tokenizer: " Mary" is five tokens
        make_pair(tiny_llama, "ab", "cd", " Mary", "x")
    with pytest.raises(InputError, match="same length"):
        make_pair(tiny_llama, "abc", "cd", "a", "b")
    with pytest.raises(InputError, match="equal shape"):
        TaskBatch("t", torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                  torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(InputError):
        select_circuit(np.ones((2, 2)), frac=0)


def test_scan_resumes(tiny_llama, tmp_path):
    from analyses.circuits import CircuitsResult

    cfg = CircuitsConfig(tasks=("induction",), n=4, ig_steps=2, frac=0.25, n_boot=10)
    r = run(CIRCUITS, tiny_llama, cfg, store=tmp_path, progress=False)
    unit = tmp_path / "units" / "tasks" / "induction.safetensors"
    first = unit.stat().st_mtime_ns
    again = run(CIRCUITS, tiny_llama, CircuitsConfig(tasks=("induction",), n=4, ig_steps=2, frac=0.25, n_boot=20),
                store=tmp_path, progress=False, force=True)
    assert unit.stat().st_mtime_ns == first  # finished task skipped (the bootstrap size does not determine it)
    back = CircuitsResult.load(tmp_path)
    assert np.allclose(back.tasks[0].scores(), r.tasks[0].scores()) and back.tasks[0].circuit == again.tasks[0].circuit
    frame = back.to_frame()
    assert {"task", "layer", "head", "metric", "value"} <= set(frame.columns)
    assert len(back.tasks[0].circuit) == 2
    back.plot()
    run(CIRCUITS, tiny_llama, CircuitsConfig(tasks=("induction",), n=3, ig_steps=2, frac=0.25, n_boot=10),
        store=tmp_path, progress=False, force=True)
    assert unit.stat().st_mtime_ns != first  # another n: the task is recomputed, never reused


@pytest.mark.slow
def test_ioi_on_embedded_model(smol):
    task = make_task(smol, "ioi", n=4)
    acc = P.accuracy(smol, task)
    assert acc["mean_ld"] > 0  # the model prefers the indirect object
    z_corr = P.record_z(smol, task.corrupt)
    head = HeadId(20, 4)
    fast = P.exact_patching(smol, task.subset([0]), z_corr[:, :1], layers=[20])
    assert abs(float(fast[0, 20, 4]) - P.patch_one(smol, task, 0, head, z_corr)) < 1e-3


def test_cli_scan_circuits(tmp_path, capsys):
    from analyses.cli import main

    args = ["scan", "circuits", "--model", "tiny-llama", "--n", "3", "--ig-steps", "1", "--frac", "0.25",
            "--n-boot", "5", "--out", str(tmp_path)]
    assert main(args + ["--tasks", "induction"]) == 0
    assert (tmp_path / "summary.json").exists() and "induction" in capsys.readouterr().out
    assert main(args + ["--tasks", "induction,sorting"]) == 2
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["ioi", "colored_objects"])
def test_word_tasks_on_a_byte_tokenizer_give_a_typed_error(tiny_llama, task):
    from analyses.circuits import make_task
    from probe.errors import InputError

    with pytest.raises(InputError, match="single-token"):
        make_task(tiny_llama, task, 2, 0)


def test_the_s2_attention_role_is_measured_whenever_ioi_is_scanned(tiny_llama):
    """The S-inhibition class's role score (attention to S2) is planned with IOI alone, not only for the repair."""
    from analyses.circuits.run import plan_roles

    ids = lambda tasks: [u.id for u in plan_roles(tiny_llama, CircuitsConfig(tasks=tasks), {})]  # noqa: E731
    assert "inhibition-ioi" in ids(("ioi", "induction")) and "inhibition-ioi" not in ids(("induction", "greater_than"))


def test_random_control_heads_stay_inside_the_model_when_the_last_layer_is_full():
    """A circuit holding every head of the last layer: the control falls back to other layers, never layer L."""
    from analyses.circuits.roles import random_heads_like

    full = [HeadId(29, h) for h in range(9)] + [HeadId(3, 1)]
    for seed in range(5):
        ctrl = random_heads_like(full, 9, seed, n_layers=30)
        assert len(ctrl) == len(full) and not set(ctrl) & set(full)
        assert max(h.layer for h in ctrl) < 30 and HeadId(3, 1) not in ctrl
