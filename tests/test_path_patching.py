"""Path patching (Wang et al. 2022) on a tiny model with a planted two-stage induction circuit.

Hand-set weights (RoPE kept; MLPs and every other head silenced):
  * L0H0, a previous-token head: RoPE-phased query/key on the four fastest frequencies put its
    attention on position p-1; it copies that token's identity into the "previous token" subspace.
  * L1H1, an induction head: its query (current token) matches keys holding the previous-token
    identity (slow frequencies, where RoPE barely rotates over 7 positions); it copies the
    attended token into the subspace the unembedding reads.
  * L0H2, a distractor: it attends to the tokens 'a'/'g' and writes them straight into the logits.
    It has a real total effect (the corruption swaps 'a' for 'g') but no path into L1H1's keys.
Prompt "zabcdea" -> 'b'; corruption "zgbcdea" (the first 'a' replaced) breaks the induction match.
"""
import numpy as np
import pytest
import torch

from analyses.circuits import patching as P
from analyses.circuits.path_patching import (INDUCTION_STAGES, PathPatchingResult, Stage, circuits_at, path_patch,
                                             path_patching_circuit)
from analyses.circuits.tasks import TaskBatch
from probe import families, load_model
from probe.errors import InputError
from probe.heads import HeadId

LETTERS = "abcdefgh"
PREV, IND, DISTRACTOR = HeadId(0, 0), HeadId(1, 1), HeadId(0, 2)


