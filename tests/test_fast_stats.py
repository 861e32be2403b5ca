"""The fast statistics path (probe.fast: CPU flash + one causal pass) against the eager engine that defines it."""
import pytest
import torch

from probe import KeyGroup, StatsRequest, collect_stats, eager, fast, stream_stats  # noqa: F401
from probe.call import AttentionCall
from probe.stats import StatsCollector


def _eager_stats(q, k, v, call, request):
    col = StatsCollector(request, 1, q.shape[1])
    out = eager.attend(q, k, v, call=call, chunk=37, on_chunk=lambda ch: col.on_chunk(0, call, ch))
    return out, col.result()


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("kv,from_pos", [(3, 0), (9, 250), (1, 299)])
def test_fast_path_equals_the_eager_engine_on_one_call(kv, from_pos, own):
    """Embedded-model shapes (9 query heads, GQA), groups and a first row: same statistics and output,
    with SDPA's output or the output the pass builds itself (``own_output``)."""
    g = torch.Generator().manual_seed(kv)
    T, H, D = 300, 9, 64
    q = torch.randn(1, H, T, D, generator=g) * 2
    k, v = torch.randn(1, kv, T, D, generator=g) * 2, torch.randn(1, kv, T, D, generator=g)
    call = AttentionCall.plain(D ** -0.5, T, T)
    request = StatsRequest(groups=(KeyGroup("first", 0, 1), KeyGroup("mid", 100, 140), KeyGroup("rest", 200)),
                           from_pos=from_pos)
    assert fast.supported(q, k, v, call, eager.LayerPlan())
    ref_out, ref = _eager_stats(q, k, v, call, request)
    col = StatsCollector(request, 1, H)
    out, stats, recv = fast.stats_attend(q, k, v, call, eager.LayerPlan(), [(x.start, x.stop) for x in request.groups],
                                         received_from=from_pos, chunk=64, own_output=own)
    col.on_stats(0, call, stats, recv)
    got = col.result()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name in ("entropy", "max_prob", "group_mass", "received_sum", "received_count", "group_count", "query_pos"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=2e-5, rtol=1e-5, msg=name)
    assert torch.equal(got.argmax, ref.argmax)


@pytest.mark.parametrize("kv,n_keys", [(3, 1), (3, 77), (9, 300), (1, 1100)])
def test_fast_path_equals_the_eager_engine_on_one_decode_row(kv, n_keys):
    """One decode row against a KV cache (every key visible; GQA grouped, not repeated): same output and statistics."""
    g = torch.Generator().manual_seed(n_keys)
    H, D = 9, 64
    q = torch.randn(1, H, 1, D, generator=g) * 2
    k, v = torch.randn(1, kv, n_keys, D, generator=g) * 2, torch.randn(1, kv, n_keys, D, generator=g)
    call = AttentionCall.plain(D ** -0.5, 1, n_keys)
    request = StatsRequest(groups=(KeyGroup("first", 0, 1), KeyGroup("mid", 40, 70), KeyGroup("rest", 60)))
    assert call.decoding == (n_keys > 1) and fast.supported(q, k, v, call, eager.LayerPlan())
    ref_out, ref = _eager_stats(q, k, v, call, request)
    col = StatsCollector(request, 1, H)
    out, stats, recv = fast.stats_attend(q, k, v, call, eager.LayerPlan(), [(x.start, x.stop) for x in request.groups],
                                         own_output=True)  # a decode row keeps SDPA's output in either mode
    col.on_stats(0, call, stats, recv)
    got = col.result()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(out.transpose(1, 2), sdpa)                     # the model's own decode output, bit for bit
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name in ("entropy", "max_prob", "group_mass", "received_sum", "received_count", "group_count", "query_pos"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=2e-5, rtol=1e-5, msg=name)
    assert torch.equal(got.argmax, ref.argmax)


