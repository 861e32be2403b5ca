"""The family matrix: headwise is exact on every supported architecture, or refuses it.

Each family is a tiny seeded model (:func:`probe.models.tiny.tiny_family`: hidden 64, 3 layers,
weights redrawn so softcaps saturate, sinks and biases take mass and a 6-key sliding window is far
shorter than the prompt). Every check compares headwise with the family's own code: the plain
model, Hugging Face eager patterns (``output_attentions``), or a reference built from the modeling
file's own ``eager_attention_forward``. ``record_property`` logs each largest difference
(``pytest --junitxml=...`` turns them into the matrix table).
"""
import sys

import pytest
import torch

from probe import (InterventionSpec, KeyGroup, SinkCalibration, SpanBoost, SpanKnockout, StatsRequest, Temperature,
                   Uniform, UnsupportedModelError, ZeroAblate, collect_stats, families, generate_with_stats, install,
                   intervene, stream_stats)
from conftest import layer_windows as windows
from probe.models import Model, weights_fingerprint
from probe.models.tiny import BYPASSING, FAMILIES, WINDOW, tiny_family

SUPPORTED = [n for n in FAMILIES if n not in BYPASSING]
PROMPT = "The quick brown fox jumps over the lazy dog."
GROUPS = (KeyGroup("first", 0, 1), KeyGroup("mid", 8, 20), KeyGroup("tail", 30))
N_NEW = 8


@pytest.fixture(scope="module")
def zoo():
    """``zoo(name) -> (Model wrapped by headwise, plain HF twin never touched, tokenizer)``, built once each."""
    built = {}

    def get(name):
        if name not in built:
            hf, tok = tiny_family(name)
            plain, _ = tiny_family(name)
            rt = install(hf)
            model = Model(hf=hf, tokenizer=tok, model_id=f"tiny-{name}", source=name, layout=rt.layout, n_ctx=256,
                          weights_hash=weights_fingerprint(hf))
            built[name] = (model, plain, tok)
        return built[name]
    return get


def ids_of(tok, text=PROMPT):
    return tok(text, return_tensors="pt").input_ids


def eager_patterns(plain, ids) -> torch.Tensor:
    """``[L, H, T, T]`` float64 patterns from the family's own eager attention (the real pattern: a learned
    sink's share is what the rows miss)."""
    previous = plain.config._attn_implementation
    plain.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = plain(ids, output_attentions=True)
    finally:
        plain.set_attn_implementation(previous)
    return torch.stack(out.attentions)[:, 0].double()


def visible_counts(cfg, rows: range, n_keys: int) -> torch.Tensor:
    """``[L, K]``: how many of ``rows`` see each key (causal, within the layer's window)."""
    j = torch.arange(n_keys)[None, :]
    i = torch.tensor(list(rows))[:, None]
    out = []
    for w in windows(cfg):
        vis = (j <= i) & ((i - j < w) if w else True)
        out.append(vis.sum(0).double())
    return torch.stack(out)


def reference_stats(p: torch.Tensor, n_keys: int) -> dict:
    """Statistics of patterns ``[L, H, rows, K]`` computed directly (float64)."""
    pos = torch.arange(n_keys)
    gm = torch.stack([((pos >= g.start) & ((pos < g.stop) if g.stop else True)).double() for g in GROUPS])
    return {"entropy": -(p * p.clamp_min(1e-300).log()).sum(-1), "max_prob": p.max(-1).values,
            "group_mass": torch.einsum("lhqk,gk->lhqg", p, gm), "sink_mass": 1.0 - p.sum(-1),
            "received_sum": p.sum(2), "argmax": p.argmax(-1)}


def group_counts(cfg, rows: range, n_keys: int) -> torch.Tensor:
    """``[L, rows, G]``: keys of each group a row sees (causal, within the layer's window)."""
    j = torch.arange(n_keys)[None, :]
    i = torch.tensor(list(rows))[:, None]
    gm = torch.stack([((j[0] >= g.start) & ((j[0] < g.stop) if g.stop else True)).double() for g in GROUPS])
    return torch.stack([((j <= i) & ((i - j < w) if w else True)).double() @ gm.T for w in windows(cfg)])


