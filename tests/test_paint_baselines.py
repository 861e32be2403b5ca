"""Grounding (issue 18): PAINT span selection covers passage tokens only; honest baselines; mitigation wiring."""
import numpy as np
import pytest
import torch

from analyses.grounding.baselines import ORDER, baseline_table, fitted_baseline_auroc, honest_baselines
from analyses.grounding.data import build_items, split_of
from analyses.grounding.paint import (paint_for, paint_heads, paint_spec, passage_positions, select_tokens)
from probe.errors import InputError
from probe.heads import HeadId


def test_item_passages_exclude_instructions_question_and_header():
    items = build_items()
    assert {it.template_id for it in items} == {0, 1, 2, 3, 4}
    for it in items[::7]:
        a, b = it.passage
        passage, rest = it.prompt[a:b], it.prompt[:a] + it.prompt[b:]
        assert it.passage_value in passage and "?" not in passage and "\n" not in passage
        assert not passage.startswith(("Passage:", "Note:")) and passage.endswith(".")
        assert "Q" in rest or "Question" in rest


def test_enough_held_out_items_for_mitigation_split_by_fact():
    items = build_items()
    held = [it for it in items if split_of(it) == "heldout"]
    assert len([it for it in held if it.template_id in (1, 2, 3, 4)]) >= 300
    assert not {it.fact_id for it in held} & {it.fact_id for it in items if split_of(it) == "train"}
    assert [it.item_id for it in build_items()[:900]] == [it.item_id for it in items[:900]]   # old order kept
    assert items[899].item_id == "f35a4t4" and items[900].fact_id == 36     # new facts come after every old item


def test_passage_positions_cover_the_passage_tokens_only(tiny_llama):
    tok = tiny_llama.tokenizer
    for it in build_items()[:5]:
        pos = passage_positions(tok, it.prompt, it.passage)
        ids = tiny_llama.encode(it.prompt)[0].tolist()
        assert tok.decode([ids[p] for p in pos]) == it.prompt[it.passage[0]:it.passage[1]]   # byte tokens: exact
        assert pos == list(range(pos[0], pos[-1] + 1))
    with pytest.raises(InputError):
        passage_positions(tok, "abc", (2, 2))


def test_select_tokens_code_and_rest_readings_by_hand():
    # 4 layers, 1 head, 8 keys; passage = keys 2..6
    attn = torch.zeros(4, 1, 8)
    attn[0, 0] = torch.tensor([9, 9, 5, 1, 4, 2, 3, 0.])     # layer 0: passage ranks 2 > 4 > 6 > 5 > 3
    attn[2, 0] = torch.tensor([0, 0, 1, 1, 1, 1, 9, 0.])     # layer L-2 = 2: key 6 is an IQR outlier
    attn[3, 0] = torch.tensor([0, 0, 0, 8, 0, 0, 0, 0.])
    top, summ = select_tokens(attn, [2, 3, 4, 5, 6], top_frac=0.4)                 # 2 of 5 most attended
    assert (top, summ) == ([2, 4], [6])
    top, summ = select_tokens(attn, [2, 3, 4, 5, 6], top_frac=0.6)                 # 2, 4, 6 minus summary 6
    assert (top, summ) == ([2, 4], [6])
    top, rest = select_tokens(attn, [2, 3, 4, 5, 6], reading="rest", top_frac=0.4)  # mean of layers 2..3
    assert top == [3, 6] and rest == [2, 4, 5]
    assert not any(p in (0, 1, 7) for p in top + rest + summ)                       # never outside the passage
    with pytest.raises(InputError):
        select_tokens(attn, [2], reading="paper")


def test_paint_spec_is_two_last_row_boosts(tiny_llama):
    heads = [HeadId(1, 0), HeadId(1, 3)]
    spec = paint_spec(heads, [2, 3, 7], [5])
    (a, b) = spec.edits
    assert (a.alpha, a.spans, a.rows) == (0.7, ((2, 4), (7, 8)), "last") and (b.alpha, b.spans) == (0.3, ((5, 6),))
    assert a.heads == tuple(heads)
    with pytest.raises(InputError):
        paint_spec(heads, [2], [2])
    with pytest.raises(InputError, match="layers 2"):
        paint_heads(tiny_llama)
    smol_like = type("M", (), {"n_layers": 5, "n_heads": 2, "model_id": "m"})()
    assert paint_heads(smol_like) == [HeadId(l, h) for l in (2, 3, 4) for h in (0, 1)]


