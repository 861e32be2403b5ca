"""Retrieval heads (methods.md §1): scoring rule, success filter, planted copying head, resume, bad input."""
import json

import pytest
import torch

from analyses.retrieval import build_prompt, detect, head_scores, sample_events
from analyses.retrieval.harness import Needle, locate_span, rouge1_recall
from analyses.retrieval.scan import run_sample
from probe import families, load_model
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
    rotary = families.decoder(hf).rotary_emb  # a Llama: its RoPE, q/k projections and norms by name below
    with torch.no_grad():
        rotary.inv_freq.zero_()
        rotary.original_inv_freq.zero_()
        E = families.embedding(hf).weight
        s = float(E.std())  # keep the two planted dims at the embedding's own scale (no outlier token)
        E[:, 0], E[:, 1] = s, 0.0
        E[token, 1] = s
        for l, layer in enumerate(families.blocks(hf)):
            families.attention_out(hf, l).weight[:2] = 0
            layer.mlp.down_proj.weight[:2] = 0
        at = families.attention(hf, 0)
        families.block(hf, 0).input_layernorm.weight[:2] = 1.0
        at.q_proj.weight[head * dh:(head + 1) * dh] = 0
        at.q_proj.weight[head * dh, 0] = c
        for sib in range(g * model.n_heads // model.n_kv_heads, (g + 1) * model.n_heads // model.n_kv_heads):
            if sib != head:
                at.q_proj.weight[sib * dh] = 0
        at.k_proj.weight[g * dh] = 0
        at.k_proj.weight[g * dh, 1] = c
        families.final_norm(hf).weight.zero_()
        families.final_norm(hf).weight[0] = 1.0
        families.unembedding(hf).weight.zero_()
        families.unembedding(hf).weight[token, 0] = 1.0


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
    kw = dict(lengths=[200], depths=[0, 100], needles=["code"], max_new_tokens=3, mask=False, progress=False,
              png=False)
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


def test_fast_design_matches_generate_with_stats(tiny_llama):
    """Prefill of all but the last token + decode rows == probe's generate with the last prefill row."""
    from analyses.retrieval.decode import decode, prefill, stop_ids
    from probe import KeyGroup, generate_with_stats

    needle = Needle("code", "The secret code is 4817.", "What is the code?", "4817", "The secret code is")
    p = build_prompt(tiny_llama, needle, 150, 50, max_new_tokens=6)
    past = prefill(tiny_llama, p.ids)
    new, st = decode(tiny_llama, p.ids, past, max_new_tokens=6, span=(p.start, p.stop))
    again, _ = decode(tiny_llama, p.ids, past, max_new_tokens=6)       # the cropped cache is reusable
    ref = generate_with_stats(tiny_llama, p.ids, max_new_tokens=6, stats_in_prefill="last", stop_at_newline=True,
                              groups=[KeyGroup("answer", p.start, p.stop)])
    assert new == again == ref.new_ids[0].tolist() and len(stop_ids(tiny_llama)) > 0
    assert st.query_pos.tolist() == ref.stats.query_pos.tolist()
    assert torch.equal(st.argmax, ref.stats.argmax)


def test_masking_makes_the_planted_head_lose_its_events():
    from analyses.retrieval.decode import decode, prefill
    from probe import HeadId

    model = load_model("tiny-llama", device="cpu")
    needle = Needle("z", "The password is ZZZ.", "What is the password?", "ZZZ", "The password is")
    _plant_copy_head(model, head=1, token=model.tokenizer("Z", add_special_tokens=False).input_ids[0])
    p = build_prompt(model, needle, 200, 50, max_new_tokens=3)
    past, span = prefill(model, p.ids), (p.start, p.stop)
    ids = p.ids[0].tolist()
    events = {}
    for name, heads in (("none", []), ("top", [HeadId(0, 1)]), ("other", [HeadId(0, 3)])):
        new, st = decode(model, p.ids, past, max_new_tokens=3, span=span, heads=heads)
        events[name] = sample_events(st.argmax, st.query_pos, ids, new, span)
    assert events["none"][0, 1] > 0.5 and events["top"][0, 1] == 0.0      # uniform head: argmax leaves the span
    assert torch.equal(events["other"], events["none"])                  # masking another head changes nothing here


def test_masking_experiment_result_and_figures(tiny_llama, tmp_path):
    res = detect(tiny_llama, lengths=[220], depths=[0, 100], needles=["code"], k=2, seeds=[0, 1],
                 max_new_tokens=3, out=tmp_path, progress=False, png=False)
    assert set(res.masking["condition"]) == {"top", "random0", "random1"} and len(res.masking) == 6
    top = set(res.top)
    for heads in res.random_sets.values():
        assert len(heads) == 2 and not top & set(heads)                # drawn outside the top set
    assert res.masking.groupby("condition").size().eq(2).all()
    rates = res.masking_rates()
    assert set(rates) == {"none", "top", "random0", "random1"} and all(0 <= v <= 1 for v in rates.values())
    frame = res.to_frame()
    assert set(frame["metric"]) == {"retrieval_score", "is_retrieval"} and len(frame) == 2 * 2 * 4
    assert len(res.grouped()) == 2 * tiny_llama.n_kv_heads
    for kind in ("heads", "grouped", "masking"):
        assert res.plot(kind).data
    assert res.plot("niah", condition="random").data[0].z.shape == (2, 1)
    figs = json.loads((tmp_path / "figures.json").read_text())
    assert {"heads.html", "grouped.html", "niah_none.html", "niah_top.html", "niah_random.html"} <= set(figs)
    with pytest.raises(InputError):
        res.plot("pie")


def test_cli_scan_retrieval_resumes(tmp_path, capsys):
    from analyses.cli import main

    argv = ["scan", "retrieval", "--model", "tiny-llama", "--lengths", "220", "--depths", "50",
            "--needles", "code", "--k", "2", "--seeds", "0", "--max-new-tokens", "2", "--no-png", "--out", str(tmp_path)]
    assert main(argv) == 0
    stamp = {f: f.stat().st_mtime_ns for f in (tmp_path / "samples").glob("*.json")}
    assert main(argv) == 0 and "top heads" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "samples").glob("*.json")} == stamp  # nothing recomputed
    assert main(argv[:-2] + ["--depths", "150", "--out", str(tmp_path)]) == 2                # bad depth: typed error


@pytest.mark.slow
def test_embedded_model_scores_match_eager_patterns(smol, reference_patterns):
    """On SmolLM2: our events equal those from eager full patterns of prompt + answer."""
    needle = [n for n in __import__("analyses.retrieval.harness", fromlist=["x"]).load_needles() if n.name == "code"][0]
    rec = run_sample(smol, needle, 300, 50, max_new_tokens=6)
    p = build_prompt(smol, needle, 300, 50, max_new_tokens=6)
    new = rec["new_ids"]
    T = p.ids.shape[1]
    full = torch.cat([p.ids, torch.tensor([new])], 1)
    pat = reference_patterns(smol, full)                               # [layer, head, T+n, T+n]
    argmax = pat[:, :, T - 1:T - 1 + len(new)].argmax(-1)
    ref = sample_events(argmax, list(range(T - 1, T - 1 + len(new))), p.ids[0].tolist(), new, (p.start, p.stop))
    ours = torch.tensor(rec["events"])
    assert rec["success"] and ours.max() > 0.5
    assert (ours - ref).abs().max() <= 1e-6