def _planted():
    model = load_model("tiny-llama", device="cpu")      # a private copy: its weights are edited
    hf, d = model.hf, model.d_head
    tok = model.tokenizer
    ids = {ch: tok(ch, add_special_tokens=False).input_ids[0] for ch in LETTERS + "z"}
    theta = families.decoder(hf).rotary_emb.inv_freq.clone()   # a Llama: its RoPE and norms by name below
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for layer in families.blocks(hf):
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        families.final_norm(hf).weight.fill_(1.0)
        E = families.embedding(hf).weight
        U = families.unembedding(hf).weight
        E[:, 0] = 1.0                                            # dim 0: constant
        E[:, 30] = 1.0                                           # dim 30 (read by nothing): every token has
        for k, ch in enumerate(LETTERS):
            E[ids[ch], 30], E[ids[ch], 1 + k] = 0.0, 1.0         # the same norm; dims 1..8: identity
            U[ids[ch], 17 + k] = 1.0                             # dims 17..24: read by the unembedding
        a0, a1 = families.attention(hf, 0), families.attention(hf, 1)
        o0, o1 = families.attention_out(hf, 0).weight, families.attention_out(hf, 1).weight
        # previous-token head L0H0 (KV head 0): score ~ sum_i cos(theta_i (p - j - 1)), i = 0..3
        c = 6.0
        for i in range(4):
            a0.q_proj.weight[0 * d + i, 0] = c
            a0.k_proj.weight[0 * d + i, 0] = c * float(torch.cos(theta[i]))
            a0.k_proj.weight[0 * d + i + d // 2, 0] = c * float(torch.sin(theta[i]))
        for k in range(8):
            a0.v_proj.weight[0 * d + k, 1 + k] = 1.0
            o0[9 + k, 0 * d + k] = 0.2                           # -> dims 9..16: previous token
        # distractor L0H2 (KV head 1): constant query, keys flag 'a' and 'g' (slow frequency dims 7, 15)
        a0.q_proj.weight[2 * d + 7, 0] = 3.0
        for ch in "ag":
            a0.k_proj.weight[1 * d + 7, 1 + LETTERS.index(ch)] = 3.0
        for k in range(8):
            a0.v_proj.weight[1 * d + k, 1 + k] = 1.0
            o0[17 + k, 2 * d + k] = 0.05                         # -> straight into the logits (weak)
        # induction head L1H1 (KV head 0): query = current token, key = previous-token subspace
        slow = [4, 5, 6, 7, 12, 13, 14, 15]
        for k in range(8):
            a1.q_proj.weight[1 * d + slow[k], 1 + k] = 3.0
            a1.k_proj.weight[0 * d + slow[k], 9 + k] = 3.0 / 0.2 * 0.6
            a1.v_proj.weight[0 * d + k, 1 + k] = 1.0
            o1[17 + k, 1 * d + k] = 0.5
    def enc(s):
        return [ids[ch] for ch in s]
    clean, corrupt = enc("zabcdea"), enc("zgbcdea")
    task = TaskBatch("planted", torch.tensor([clean]), torch.tensor([corrupt]), torch.tensor([[ids["b"]]]),
                     torch.tensor([[ids["g"]]]), ({},))
    return model, task


@pytest.fixture(scope="module")
def planted():
    return _planted()


def test_the_planted_model_does_induction(planted):
    model, task = planted
    ld_clean = float(P.run_ld(model, task.clean, task.good, task.bad)[0])
    ld_corr = float(P.run_ld(model, task.corrupt, task.good, task.bad)[0])
    assert ld_clean > 1.0 and ld_corr < 0.1 * ld_clean
    # the distractor is a real distractor: patching it alone moves the logit difference
    z_corr = P.record_z(model, task.corrupt)
    total = P.exact_patching(model, task, z_corr)[0] - ld_clean
    assert abs(float(total[DISTRACTOR.layer, DISTRACTOR.head])) > 0.01


def test_path_patching_recovers_both_stages_and_rejects_the_distractor(planted):
    model, task = planted
    r = path_patching_circuit(model, task, INDUCTION_STAGES, frac=1 / 8, shortlist=None)
    ind, prev = r.stage("induction"), r.stage("previous_token")
    assert ind.selected == (IND,) and prev.selected == (PREV,)
    assert prev.receivers == (IND,) and all(h.layer == 0 for h in prev.candidates)
    s = dict(zip(prev.candidates, prev.scores))
    assert s[PREV] > 0.5                                    # the path L0H0 -> L1H1 keys carries the effect
    assert abs(s[DISTRACTOR]) < 1e-5                        # no path from the distractor into those keys
    d_logits = dict(zip(ind.candidates, ind.scores))[DISTRACTOR]
    assert d_logits != 0 and abs(d_logits) < dict(zip(ind.candidates, ind.scores))[IND]   # direct path only
    assert r.circuit == sorted([PREV, IND])


def test_eap_shortlist_then_path_patching_confirms(planted, tmp_path):
    model, task = planted
    res = circuits_at(model, task, INDUCTION_STAGES, fracs=(1 / 8, 2 / 8), shortlist=3, method="eap")
    one, two = res[1 / 8], res[2 / 8]
    assert one.stage("previous_token").selected == (PREV,)
    assert len(one.stage("induction").candidates) == 3      # only the shortlist was path patched
    assert IND in two.stage("induction").selected and DISTRACTOR not in two.stage("previous_token").selected
    frame = one.to_frame()
    assert set(frame.stage) == {"induction", "previous_token"} and frame.selected.sum() == 2
    assert one.plot().data
    back = PathPatchingResult.load(one.save(tmp_path / "pp.json"))
    assert back.circuit == one.circuit and np.allclose(back.stage("induction").scores, one.stage("induction").scores)


def test_the_same_paths_are_patched_once_across_fracs(planted, monkeypatch):
    import analyses.circuits.path_patching as PP

    model, task = planted
    calls = []
    real = PP.path_patch
    monkeypatch.setattr(PP, "path_patch", lambda *a, **k: calls.append((a[4], tuple(a[3] or ()), tuple(a[2])))
                        or real(*a, **k))
    cache: dict = {}
    res = circuits_at(model, task, INDUCTION_STAGES, fracs=(1 / 8, 2 / 8), shortlist=None, cache=cache)
    assert len(calls) == len(set(calls)) == len(cache["paths"]) == 3   # the logits stage once, two k stages
    one, two = res[1 / 8].stage("induction"), res[2 / 8].stage("induction")
    assert np.array_equal(one.ld_patched, two.ld_patched) and one.selected != two.selected
    fresh = path_patching_circuit(model, task, INDUCTION_STAGES, frac=2 / 8, shortlist=None)
    assert fresh.circuit == res[2 / 8].circuit
    assert np.allclose(fresh.stage("previous_token").scores, res[2 / 8].stage("previous_token").scores)


def test_queries_and_values_channels_and_bad_stages(planted):
    model, task = planted
    zc, zr = P.record_z(model, task.clean), P.record_z(model, task.corrupt)
    ld_clean = P.run_ld(model, task.clean, task.good, task.bad)
    # the previous-token head feeds only the induction head's keys: nothing flows into its queries/values
    for ch in ("q", "v"):
        ld = path_patch(model, task, [PREV], [IND], ch, zc, zr)
        assert torch.allclose(ld[:, 0], ld_clean, atol=1e-5)
    ld_k = path_patch(model, task, [PREV, DISTRACTOR], [IND], "k", zc, zr)
    assert ld_k[0, 0] < ld_clean[0] - 1.0 and torch.allclose(ld_k[:, 1], ld_clean, atol=1e-5)
    with pytest.raises(InputError):
        Stage("x", None, "q")
    with pytest.raises(InputError):
        path_patching_circuit(model, task, (Stage("a", "b", "k"),))
    with pytest.raises(InputError):
        path_patch(model, task, [PREV], None, "k", zc, zr)


def test_models_without_separate_projections_are_refused(tiny_gpt2):
    from analyses.circuits.path_patching import head_inputs

    with pytest.raises(InputError, match="q_proj"):
        head_inputs(tiny_gpt2, "k")


def test_path_overlap_of_two_runs(planted):
    from analyses.circuits.path_patching import path_overlap, resampled_circuit

    model, task = planted
    r = path_patching_circuit(model, task, INDUCTION_STAGES, frac=1 / 8, shortlist=None)
    assert resampled_circuit(r, [0], 8) == set(r.circuit)
    same = path_overlap(r, r, 8, n_boot=20)
    assert same["jaccard"]["estimate"] == 1.0 and same["overlap_coefficient"]["lo"] == 1.0
    assert same["jaccard"]["null_mean"] < 0.5 and same["jaccard"]["p_null"] < 0.1


def test_the_circuits_scan_path_patches_each_task_at_2_and_5_percent(tiny_llama, tmp_path):
    """The scan's ``paths`` stage: EAP-IG shortlist -> path patching, both fracs, faithfulness vs random
    heads, pairwise overlap with both denominators, saved and reloaded, resumed without recomputing."""
    from analyses.circuits import CIRCUITS, CircuitsConfig, CircuitsResult
    from analyses.circuits.paths import FRACS, N_RANDOM, TASK_STAGES
    from analyses.runner import run

    cfg = CircuitsConfig(tasks=("induction", "greater_than"), n=3, ig_steps=1, n_boot=10, shortlist=4)
    r = run(CIRCUITS, tiny_llama, cfg, store=tmp_path, progress=False)
    p = r.paths
    assert set(p.circuits) == {"induction", "greater_than"} and all(set(b) == set(FRACS) for b in p.circuits.values())
    for task, by in p.circuits.items():
        rank = np.abs(r.task(task).effects["eap_ig"].mean(0))
        first = by[0.02].stages[0]
        assert [s.name for s in by[0.02].stages] == [s.name for s in TASK_STAGES[task]]
        best = sorted(HeadId(l, h) for l, h in zip(*np.unravel_index(np.argsort(-rank, axis=None)[:4], rank.shape)))
        assert list(first.candidates) == best                  # stage 1 path patches the EAP-IG shortlist
        assert all(len(s.selected) <= 1 for s in by[0.02].stages)    # 2% of 8 heads: one per stage
        fa = p.faithfulness[task]["0.02"]
        assert {"kept_normalised", "removed", "random_control", "ci", "vs_random"} <= set(fa)
        draws = fa["random_control"]["draws"]
        assert len(draws) == N_RANDOM and fa["vs_random"]["kept_normalised"]["n_draws"] == N_RANDOM
        assert all(not set(d["heads"]) & {str(h) for h in by[0.02].circuit} for d in draws)
        assert fa["random_control"]["kept_normalised"] == pytest.approx(np.mean([d["kept_normalised"] for d in draws]))
        vs = fa["vs_random"]["kept_normalised"]
        assert vs["estimate"] == pytest.approx(fa["kept_normalised"] - fa["random_control"]["kept_normalised"])
        assert vs["lo"] <= vs["estimate"] <= vs["hi"] and vs["n"] == 3
        lo, hi = fa["ci"]["kept_normalised"]
        assert lo <= fa["kept_normalised"] <= hi
    assert set(p.overlap.metric) == {"jaccard", "overlap_coefficient"} and set(p.overlap.frac) == set(FRACS)
    tab = p.table()
    assert {"kept_normalised lo", "kept_normalised hi", "kept_normalised - random lo", "random_draws"} <= set(tab)
    assert (tab["kept_normalised lo"] <= tab["kept_normalised"] + 1e-9).all() and (tab.random_draws == N_RANDOM).all()
    assert (p.overlap.lo <= p.overlap.value + 1e-9).all() and (p.overlap.value <= p.overlap.hi + 1e-9).all()
    assert {"path_induction", "path_jaccard_induction_greater_than"} <= set(r.summary())
    roles = r.stage_roles()                                 # the induction task's stages -> their classes' scores
    ind = roles[roles.task == "induction"]
    assert set(ind.role) == {"induction", "previous_token"} and set(roles.task) == {"induction"}
    for row in ind.itertuples():
        h, a = HeadId.parse(row.head), np.asarray(r.roles_scores[row.role])
        assert row.role_score == pytest.approx(a[h.layer, h.head]) and row.role_rank == (a > row.role_score).sum() + 1
    back = CircuitsResult.load(tmp_path)
    assert back.paths.table().equals(p.table()) and back.stage_roles().equals(roles)
    assert back.plot("paths", task="induction").data
    unit = tmp_path / "units" / "paths"
    stamps = {f.name: f.stat().st_mtime_ns for f in unit.iterdir()}
    run(CIRCUITS, tiny_llama, cfg, store=tmp_path, progress=False)
    assert {f.name: f.stat().st_mtime_ns for f in unit.iterdir()} == stamps


def test_fused_qkv_families_get_the_logits_stage_only(tiny_gpt2):
    from analyses.circuits.paths import stages_for

    assert [s.name for s in stages_for(tiny_gpt2, "ioi")] == ["name_movers"]


def test_the_shipped_path_patching_run_opens_with_its_intervals():
    """data/circuits/smollm2-135m (the README's run): >= 3 tasks, >= 8 prompt pairs, both fracs, each circuit's
    faithfulness with an interval and 10 random draws, the overlap with both denominators and the null."""
    from analyses import registry
    from analyses.circuits.paths import FRACS, N_RANDOM
    from analyses.data import data_dir

    res = registry.load_result(data_dir() / "circuits" / "smollm2-135m")
    p = res.paths
    assert res.model_id == "smollm2-135m" and len(p.circuits) >= 3 and {"ioi", "induction"} <= set(p.circuits)
    tab = p.table()
    assert (tab.n_prompts >= 8).all() and set(tab.frac) == set(FRACS) and (tab.random_draws == N_RANDOM).all()
    assert (tab["kept_normalised lo"] <= tab["kept_normalised"]).all()
    assert (tab["kept_normalised"] <= tab["kept_normalised hi"]).all()
    assert set(p.overlap.metric) == {"jaccard", "overlap_coefficient"} and p.overlap.null_mean.notna().all()
    ioi = p.circuits["ioi"][0.02]
    assert [s.name for s in ioi.stages] == ["name_movers", "s_inhibition", "induction_duplicate", "previous_token"]
    assert all(len(s.selected) == 5 for s in ioi.stages)            # 2% of 270 heads per stage
    assert set(res.stage_roles().stage) >= {"name_movers", "s_inhibition", "previous_token"}
    stats = res.summary()
    assert all(stats[f"path_{t}"].ci is not None and stats[f"path_{t}"].n >= 8 for t in p.circuits)
    import pandas as pd                                     # the CSV copies beside it are the result's frames

    folder = data_dir() / "circuits" / "smollm2-135m"
    keys = ["task", "stage", "head", "role", "role_rank"]
    assert pd.read_csv(folder / "stage_roles.csv")[keys].equals(res.stage_roles()[keys])
    assert pd.read_csv(folder / "paths_circuits.csv")["circuit"].tolist() == tab["circuit"].tolist()
    assert pd.read_csv(folder / "paths_overlap.csv")["value"].round(9).tolist() == p.overlap["value"].round(9).tolist()
    assert res.repair is not None and not p.works("colored_objects")     # flagged: the model fails the task
    assert pd.read_csv(folder / "repair.csv")["heads"].fillna("").tolist() == res.repair.table()["heads"].tolist()