def test_fast_path_is_refused_where_it_would_be_inexact():
    q = k = v = torch.randn(1, 2, 8, 4)
    plain = AttentionCall.plain(0.5, 8, 8)
    assert fast.supported(q, k, v, plain, eager.LayerPlan())
    masked = AttentionCall.plain(0.5, 8, 8, mask=torch.ones(1, 1, 8, 8, dtype=torch.bool).tril())
    continued = AttentionCall.plain(0.5, 2, 8)  # two rows after six cached keys: flash's causal mask is upper-left
    for call in (masked, continued):
        assert not fast.supported(q[:, :, :call.n_queries], k, v, call, eager.LayerPlan())
    assert not fast.supported(q, k, v, plain, eager.LayerPlan(temperature={0: 2.0}))
    assert not fast.supported(q.double(), k.double(), v.double(), plain, eager.LayerPlan())
    assert not fast.supported(torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4), plain,
                              eager.LayerPlan())


@pytest.mark.parametrize("fixture", ["tiny_llama", "smol"])
def test_statistics_leave_the_forward_bit_identical_and_match_eager(fixture, request, monkeypatch):
    """Under collect_stats the fast path returns SDPA's own output (logits bit for bit), and its
    statistics equal the all-eager engine's on the same model (first layer exactly the same inputs)."""
    m = request.getfixturevalue(fixture)
    ids = torch.randint(5, 250, (1, 96), generator=torch.Generator().manual_seed(0))
    groups = [KeyGroup("first", 0, 1), KeyGroup("tail", 80)]
    with torch.no_grad():
        plain = m.hf(ids).logits
        with collect_stats(m, StatsRequest(groups=tuple(groups))):
            under = m.hf(ids).logits
    assert torch.equal(under, plain)
    got = stream_stats(m, ids, groups=groups, verbose=False)
    monkeypatch.setattr(fast, "supported", lambda *a: False)
    ref = stream_stats(m, ids, groups=groups, verbose=False)
    for name in ("entropy", "max_prob", "group_mass", "received_sum"):
        torch.testing.assert_close(getattr(got, name)[0], getattr(ref, name)[0], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=2e-3, rtol=1e-3, msg=name)
    assert float((got.argmax == ref.argmax).float().mean()) > 0.999


@pytest.mark.parametrize("fixture", ["tiny_llama", "smol"])
def test_decode_rows_on_the_fast_path_match_eager_and_keep_the_plain_tokens(fixture, request, monkeypatch):
    """Greedy decoding with statistics on every decode row: the fast path gives the tokens of plain
    decoding (SDPA's own outputs) and the eager engine's statistics."""
    from probe import generate_with_stats

    m = request.getfixturevalue(fixture)
    ids = torch.randint(5, 250, (1, 70), generator=torch.Generator().manual_seed(2))
    groups = [KeyGroup("first", 0, 1), KeyGroup("span", 20, 30)]
    with torch.no_grad():
        plain = m.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    used = []
    real = fast.stats_attend
    monkeypatch.setattr(fast, "stats_attend", lambda q, *a, **kw: used.append(q.shape[2]) or real(q, *a, **kw))
    got = generate_with_stats(m, ids, max_new_tokens=6, groups=groups)
    assert got.new_ids[0].tolist() == plain and used.count(1) == 5 * m.n_layers  # every decode row went fast
    monkeypatch.setattr(fast, "supported", lambda *a: False)
    ref = generate_with_stats(m, ids, max_new_tokens=6, groups=groups)
    assert got.stats.query_pos.tolist() == ref.stats.query_pos.tolist() == list(range(70, 75))
    for name in ("entropy", "max_prob", "group_mass", "group_count", "received_sum", "received_count"):
        torch.testing.assert_close(getattr(got.stats, name), getattr(ref.stats, name), atol=2e-5, rtol=1e-4, msg=name)
    assert float((got.stats.argmax == ref.stats.argmax).float().mean()) > 0.999