def test_paint_for_boosts_only_passage_keys(tiny_llama):
    it = build_items()[0]
    ids, spec, chosen = paint_for(tiny_llama, it.prompt, it.passage, heads=[HeadId(1, h) for h in range(4)])
    assert set(chosen["top"]) | set(chosen["rest"]) <= set(chosen["passage"])
    boosted = {p for e in spec.edits for a, b in e.spans for p in range(a, b)}
    assert boosted <= set(chosen["passage"]) and chosen["top"]
    from probe import intervene

    with torch.no_grad():
        plain = tiny_llama.hf(ids).logits[0, -1]
        with intervene(tiny_llama, spec):
            edited = tiny_llama.hf(ids).logits[0, -1]
    assert not torch.allclose(plain, edited)
    _, rest_spec, rest = paint_for(tiny_llama, it.prompt, it.passage, reading="rest", heads=[HeadId(1, 0)])
    assert sorted(rest["top"] + rest["rest"]) == rest["passage"]


def test_honest_baselines_learn_direction_and_expose_the_template():
    rng = np.random.default_rng(0)
    g = np.repeat([0, 1], 100)
    y = np.concatenate([(rng.random(100) < 0.8), (rng.random(100) < 0.2)]).astype(int)   # template predicts label
    X = 0.5 - 0.2 * y[:, None] + rng.normal(0, 0.05, (200, 3))                       # LOW ratio = grounded
    tr, te = np.arange(200) % 2 == 0, np.arange(200) % 2 == 1
    det = -X[te].mean(1)
    b = honest_baselines(X[tr], y[tr], g[tr], X[te], y[te], g[te], det, n_boot=200)
    assert list(b) == list(ORDER)
    assert b["template_only"]["estimate"] > 0.7                      # the template alone scores well ...
    assert b["mean_ratio_fixed"]["estimate"] < 0.2                   # fixed direction looks like worse than chance
    assert b["mean_ratio_fitted"]["estimate"] > 0.9                  # the fit learns the direction on train
    assert b["mean_ratio_direction_free"]["estimate"] == pytest.approx(1 - b["mean_ratio_fixed"]["estimate"])
    assert b["within_template_detector"]["estimate"] > 0.9 and b["template_only"]["n"] == 100
    assert baseline_table(b)["scorer"].tolist()[:2] == ["template_only", "within_template_detector"]
    assert fitted_baseline_auroc(X[tr], y[tr], X[te], y[te]) == pytest.approx(b["mean_ratio_fitted"]["estimate"])


def test_mitigation_with_paint_conditions(tiny_llama, tmp_path, monkeypatch):
    import pandas as pd

    from analyses.grounding import GROUNDING, GroundingConfig, mitigate, paint, run as stages
    from analyses.grounding.detector import Detector
    from analyses.runner import run_stage
    from analyses.units import UnitStore

    items = build_items()[:2]
    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    det = Detector(np.ones(L * H), 0.0, np.zeros(L * H), np.ones(L * H), L, H)
    monkeypatch.setattr(mitigate, "boost_heads", lambda d, k=None, how="top", seed=0:
                        [HeadId(1, h) for h in ((0, 1) if how == "top" else (2, 3))])
    monkeypatch.setattr(paint, "paint_heads", lambda m, heads=None: list(heads or [HeadId(1, h) for h in range(4)]))
    monkeypatch.setattr(stages, "mitigation_items", lambda cfg, df: items)
    df = pd.DataFrame({"item_id": [it.item_id for it in items], "split": "heldout", "answer": [" x", " y"],
                       "label": np.nan, "n_new": 1, "row_lr": [[0.5] * L * H] * len(items)})
    state = {"df": df, "detector": det, "stats": {"n_heldout": len(items)}}
    cfg = GroundingConfig(k=2, max_new_tokens=2, block=2, n_mitigate=2, boost="paint")
    m = run_stage(GROUNDING, GROUNDING.stage("mitigation"), tiny_llama, cfg, state, UnitStore(tmp_path)).mitigation
    g = m.set_index("condition")
    assert set(g.index) == {"greedy", "paint", "paint_top2", "paint_random2", "sampled", "guided"}
    assert g.loc["paint_top2", "control"] == "paint_random2" and g.loc["greedy", "p_greedy"] == 1.0
    assert ((g["p_greedy"] >= 0) & (g["p_greedy"] <= 1)).all()
    with pytest.raises(InputError, match="boost"):
        GroundingConfig(boost="everything")
    with pytest.raises(InputError, match="boost"):
        mitigate.conditions(det, 2, 0.3, boost="everything")