def compare_stats(st, ref: dict, record, tag: str, atol=2e-5) -> None:
    worst = 0.0
    for key in ("entropy", "max_prob", "group_mass", "sink_mass", "received_sum"):
        got, want = getattr(st, key).double(), ref[key]
        if key == "received_sum":
            got = got[..., :want.shape[-1]]
        diff = float((got - want).abs().max())
        worst = max(worst, diff)
        assert diff <= atol, f"{tag}: {key} differs by {diff:.3g}"
    ties = (st.argmax != ref["argmax"])
    assert float(ties.float().mean()) < 0.01, f"{tag}: argmax differs on {int(ties.sum())} rows"
    record(tag, worst)


# ----------------------------------------------------------------------------- the matrix

@pytest.mark.parametrize("name", SUPPORTED)
def test_plain_forward_is_the_models_own(zoo, name, record_property):
    """Idle, and for unobserved unedited layers inside intervene(): bit-identical to the unwrapped model."""
    model, plain, tok = zoo(name)
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(model.hf(ids).logits, plain(ids).logits)
        ours, theirs = _greedy(model.hf, ids), _greedy(plain, ids)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))  # decode steps against the cache too
        last = model.n_layers - 1
        with intervene(model, InterventionSpec([ZeroAblate(heads=[(last, 1)])])):
            edited = model.hf(ids, output_hidden_states=True)
        ref = plain(ids, output_hidden_states=True)
    for l in range(last):  # every layer before the edited one runs the model's own attention
        assert torch.equal(edited.hidden_states[l + 1], ref.hidden_states[l + 1]), f"layer {l}"
    assert not torch.equal(edited.logits, ref.logits)
    record_property("idle_max_diff", 0.0)


def _greedy(hf, ids, n=N_NEW):
    from probe.compat import output_cache, with_cache

    out = hf(ids, use_cache=True)
    logits, past = [out.logits[:, -1]], output_cache(out)
    for _ in range(n):
        nxt = out.logits[:, -1:].argmax(-1)
        out = hf(nxt, **with_cache(hf, past), use_cache=True)
        logits.append(out.logits[:, -1])
        past = output_cache(out)
    return logits


@pytest.mark.parametrize("name", SUPPORTED)
def test_prefill_statistics_equal_eager_patterns(zoo, name, record_property):
    model, plain, tok = zoo(name)
    ids = ids_of(tok)
    T = ids.shape[1]
    assert T > 4 * WINDOW
    st = stream_stats(model, ids, groups=GROUPS, verbose=False)
    p = eager_patterns(plain, ids)
    compare_stats(st, reference_stats(p, T), record_property, "prefill_max_diff")
    assert torch.equal(st.received_count.double(), visible_counts(plain.config, range(T), T))
    assert torch.equal(st.group_count.double(), group_counts(plain.config, range(T), T))
    if name == "gpt_oss":
        assert float(st.sink_mass.mean()) > 0.05  # the sinks take real mass: rows of the real pattern sum below 1


@pytest.mark.parametrize("name", SUPPORTED)
def test_decode_statistics_past_the_window(zoo, name, record_property):
    """Decode rows against the KV cache (a sliding-window cache holds only the last keys) = a full recompute."""
    model, plain, tok = zoo(name)
    ids = ids_of(tok)
    T = ids.shape[1]
    gen = generate_with_stats(model, ids, max_new_tokens=N_NEW, groups=GROUPS, stats_in_prefill="last")
    assert gen.n_new == N_NEW and gen.stats.query_pos.tolist() == list(range(T - 1, T - 1 + N_NEW))
    full = torch.cat([ids, gen.new_ids], 1)[:, :-1]
    p = eager_patterns(plain, full)[:, :, T - 1:]
    compare_stats(gen.stats, reference_stats(p, full.shape[1]), record_property, "decode_max_diff")
    want = visible_counts(plain.config, range(T - 1, full.shape[1]), full.shape[1])
    assert torch.equal(gen.stats.received_count.double()[:, :want.shape[1]], want)
    assert torch.equal(gen.stats.group_count.double(), group_counts(plain.config, range(T - 1, full.shape[1]),
                                                                    full.shape[1]))