@pytest.mark.parametrize("fixture", ["tiny_llama", "smol"])
def test_fast_act_equals_the_eager_act(fixture, request, monkeypatch):
    """Applied ACT (detected and given sinks, with a zero-ablated head in the same layers) through the
    flash + sink-column path equals the eager engine's separate accumulators."""
    from probe import InterventionSpec, SinkCalibration, ZeroAblate, intervene

    m = request.getfixturevalue(fixture)
    ids = torch.randint(5, 250, (1, 80), generator=torch.Generator().manual_seed(1))
    heads = [f"L{l}H{h}" for l in range(m.n_layers) for h in range(m.n_heads)][::2]
    half = len(heads) // 2
    spec = InterventionSpec([SinkCalibration(heads=heads[:half], beta=0.4),
                             SinkCalibration(heads=heads[half:], beta=0.2, sinks=(0, 3)), ZeroAblate(heads=[heads[1]])])
    with torch.no_grad():
        plain = m.hf(ids).logits
        with intervene(m, spec):
            got = m.hf(ids).logits
        monkeypatch.setattr(fast, "act_supported", lambda *a: False)
        with intervene(m, spec):
            ref = m.hf(ids).logits
    assert not torch.allclose(ref, plain, atol=1e-3)
    scale = float(ref.abs().max())  # 30 layers of float32 rounding: compare relative to the logits' size
    torch.testing.assert_close(got, ref, atol=4e-6 * scale, rtol=1e-5)


def test_act_while_decoding_equals_the_eager_act(tiny_llama, monkeypatch):
    """Decode rows with ACT applied (one query against the KV cache) are not a causal prefill: they run the
    eager engine, and generation under the calibration equals the all-eager one (a decode row once reached
    the prefill-only column-sum pass and crashed)."""
    from probe import InterventionSpec, SinkCalibration, intervene

    m = tiny_llama
    ids = torch.randint(5, 250, (1, 40), generator=torch.Generator().manual_seed(2))
    spec = InterventionSpec([SinkCalibration(heads=["L0H0", "L1H2"], beta=0.4, tau=0.02)])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with intervene(m, spec):
            got = m.hf.generate(ids, **kw)
        monkeypatch.setattr(fast, "act_supported", lambda *a: False)
        with intervene(m, spec):
            ref = m.hf.generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [5, 64, 130, 300])
def test_blockwise_argmax_equals_max_with_ties_and_tails(n):
    """row_argmax (block maxima, then argmax inside the first block holding the max) equals
    ``x.max(-1)``: same values, same (first) index on ties, in the block part and the tail."""
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-3, 4, (2, 3, 7, n), generator=g).float()   # few distinct values: many ties
    x[0, 0, 0] = 3.0                                                # a row that is all one value
    x[1, 2, 3, -1] = 9.0                                            # the maximum in the tail only
    best, arg = fast.row_argmax(x, block=32, small=0)  # the block passes, however small
    ref_best, ref_arg = x.max(-1)
    assert torch.equal(best, ref_best) and torch.equal(arg, ref_arg)


def test_floored_scores_keep_masked_keys_exact_zeros():
    """Peaked rows (probabilities that underflow, log p far below FLOOR) give the eager statistics;
    keys in a row's future (the diagonal block of each chunk) carry exactly zero mass."""
    T, H, D = 70, 2, 8
    q = torch.randn(1, H, T, D, generator=torch.Generator().manual_seed(0)) * 8   # very peaked rows
    k = torch.randn(1, H, T, D, generator=torch.Generator().manual_seed(1)) * 8
    v = torch.randn(1, H, T, D)
    call = AttentionCall.plain(D ** -0.5, T, T)
    _, stats, recv = fast.stats_attend(q, k, v, call, eager.LayerPlan(), [(0, 1), (T - 1, T)], chunk=16)
    s = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf)
    p = torch.softmax(s.double(), -1)
    assert float(p.min()) == 0.0 and float(torch.log(p[p > 0]).min()) < fast.FLOOR   # underflows and tiny p
    torch.testing.assert_close(recv, p.sum(2).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats["group_mass"][..., 0], p[..., 0].float(), atol=1e-30, rtol=1e-4)
    assert torch.equal(stats["group_mass"][0, :, :T - 1, 1], torch.zeros(H, T - 1))   # the last key: future to all
    ent = -(p * torch.log(p.clamp(min=1e-300))).sum(-1)
    torch.testing.assert_close(stats["entropy"], ent.float(), atol=1e-4, rtol=1e-4)


