"""Retrieval heads (methods.md §1): scoring rule, success filter, planted copying head, resume, bad input."""
import json

import pytest
import torch

from analyses.retrieval import build_prompt, detect, head_scores, sample_events
from analyses.retrieval.harness import Needle, locate_span, rouge1_recall
from analyses.retrieval.scan import run_sample
from probe import load_model
from probe.errors import ContextLengthError, InputError


def test_argmax_in_span_with_matching_token_scores_one_over_span():
    prompt = [5, 6, 7, 8, 9, 10]            # span [2, 5) holds tokens 7, 8, 9
    new = [8, 7]                            # emitted tokens; rows at positions 5 (-> 8) and 6 (-> 7)
    argmax = torch.tensor([[[3, 2],          # head 0: in span, tokens match twice -> 2/3
                            [3, 3],          # head 1: in span, second row's token 8 != 7 -> 1/3
                            [0, 1],          # head 2: outside the span -> 0
                            [4, 4]]])        # head 3: in span but token 9 never emitted -> 0
    ev = sample_events(argmax, [5, 6], prompt, new, (2, 5))
    assert ev[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])


def test_outside_span_with_matching_token_is_not_an_event():
    prompt = [8, 6, 7, 8]                   # token 8 at 0 (outside) and 3 (inside span [2, 4))
    ev = sample_events(torch.tensor([[[0], [3]]]), [3], prompt, [8], (2, 4))
    assert ev[0].tolist() == [0.0, 0.5]


def test_consuming_row_reading_uses_the_next_row():
    prompt, new = [1, 2, 3, 4], [3, 3]
    argmax = torch.tensor([[[0, 2]]])       # row at pos 3 (produces w0) misses, row at pos 4 hits
    assert sample_events(argmax, [3, 4], prompt, new, (2, 3), row="producing").item() == pytest.approx(1.0)
    assert sample_events(argmax, [3, 4], prompt, new, (2, 3), row="consuming").item() == pytest.approx(1.0)
    argmax = torch.tensor([[[2, 0]]])
    assert sample_events(argmax, [3, 4], prompt, new, (2, 3), row="producing").item() == pytest.approx(1.0)
    assert sample_events(argmax, [3, 4], prompt, new, (2, 3), row="consuming").item() == 0.0
    with pytest.raises(InputError):
        sample_events(argmax, [3, 4], prompt, new, (2, 3), row="query")


def test_unsuccessful_samples_are_excluded():
    a, b = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    scores, n = head_scores([a, b, a * 0.5], [True, False, True])
    assert n == 2 and torch.allclose(scores, torch.full((2, 3), 0.75, dtype=torch.float64))
    scores, n = head_scores([a], [False])
    assert n == 0 and scores.abs().sum() == 0


def test_rouge1_recall():
    assert rouge1_recall("ride the yellow tram", "They ride the tram.") == pytest.approx(0.75)
    assert rouge1_recall("4817", "4817.") == 1.0 and rouge1_recall("4817", "4871") == 0.0


def _plant_copy_head(model, head: int, token: int, c: float = 30.0):
    """Make ``model`` always emit ``token`` and head (layer 0, ``head``) attend to keys holding it.

    Residual dim 0 is a constant 1 (nothing writes to it); residual dim 1 flags ``token``. RoPE is
    switched off so scores are pure content: head ``head`` queries dim 0 and its KV head keys on dim 1.
    """
    hf, dh = model.hf, model.d_head
    g = head // (model.n_heads // model.n_kv_heads)
    with torch.no_grad():
        hf.model.rotary_emb.inv_freq.zero_()
        hf.model.rotary_emb.original_inv_freq.zero_()
        E = hf.model.embed_tokens.weight
        s = float(E.std())  # keep the two planted dims at the embedding's own scale (no outlier token)
        E[:, 0], E[:, 1] = s, 0.0
        E[token, 1] = s
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[:2] = 0
            layer.mlp.down_proj.weight[:2] = 0
        at = hf.model.layers[0].self_attn
        hf.model.layers[0].input_layernorm.weight[:2] = 1.0
        at.q_proj.weight[head * dh:(head + 1) * dh] = 0
        at.q_proj.weight[head * dh, 0] = c
        for sib in range(g * model.n_heads // model.n_kv_heads, (g + 1) * model.n_heads // model.n_kv_heads):
            if sib != head:
                at.q_proj.weight[sib * dh] = 0
        at.k_proj.weight[g * dh] = 0
        at.k_proj.weight[g * dh, 1] = c
        hf.model.norm.weight.zero_()
        hf.model.norm.weight[0] = 1.0
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[token, 0] = 1.0


def test_planted_copying_head_is_detected():
    model = load_model("tiny-llama", device="cpu")  # a private copy: its weights are edited
    needle = Needle("z", "The password is ZZZ.", "What is the password?", "ZZZ", "The password is")
    token = model.tokenizer("Z", add_special_tokens=False).input_ids[0]
    _plant_copy_head(model, head=1, token=token)
    rec = run_sample(model, needle, 200, 50, max_new_tokens=4)
    assert model.tokenizer.decode(model.tokenizer("ZZZZ").input_ids) in rec["response"] or rec["response"] == "ZZZZ"
    ev = torch.tensor(rec["events"])
    span = rec["span"][1] - rec["span"][0]
    assert ev[0, 1].item() == pytest.approx(4 / span)   # one event per emitted token
    others = torch.cat([ev.flatten()[:1], ev.flatten()[2:]])
    assert (others < 0.1).all()                          # no other head copies


def test_resume_after_interruption_loses_nothing(tiny_llama, tmp_path, monkeypatch):
    kw = dict(lengths=[200], depths=[0, 100], needles=["code"], max_new_tokens=3, mask=False, progress=False)
    full = detect(tiny_llama, out=tmp_path / "a", **kw)
    import analyses.retrieval.scan as scan
    real, calls = scan.run_sample, []

    def dying(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(scan, "run_sample", dying)
    with pytest.raises(KeyboardInterrupt):
        detect(tiny_llama, out=tmp_path / "b", **kw)
    assert len(list((tmp_path / "b" / "samples").glob("*.json"))) == 1
    monkeypatch.setattr(scan, "run_sample", lambda *a, **k: calls.append(2) or real(*a, **k))
    resumed = detect(tiny_llama, out=tmp_path / "b", **kw)
    assert calls.count(2) == 1                      # only the unfinished cell ran again
    assert (resumed.scores == full.scores).all()
    assert resumed.samples["response"].tolist() == full.samples["response"].tolist()
    loaded = type(resumed).load(tmp_path / "b")
    assert (loaded.scores == resumed.scores).all() and len(loaded.to_frame()) == 2 * loaded.scores.size
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["n_samples"] == 2


def test_bad_inputs(tiny_llama):
    needle = Needle("code", "The secret code is 4817.", "What is the code?", "4817", "The secret code is")
    with pytest.raises(InputError, match="depth"):
        build_prompt(tiny_llama, needle, 200, 120)
    with pytest.raises(InputError, match="depth"):
        build_prompt(tiny_llama, needle, 200, -5)
    with pytest.raises(ContextLengthError, match="context"):
        build_prompt(tiny_llama, needle, 1000, 50)
    long = Needle("long", "The code is 4817. " + "x" * 300, "What?", "4817")
    with pytest.raises(InputError, match="needle"):
        build_prompt(tiny_llama, long, 200, 50)
    with pytest.raises(InputError, match="locate"):
        locate_span(tiny_llama.tokenizer, [1, 2, 3], "4817")