def reference_attention(edits: dict):
    """An attention function built from the modeling file's own eager attention, with hand-made edits.

    ``edits``: ``{"zero": {(l, h)}, "uniform": {(l, h)}, "act": {(l, h): (beta, tau)}}``.
    """
    def attention(module, query, key, value, attention_mask, **kwargs):
        own = sys.modules[type(module).__module__].eager_attention_forward
        layer = module.layer_idx
        uni = [h for l, h in edits.get("uniform", ()) if l == layer]
        if uni:
            query = query.clone()
            query[:, uni] = 0.0  # Wu et al.'s masking: the head's query set to 0
        out, weights = own(module, query, key, value, attention_mask, **kwargs)
        out = out.clone()
        group = query.shape[1] // key.shape[1]
        for (l, h), (beta, tau) in edits.get("act", {}).items():
            if l == layer:
                out[:, :, h] = _act(weights[:, h].double(), attention_mask, beta, tau) @ value[:, h // group].double()
        for l, h in edits.get("zero", ()):
            if l == layer:
                out[:, :, h] = 0.0
        return out, weights
    return attention


def _act(w: torch.Tensor, mask: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """ACT (Yu et al. 2024) by hand on patterns ``[B, Tq, K]``: sinks = column mean > tau, first one spared."""
    vis = (mask > torch.finfo(mask.dtype).min / 2)[:, 0].double()
    out = w.clone()
    for b in range(w.shape[0]):
        mean = w[b].sum(0) / vis[b].sum(0).clamp(min=1)
        sinks = torch.nonzero(mean > tau).flatten()[1:]
        if len(sinks) == 0:
            continue
        s = torch.zeros(w.shape[-1], dtype=torch.bool)
        s[sinks] = True
        m, r = (w[b] * s).sum(-1, keepdim=True), (w[b] * ~s).sum(-1, keepdim=True)
        scaled = torch.where(s, beta * w[b], w[b] * (1 + (1 - beta) * m / r.clamp(min=1e-300)))
        out[b] = torch.where(r > 0, scaled, w[b])
    return out


def _with_reference(plain, edits):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    name = f"reference_{id(edits)}"
    AttentionInterface.register(name, reference_attention(edits))
    AttentionMaskInterface.register(name, eager_mask)
    previous = plain.config._attn_implementation
    plain.set_attn_implementation(name)
    return previous


@pytest.mark.parametrize("name", SUPPORTED)
def test_edits_equal_a_reference_from_the_modeling_file(zoo, name, record_property):
    """Zero-ablation, uniform (query := 0) and ACT, in prefill and every decode step (past the window)."""
    model, plain, tok = zoo(name)
    ids = ids_of(tok)
    last = model.n_layers - 1
    spec = InterventionSpec([ZeroAblate(heads=[(0, 1), (last, 2)]), Uniform(heads=[(1, 0), (0, 3)]),
                             SinkCalibration(heads=[(last, 1), (0, 2)], beta=0.4, tau=0.1)])
    edits = {"zero": {(0, 1), (last, 2)}, "uniform": {(1, 0), (0, 3)},
             "act": {(last, 1): (0.4, 0.1), (0, 2): (0.4, 0.1)}}
    with torch.no_grad(), intervene(model, spec):
        ours = _greedy(model.hf, ids)
    previous = _with_reference(plain, edits)
    try:
        with torch.no_grad():
            ref = _greedy(plain, ids)
    finally:
        plain.set_attn_implementation(previous)
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, ref))
    record_property("edits_max_rel_diff", worst)
    assert worst < 1e-4
    with torch.no_grad():
        assert float((plain(ids).logits[:, -1] - ref[0]).abs().max()) > 1e-2  # the edits changed something


@pytest.mark.parametrize("name", SUPPORTED)
def test_left_padded_rows_equal_single_rows(zoo, name, record_property):
    """A left-padded batch (position ids skip the pads) with position-indexed edits = each row alone."""
    model, plain, tok = zoo(name)
    texts = [PROMPT, "A short one."]
    enc = [ids_of(tok, t)[0] for t in texts]
    T = max(len(e) for e in enc)
    pad = tok.pad_token_id
    ids = torch.full((2, T), pad)
    mask = torch.zeros(2, T, dtype=torch.long)
    for r, e in enumerate(enc):
        ids[r, T - len(e):], mask[r, T - len(e):] = e, 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    last = model.n_layers - 1
    spec = InterventionSpec([SpanBoost(heads=[(0, 0)], spans=[(0, 3)], alpha=0.5),
                             SinkCalibration(heads=[(last, 1)], beta=0.3, sinks=(0, 2)),
                             Temperature(heads=[(1, 2)], temperature=2.0), ZeroAblate(heads=[(last, 3)])])
    worst = 0.0
    with torch.no_grad(), intervene(model, spec):
        both = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        for r, e in enumerate(enc):
            alone = model.hf(e[None]).logits[:, -1]
            diff = float((both[r] - alone[0]).abs().max() / alone.abs().max())
            worst = max(worst, diff)
    record_property("padded_max_rel_diff", worst)
    assert worst < 1e-4