def test_act_column_sums_equal_the_pattern_columns():
    """ACT's sink statistic (column sums of the causal pattern, each chunk finishing its rows' softmax)
    equals the float64 pattern's columns, peaked rows and several chunks included."""
    T, H, D = 90, 3, 8
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, H, T, D, generator=g) * 6, torch.randn(1, H, T, D, generator=g) * 6
    call = AttentionCall.plain(D ** -0.5, T, T)
    col = fast._column_sums(q, k, call, 16, eager.Scratch())
    s = (q.double() @ k.double().transpose(-1, -2) * D ** -0.5).masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf)
    torch.testing.assert_close(col, torch.softmax(s, -1).sum(2)[0].float(), atol=1e-4, rtol=1e-5)


def test_the_pass_built_output_is_sdpa_to_rounding_and_not_bit_for_bit():
    """``own_output``: no flash call; the output equals SDPA's to float32 rounding (a real difference of
    summation order, so the default mode, which promises the model's own bits, keeps the flash call)."""
    g = torch.Generator().manual_seed(7)
    T, H, KV, D = 700, 9, 3, 64
    q, k, v = (torch.randn(1, n, T, D, generator=g) * 2 for n in (H, KV, KV))
    call = AttentionCall.plain(D ** -0.5, T, T)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    model_out = fast.stats_attend(q, k, v, call, eager.LayerPlan())[0]
    own_out = fast.stats_attend(q, k, v, call, eager.LayerPlan(), own_output=True)[0]
    assert torch.equal(model_out.transpose(1, 2), sdpa)
    torch.testing.assert_close(own_out.transpose(1, 2), sdpa, atol=2e-6, rtol=1e-5)
    assert not torch.equal(own_out, model_out)


@pytest.mark.parametrize("fixture", ["tiny_llama", "smol"])
def test_stream_stats_with_the_pass_output_matches_the_default(fixture, request):
    """``output="pass"`` on a whole model: statistics equal the default mode's to rounding, the logits the
    plain forward's to rounding; the record says which output it used."""
    m = request.getfixturevalue(fixture)
    ids = torch.randint(5, 250, (1, 120), generator=torch.Generator().manual_seed(3))
    groups = [KeyGroup("first", 0, 1), KeyGroup("mid", 40, 60)]
    with torch.no_grad():
        plain = m.hf(ids).logits
        with collect_stats(m, StatsRequest(groups=tuple(groups), output="pass")):
            under = m.hf(ids).logits
    torch.testing.assert_close(under, plain, atol=1e-4 * float(plain.abs().max()), rtol=1e-4)
    ref = stream_stats(m, ids, groups=groups, verbose=False)
    got = stream_stats(m, ids, groups=groups, verbose=False, output="pass")
    assert got.meta["attention_output"] == "pass" and ref.meta["attention_output"] == "model"
    for name in ("entropy", "max_prob", "group_mass", "received_sum"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=2e-3, rtol=1e-3, msg=name)
    assert float((got.argmax == ref.argmax).float().mean()) > 0.999


def test_an_unknown_output_mode_is_refused_before_any_work(tiny_llama):
    from probe.errors import InputError

    with pytest.raises(InputError, match="output must be one of"):
        stream_stats(tiny_llama, torch.tensor([[5, 6, 7]]), output="fast")


def test_the_stats_command_takes_the_output_mode(tmp_path):
    """``headwise stats --output pass`` writes the same statistics (to rounding) and says which mode it used."""
    from analyses.cli import main
    from probe import HeadStats

    base = ["stats", "--model", "tiny-llama", "--text", "The quick brown fox jumps over the lazy dog. " * 4,
            "--threads", "1"]
    assert main(base + ["--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(base + ["--output", "pass", "--out", str(tmp_path / "p.safetensors")]) == 0
    m, p = (HeadStats.load(tmp_path / f"{n}.safetensors") for n in "mp")
    assert m.meta["attention_output"] == "model" and p.meta["attention_output"] == "pass"
    torch.testing.assert_close(p.entropy, m.entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p.received_sum, m.received_sum, atol=1e-4, rtol=1e-4)
