"""Each edit against an independent hand computation; specs are removed afterwards, always."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probe import (CorruptFileError, HeadOutOfRangeError, InputError, InterventionSpec, MeanAblate, PatternEcho,
                   SinkCalibration, SpanBoost, SpanKnockout, Temperature, Uniform, ZeroAblate, apply, intervene, tap)
from probe import eager, families
from probe.eager import calibrate, compile_plan, detect_sinks


def qkv(B=1, H=2, KV=1, T=5, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g, dtype=torch.float64),
            torch.randn(B, KV, T, D, generator=g, dtype=torch.float64),
            torch.randn(B, KV, T, D, generator=g, dtype=torch.float64))


def manual(q, k, v, edit_scores=lambda s: s, chunk_free=True):
    """Plain dense attention with an optional score edit; output [B, T, H, D]."""
    H = q.shape[1]
    kk, vv = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    s = q @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = edit_scores(s)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return (p @ vv).transpose(1, 2), p


def run(q, k, v, *edits, chunk=2):
    plan = compile_plan(InterventionSpec(edits), 0, decoding=False)
    return eager.attend(q, k, v, scale=q.shape[-1] ** -0.5, q_pos=torch.arange(q.shape[2]), plan=plan, chunk=chunk)


def test_no_edit_equals_dense_attention():
    q, k, v = qkv(H=4, KV=2)
    out, _ = manual(q, k, v)
    assert torch.allclose(run(q, k, v), out)


def test_uniform_is_running_mean_of_values():
    q, k, v = qkv()
    out = run(q, k, v, Uniform(heads=["L0H1"]))
    running_mean = v[0, 0].cumsum(0) / torch.arange(1, 6, dtype=torch.float64)[:, None]
    assert torch.allclose(out[0, :, 1], running_mean)
    assert torch.allclose(out[0, :, 0], manual(q, k, v)[0][0, :, 0])  # other head untouched


def test_temperature():
    q, k, v = qkv()
    ref, _ = manual(q, k, v, lambda s: torch.cat([s[:, :1], s[:, 1:] / 2.5], 1))
    assert torch.allclose(run(q, k, v, Temperature(heads=["L0H1"], temperature=2.5)), ref)


def test_span_boost_all_rows_and_last_row():
    q, k, v = qkv()

    def boost(rows):
        def f(s):
            s = s.clone()
            z = s[:, 0, rows, 1:3]
            s[:, 0, rows, 1:3] = z + 0.7 * z.abs()
            return s
        return f

    assert torch.allclose(run(q, k, v, SpanBoost(heads=["L0H0"], spans=[(1, 3)], alpha=0.7)), manual(q, k, v, boost(slice(None)))[0])
    last = run(q, k, v, SpanBoost(heads=["L0H0"], spans=[(1, 3)], alpha=0.7, rows="last"))
    assert torch.allclose(last, manual(q, k, v, boost(slice(4, 5)))[0])


def test_span_knockout_never_empties_a_row():
    q, k, v = qkv()

    def knock(s):
        s = s.clone()
        s[:, 1, 1:, 0] = float("-inf")  # row 0 sees only key 0: it keeps it
        return s

    out = run(q, k, v, SpanKnockout(heads=["L0H1"], spans=[(0, 1)]))
    assert torch.allclose(out, manual(q, k, v, knock)[0])
    assert torch.isfinite(out).all()


def test_zero_and_mean_ablate():
    q, k, v = qkv(H=2)
    base, _ = manual(q, k, v)
    out = run(q, k, v, ZeroAblate(heads=["L0H0"]), MeanAblate(heads=["L0H1"], values=[torch.arange(4.0)]))
    assert torch.equal(out[0, :, 0], torch.zeros(5, 4, dtype=torch.float64))
    assert torch.equal(out[0, :, 1], torch.arange(4.0, dtype=torch.float64).expand(5, 4))
    patch = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(run(q, k, v, MeanAblate(heads=["L0H1"], values=[patch]))[0, :, 1], patch)


def test_edits_in_other_layers_or_phases_do_nothing():
    q, k, v = qkv()
    base = run(q, k, v)
    assert torch.equal(run(q, k, v, ZeroAblate(heads=["L1H0"])), base)
    assert torch.equal(run(q, k, v, ZeroAblate(heads=["L0H0"], phase="decode")), base)


# ----------------------------------------------------------------------------- ACT properties

rows = st.integers(2, 12).flatmap(lambda K: st.lists(st.floats(0.0, 1.0), min_size=K, max_size=K))


def _norm(x):
    t = torch.tensor(x, dtype=torch.float64) + 1e-3
    return t / t.sum()


@settings(max_examples=60, deadline=None)
@given(row=rows, beta=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_act_properties(row, beta, seed):
    p = _norm(row)
    K = p.shape[0]
    sinks = torch.rand(K, generator=torch.Generator().manual_seed(seed)) < 0.3
    out = calibrate(p, sinks, beta)
    assert torch.allclose(out.sum(), torch.tensor(1.0, dtype=torch.float64))
    if sinks.all() or not sinks.any():
        assert torch.allclose(out, p)
        return
    assert torch.allclose(out[sinks], beta * p[sinks])
    rest = ~sinks
    assert torch.allclose(out[rest] / out[rest].sum(), p[rest] / p[rest].sum())  # ratios kept
    assert torch.allclose(calibrate(p, sinks, 1.0), p)  # beta = 1 is the identity


def test_act_row_without_non_sink_mass_is_unchanged():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(calibrate(p, torch.tensor([True, True, False, False]), 0.4), p)


def test_detect_planted_sink_and_first_sink_untouched():
    T = 8
    p = torch.full((T, T), 0.0, dtype=torch.float64)
    for i in range(T):
        p[i, : i + 1] = 0.2 / (i + 1)
        p[i, 0] += 0.5
        p[i, min(i, 3)] += 0.3  # key 3 is a planted sink for rows >= 3
    col_sum, col_cnt = p.sum(0), torch.arange(T, 0, -1).double()
    sinks = detect_sinks(col_sum, col_cnt, SinkCalibration(heads=["L0H0"], tau=0.2, min_queries=3))
    assert sinks.nonzero().flatten().tolist() == [3]  # key 0 detected first and left alone
    q, k, v = qkv(T=T)
    out = run(q, k, v, SinkCalibration(heads=["L0H0"], beta=0.4, sinks=(0,)))
    ref, pref = manual(q, k, v)
    assert not torch.allclose(out[0, :, 0], ref[0, :, 0])


def test_act_in_engine_equals_formula():
    q, k, v = qkv(T=6)
    _, p = manual(q, k, v)
    edit = SinkCalibration(heads=["L0H0"], beta=0.4, tau=0.0, keep_first=True)
    counts = torch.arange(6, 0, -1).double()
    sinks = detect_sinks(p[0, 0].sum(0), counts, edit)
    want = calibrate(p[0, 0], sinks, 0.4) @ v[0, 0]
    assert torch.allclose(run(q, k, v, edit)[0, :, 0], want)


# ----------------------------------------------------------------------------- on models

def o_proj_hook(model, layer, head, fill):
    d = model.d_head

    def pre(mod, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = fill
        return (x,)

    return families.attention_out(model, layer).register_forward_pre_hook(pre)


def test_zero_ablate_matches_o_proj_hook(tiny_llama):
    ids = tiny_llama.encode("zero ablate")
    with intervene(tiny_llama, InterventionSpec([ZeroAblate(heads=["L1H2"])])), torch.no_grad():
        ours = tiny_llama.hf(ids).logits
    handle = o_proj_hook(tiny_llama, 1, 2, 0.0)
    try:
        with torch.no_grad():
            ref = tiny_llama.hf(ids).logits
    finally:
        handle.remove()
    assert torch.allclose(ours, ref, atol=1e-5)


def test_interventions_removed_even_after_errors(tiny_llama):
    ids = tiny_llama.encode("cleanup")
    with torch.no_grad():
        before = tiny_llama.hf(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(tiny_llama, InterventionSpec([Uniform(heads=["L0H0", "L1H3"])])):
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(tiny_llama.hf(ids).logits, before)
    assert tiny_llama.hf._headwise_rt.idle


def test_pattern_echo_copies_source_pattern(tiny_llama):
    seen = {}

    class Grab:
        layers = None

        def on_probs(self, layer, q_pos, probs):
            seen.setdefault(layer, []).append(probs.clone())

    ids = tiny_llama.encode("echo echo")
    spec = InterventionSpec([PatternEcho(heads=["L1H2"], source="L0H1")])
    with intervene(tiny_llama, spec), tap(tiny_llama, Grab()), torch.no_grad():
        tiny_llama.hf(ids)
    src = torch.cat(seen[0], 2)[0, 1]
    tgt = torch.cat(seen[1], 2)[0, 2]
    assert torch.equal(src, tgt)


def test_plain_hf_model_forward_and_generate(tiny_llama):
    from probe.models import tiny

    hf = tiny.tiny_llama()  # a plain HF model, never touched by headwise
    hf.set_attn_implementation("sdpa")
    ids = tiny_llama.encode("plain model")
    with torch.no_grad():
        base = hf(ids).logits
        base_gen = hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=258)
    spec = InterventionSpec([Uniform(heads=["L0H0", "L0H1", "L0H2", "L0H3"])])
    with intervene(hf, spec), torch.no_grad():
        edited = hf(ids).logits
        gen = hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=258)
    assert not torch.allclose(edited, base)
    assert not torch.equal(gen, base_gen) or not torch.allclose(edited[0, -1], base[0, -1])
    assert hf.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, base)
    handle = apply(hf, spec)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, edited)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, base)


def test_decode_phase_edit_leaves_prefill_alone(tiny_llama):
    ids = tiny_llama.encode("phase")
    spec = InterventionSpec([Uniform(heads=["L0H0", "L1H1"], phase="decode")])
    with torch.no_grad():
        base = tiny_llama.hf(ids).logits
        with intervene(tiny_llama, spec):
            assert torch.equal(tiny_llama.hf(ids).logits, base)


def test_batched_padded_edit_matches_single(tiny_llama):
    tok = tiny_llama.tokenizer
    tok.padding_side = "left"
    batch = tok(["a longer prompt", "short"], return_tensors="pt", padding=True)
    spec = InterventionSpec([Temperature(heads=["L0H1"], temperature=3.0)])
    with intervene(tiny_llama, spec), torch.no_grad():
        both = tiny_llama.hf(**batch).logits[:, -1]
        single = tiny_llama.hf(tiny_llama.encode("short")).logits[:, -1]
    assert torch.allclose(both[1], single[0], atol=1e-4)


def test_spec_json_and_validation(tiny_llama):
    spec = InterventionSpec([SinkCalibration(heads=["L1H0"], beta=0.5), SpanBoost(heads=["L0H3"], spans=[(0, 2)]),
                             MeanAblate(heads=["L0H0"], values=[torch.ones(16)]), PatternEcho(heads=["L1H1"], source="L0H0")])
    assert InterventionSpec.from_json(spec.to_json()) == spec
    with pytest.raises(HeadOutOfRangeError):
        InterventionSpec([ZeroAblate(heads=["L5H0"])]).validate(tiny_llama.layout)
    with pytest.raises(InputError, match="beta"):
        SinkCalibration(heads=["L0H0"], beta=1.5)
    with pytest.raises(InputError, match="earlier layer"):
        PatternEcho(heads=["L0H0"], source="L1H0")
    with pytest.raises(CorruptFileError):
        InterventionSpec.from_json('{"format": "headwise.interventions", "edits": [{"kind": "explode"}]}')
    with pytest.raises(InputError, match="L<layer>H<head>"):
        ZeroAblate(heads=["layer3"])


@pytest.mark.slow
def test_embedded_uniform_all_heads_changes_answer(smol):
    ids = smol.encode("When Mary and John went to the store, John gave a drink to")
    heads = [f"L{l}H{h}" for l in range(10, 30) for h in range(9)]
    with torch.no_grad():
        base = smol.hf(ids).logits[0, -1]
        with intervene(smol, InterventionSpec([Uniform(heads=heads)])):
            edited = smol.hf(ids).logits[0, -1]
        again = smol.hf(ids).logits[0, -1]
    assert smol.tokenizer.decode(base.argmax()) == " Mary"
    assert not torch.allclose(base, edited, atol=1e-2)
    assert torch.equal(base, again)


def test_gradients_flow_through_the_engine(tiny_llama):
    """Attribution patching needs d(metric)/d(head output) with the engine active."""
    grads = {}

    class Grad:
        layers = {1}

        def on_output(self, layer, q_pos, out):
            out.retain_grad()
            grads["z"] = out
            return out

    ids = tiny_llama.encode("gradients")
    with tap(tiny_llama, Grad()):
        logits = tiny_llama.hf(ids).logits
        logits[0, -1, 5].backward()
    z = grads["z"]
    assert z.grad is not None and z.grad.abs().sum() > 0
    # finite-difference check on one coordinate of head 2's output at the last position
    eps, idx = 1e-3, (0, ids.shape[1] - 1, 2, 3)

    class Nudge:
        layers = {1}

        def __init__(self, d):
            self.d = d

        def on_output(self, layer, q_pos, out):
            out = out.clone()
            out[idx] += self.d
            return out

    with torch.no_grad():
        vals = []
        for d in (eps, -eps):
            with tap(tiny_llama, Nudge(d)):
                vals.append(tiny_llama.hf(ids).logits[0, -1, 5])
    fd = (vals[0] - vals[1]) / (2 * eps)
    assert torch.allclose(fd, z.grad[idx], rtol=1e-2, atol=1e-4)