@pytest.mark.parametrize("name", BYPASSING)
def test_models_that_bypass_attention_interface_are_refused(name):
    hf, tok = tiny_family(name)
    ids = ids_of(tok)
    with torch.no_grad():
        before = hf(ids).logits
    with pytest.raises(UnsupportedModelError, match=f"{type(hf).__name__} computes attention without"):
        install(hf)
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        with intervene(hf, InterventionSpec([ZeroAblate(heads=["L0H0"])])):
            pass
    assert not hasattr(hf, "_headwise_rt")
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, before)  # the refused model is left exactly as it was


# ----------------------------------------------------------------------------- positions against a window

def test_knockout_of_a_token_outside_the_window_does_nothing_in_decode(zoo):
    """Mistral decoding past its 6-key window: position 0 is gone from the cache, so knocking it out is a no-op;
    a position still in the window changes the next-token logits."""
    model, _, tok = zoo("mistral")
    ids = ids_of(tok)
    T = ids.shape[1]
    heads = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    with torch.no_grad():
        base = _greedy(model.hf, ids, n=3)
        with intervene(model, InterventionSpec([SpanKnockout(heads=heads, spans=[(0, 1)], phase="decode")])):
            gone = _greedy(model.hf, ids, n=3)
        with intervene(model, InterventionSpec([SpanKnockout(heads=heads, spans=[(T - 2, T - 1)], phase="decode")])):
            kept = _greedy(model.hf, ids, n=3)
    assert max(float((a - b).abs().max()) for a, b in zip(base, gone)) < 1e-4  # (the engine vs SDPA: rounding only)
    assert float((kept[1] - base[1]).abs().max()) > 1e-2


def test_statistics_collect_real_positions_in_a_long_decode(zoo):
    """Argmax and received columns address token positions: nothing lands outside the window's positions."""
    model, _, tok = zoo("mistral")
    ids = ids_of(tok)
    T = ids.shape[1]
    gen = generate_with_stats(model, ids, max_new_tokens=N_NEW)
    rows = gen.stats.query_pos
    assert bool(((gen.stats.argmax <= rows) & (gen.stats.argmax > rows - WINDOW)).all())
    assert float(gen.stats.received_sum[..., :T - WINDOW].abs().max()) == 0.0


# ----------------------------------------------------------------------------- arguments, refusals, records

class Attn(torch.nn.Module):
    """A stand-in attention module (what the functions receive as ``module``)."""

    layer_idx = 0


def qkv(B=1, H=2, KV=1, T=6, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, T, D, generator=g, dtype=torch.float64) for n in (H, KV, KV))


def test_unknown_attention_arguments_are_refused_by_name():
    from probe.call import PASSIVE, parse_call

    q, k, _ = qkv()
    with pytest.raises(UnsupportedModelError, match="Attn passes the attention argument 'alibi_slopes'"):
        parse_call(Attn(), q, k, None, {"alibi_slopes": torch.ones(2)})
    call = parse_call(Attn(), q, k, None, {**{name: True for name in PASSIVE}, "something_new": None})
    assert call.n_keys == 6 and not call.decoding


@pytest.mark.parametrize("case, match", [
    ("dropout", "model.eval"), ("block_mask", "flex"), ("flash_mask", "sdpa"), ("bidirectional", "bidirectional"),
    ("packed", "packed"), ("window_without_positions", "position_ids"), ("padding_without_positions", "padded")])
def test_calls_the_engine_cannot_compute_exactly_are_refused(case, match):
    from probe.call import parse_call

    q, k, _ = qkv(T=6)
    kwargs, mask = {}, None
    if case == "dropout":
        kwargs = {"dropout": 0.1}
    elif case == "block_mask":
        mask = type("BlockMask", (), {"shape": (1, 1, 6, 6)})()
    elif case == "flash_mask":
        mask = torch.ones(1, 6, dtype=torch.bool)
    elif case == "bidirectional":
        mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    elif case == "packed":
        kwargs = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}
    elif case == "padding_without_positions":
        mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
        mask[..., :2] = False  # two pads on the left, and no position ids to say where the tokens start
    else:
        kwargs = {"sliding_window": 4}
    with pytest.raises(UnsupportedModelError, match=match):
        parse_call(Attn(), q, k, mask, kwargs)


def manual_attention(q, k, v, scaling, mask, softcap=None, bias=None, sinks=None):
    """Dense reference in the model's own order: scale, softcap, bias, mask, softmax (with a sink logit)."""
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    vv = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ kk.transpose(-1, -2) * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1).double()], -1)
    p = torch.softmax(s, -1)[..., :kk.shape[2]]
    return (p @ vv).transpose(1, 2), p


def test_softcap_bias_sinks_and_float_masks_in_the_models_order():
    from probe import eager
    from probe.call import parse_call

    q, k, v = qkv(H=4, KV=2, T=7)
    q = q * 3
    T = 7
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    g = torch.Generator().manual_seed(1)
    pb = torch.randn(1, 4, T, T, generator=g, dtype=torch.float64)
    extra = torch.randn(1, 1, T, T, generator=g, dtype=torch.float64)
    float_mask = torch.where(causal, extra, torch.finfo(torch.float64).min)  # an additive mask carrying a bias
    sinks = torch.tensor([0.5, 2.0, -1.0, 1.0])
    call = parse_call(Attn(), q, k, float_mask, {"scaling": 0.3, "softcap": 1.5, "position_bias": pb, "s_aux": sinks})
    seen = []
    out = eager.attend(q, k, v, call=call, chunk=3, on_chunk=lambda c: seen.append((c.probs.clone(), c.sink.clone())))
    ref, p = manual_attention(q, k, v, 0.3, causal, 1.5, pb + extra, sinks)
    torch.testing.assert_close(out, ref)
    probs, sink = (torch.cat(x, 2) for x in zip(*seen))
    torch.testing.assert_close(probs, p)
    torch.testing.assert_close(sink + probs.sum(-1), torch.ones_like(sink))  # the sink's share, reported


@pytest.mark.parametrize("kind", ["sliding", "chunked", "padded"])
def test_masks_built_by_transformers_are_the_truth(kind):
    """Sliding-window, chunked (Llama 4) and left-padded masks, as transformers builds them, in the engine."""
    from transformers.masking_utils import (chunked_causal_mask_function, sdpa_mask,
                                            sliding_window_causal_mask_function)

    from probe import eager
    from probe.call import parse_call

    T = 9
    q, k, v = qkv(B=2, H=2, KV=1, T=T)
    pad = torch.ones(2, T, dtype=torch.bool)
    fn = {"sliding": sliding_window_causal_mask_function(3),
          "chunked": chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))}.get(kind)
    if kind == "padded":
        pad[1, :3] = False
    mask = sdpa_mask(batch_size=2, q_length=T, kv_length=T, attention_mask=pad, allow_is_causal_skip=False,
                     **({"mask_function": fn} if fn else {}))
    pos = (pad.long().cumsum(1) - 1).clamp(min=0)
    call = parse_call(Attn(), q, k, mask, {"position_ids": pos})
    out = eager.attend(q, k, v, call=call, chunk=4)
    ref, _ = manual_attention(q, k, v, 8 ** -0.5, mask)
    real = mask.any(-1)[:, 0]  # rows that see a key (padding rows give zeros here, NaN in the dense reference)
    torch.testing.assert_close(out[real], ref[real])
    assert call.k_pos.tolist()[1][:4] == ([-3, -2, -1, 0] if kind == "padded" else [0, 1, 2, 3])


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_static_caches_map_to_the_same_positions(zoo, name):
    """A static cache (free slots after the queries; for sliding layers a rolling buffer): same statistics."""
    model, _, tok = zoo(name)
    ids = ids_of(tok, "The quick brown fox jumps over")
    T = ids.shape[1]
    req = dict(groups=(KeyGroup("a", 0, 3), KeyGroup("b", T - 4, T + 2)))
    got = {}
    for impl in ("dynamic", "static"):
        with torch.no_grad(), collect_stats(model, StatsRequest(**req)) as c:
            got[impl] = (model.hf.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation=impl,
                                           pad_token_id=tok.pad_token_id), c.result())
    (a, sa), (b, sb) = got["dynamic"], got["static"]
    assert torch.equal(a, b) and torch.equal(sa.query_pos, sb.query_pos) and torch.equal(sa.argmax, sb.argmax)
    K = sa.received_sum.shape[-1]
    torch.testing.assert_close(sa.group_mass, sb.group_mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sa.received_sum, sb.received_sum[..., :K], atol=1e-5, rtol=1e-5)
    assert torch.equal(sa.received_count, sb.received_count[..., :K])


def test_engine_refused_where_it_cannot_reproduce_the_model(monkeypatch):
    """A family whose eager function computes something its arguments do not say: plain forwards stay exact,
    statistics and edits are refused up front."""
    from transformers.models.llama import modeling_llama

    from probe.models.tiny import tiny_llama

    real = modeling_llama.eager_attention_forward

    def doubled(*args, **kwargs):
        out, weights = real(*args, **kwargs)
        return out * 2, weights

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", doubled)
    hf = tiny_llama()
    hf.set_attn_implementation("eager")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = hf(ids).logits
        rt = install(hf)
        assert rt.native == "eager" and "does not reproduce LlamaAttention" in rt.refusal
        assert torch.equal(hf(ids).logits, before)
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        with collect_stats(hf):
            pass


def test_the_native_implementation_is_recorded_once(zoo):
    model, plain, tok = zoo("gpt_oss")  # gpt-oss has no SDPA path (sinks): its own eager function is the native
    rt = model.hf._headwise_rt
    assert rt.native == "eager" and model.hf.config._attn_implementation == "headwise_eager"
    previous = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")  # switched away, e.g. for a reference: install puts it back
    assert install(model.hf) is rt and model.hf.config._attn_implementation == previous and rt.native == "eager"


def test_unedited_heads_of_an_edited_layer_are_the_models_own(zoo):
    model, plain, tok = zoo("llama")
    ids = ids_of(tok)
    D = model.d_head
    got = {}

    def grab(store):
        return lambda mod, args: store.__setitem__("z", args[0].clone())

    h1 = families.attention_out(model, 1).register_forward_pre_hook(grab(got))
    ref = {}
    h2 = families.attention_out(plain, 1).register_forward_pre_hook(grab(ref))
    try:
        with torch.no_grad(), intervene(model, InterventionSpec([Uniform(heads=["L1H2"])])):
            model.hf(ids)
        with torch.no_grad():
            plain(ids)
    finally:
        h1.remove()
        h2.remove()
    for h in (0, 1, 3):
        assert torch.equal(got["z"][..., h * D:(h + 1) * D], ref["z"][..., h * D:(h + 1) * D])
    assert not torch.allclose(got["z"][..., 2 * D:3 * D], ref["z"][..., 2 * D:3 * D])


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss", "llama"])
def test_fused_kernel_is_never_given_what_it_does_not_implement(zoo, name, monkeypatch):
    """Under the Triton interpreter: softcap (Gemma2) and learned sinks (gpt-oss) go to the eager engine, with
    statistics equal to the all-eager run; a plain family (Llama) does take the kernel."""
    pytest.importorskip("triton")
    import os

    import probe.kernels as pk
    from probe.call import parse_call

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on CPU only under TRITON_INTERPRET=1")
    q, k, _ = qkv(H=2, KV=2)
    assert "softcap" in pk.call_supported(parse_call(Attn(), q, k, None, {"softcap": 5.0}))
    assert "sinks" in pk.call_supported(parse_call(Attn(), q, k, None, {"s_aux": torch.zeros(2)}))
    assert "bias" in pk.call_supported(parse_call(Attn(), q, k, None, {"position_bias": torch.zeros(1, 2, 6, 6)}))
    model, _, tok = zoo(name)
    ids = ids_of(tok, "The quick brown fox")
    monkeypatch.setenv("HEADWISE_KERNELS", "0")
    ref = stream_stats(model, ids, groups=GROUPS, verbose=False)
    monkeypatch.setenv("HEADWISE_KERNELS", "interpret")
    calls, real = [], pk.fused_attend
    monkeypatch.setattr(pk, "fused_attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = stream_stats(model, ids, groups=GROUPS, verbose=False)
    assert (len(calls) == model.n_layers) if name == "llama" else not calls
    for key in ("entropy", "max_prob", "group_mass", "group_count", "received_sum", "received_count", "sink_mass"):
        torch.testing.assert_close(getattr(got, key), getattr(ref, key), atol=1e-4, rtol=1e-4, msg=key)


def test_records_of_sink_models_keep_the_sinks_share(zoo, tmp_path):
    from probe import AttentionRecord, CorruptFileError

    model, plain, tok = zoo("gpt_oss")
    ids = ids_of(tok, "sinks take mass")
    p = eager_patterns(plain, ids).float()
    kw = dict(model_id="tiny-gpt_oss", token_ids=tuple(ids[0].tolist()), tokens=tuple(model.str_tokens(ids)),
              layers=tuple(range(model.n_layers)), heads=tuple(range(model.n_heads)), patterns=p)
    rec = AttentionRecord(**kw, sink_mass=1.0 - p.sum(-1))
    assert float(p.sum(-1).min()) < 0.9  # rows really are short of 1
    back = AttentionRecord.load(rec.save(tmp_path / "sinks.safetensors"))
    assert torch.equal(back.sink_mass, rec.sink_mass) and torch.equal(back.patterns, rec.patterns)
    AttentionRecord(**kw).save(tmp_path / "no-sinks.safetensors")
    with pytest.raises(CorruptFileError, match="sum to 1"):
        AttentionRecord.load(tmp_path / "no-sinks.safetensors")  # rows below 1 without the sink's share: damaged
    AttentionRecord(**kw, sink_mass=0.5 * (1.0 - p.sum(-1))).save(tmp_path / "wrong.safetensors")
    with pytest.raises(CorruptFileError):
        AttentionRecord.load(tmp_path / "wrong.safetensors")


def test_cache_argument_follows_the_installed_forward_signature():
    from probe.compat import cache_arg, output_cache, with_cache

    class Old:
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            pass

    class New:
        def forward(self, input_ids, cache=None, use_cache=None):
            pass

    class Neither:
        def forward(self, input_ids):
            pass

    assert cache_arg(Old()) == "past_key_values" and with_cache(New(), 1) == {"cache": 1}
    with pytest.raises(UnsupportedModelError, match="Neither"):
        cache_arg(Neither())
    assert output_cache({"logits": 0, "past_key_values": 7}) == 7 and output_cache({"cache": 3}) == 3


def test_echo_into_a_window_that_lost_the_sources_keys_is_refused(zoo):
    """Qwen2 here has a full layer 0 and sliding layers 1-2: in decode past the window, layer 1's cache no longer
    holds the tokens layer 0 attends to, so echoing layer 0's pattern into it cannot be exact."""
    from probe import PatternEcho

    model, _, tok = zoo("qwen2")
    ids = ids_of(tok)
    with torch.no_grad(), intervene(model, InterventionSpec([PatternEcho(heads=["L1H0"], source="L0H0")])):
        model.hf(ids)  # prefill: both layers see every position
        with pytest.raises(UnsupportedModelError, match="sliding-window"):
            _greedy(model.hf, ids, n=2)


def test_version_1_statistics_files_still_load(zoo, tmp_path):
    """Files written before sinks and per-layer counts: one count row for every layer, no sink mass."""
    from probe import HeadStats
    from probe.atomic import read_tensors, write_tensors

    model, _, tok = zoo("llama")
    st = stream_stats(model, ids_of(tok, "old files"), groups=GROUPS[:1], verbose=False)
    t, m = read_tensors(st.save(tmp_path / "v2.safetensors"), "headwise.head_stats")
    t = {k: v for k, v in t.items() if k not in ("sink_mass", "group_count")}
    t["received_count"] = t["received_count"][0].contiguous()
    write_tensors(tmp_path / "v1.safetensors", t, {**m, "version": 1})
    old = HeadStats.load(tmp_path / "v1.safetensors")
    assert old.received_count.shape == st.received_count.shape and old.group_count is None
    assert torch.equal(old.received_mean(), st.received_mean()) and float(old.sink_mass.abs().max()) == 0.0
