"""Streaming statistics equal the same statistics computed from full eager patterns."""
import pytest
import torch

from probe import CorruptFileError, HeadStats, InputError, KeyGroup, StatsRequest, generate_with_stats, stream_stats
from probe.memory import stream_estimate

GROUPS = [KeyGroup("first", 0, 1), KeyGroup("mid", 3, 7), KeyGroup("tail", 5)]


def expected(pats: torch.Tensor) -> dict:
    """Reference statistics from patterns [L, H, T, T] (float64)."""
    p = pats.double()
    T = p.shape[-1]
    masks = torch.stack([g.mask(T, "cpu") for g in GROUPS]).double()
    return {"probs": p, "entropy": -(p * p.clamp_min(1e-300).log()).sum(-1), "max_prob": p.max(-1).values,
            "argmax": p.argmax(-1), "group_mass": torch.einsum("lhqk,gk->lhqg", p, masks),
            "received_sum": p.sum(2), "received_count": torch.arange(T, 0, -1).double()}


def assert_matches(st: HeadStats, ref: dict, atol=1e-5):
    for key in ("entropy", "max_prob", "group_mass", "received_sum", "received_count"):
        assert torch.allclose(getattr(st, key).double(), ref[key], atol=atol), key
    # argmax may differ from the reference only where two keys tie: the key chosen must hold the row's maximum
    chosen = ref["probs"].gather(-1, st.argmax.long().unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, ref["max_prob"], atol=atol), "argmax points at a key below the row maximum"
    assert (st.argmax == ref["argmax"]).float().mean() > 0.9


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("text", ["a", "odd length text!", "x" * 57])
def test_stream_equals_full(request, reference_patterns, name, text):
    model = request.getfixturevalue(name)
    ids = model.encode(text)
    st = stream_stats(model, ids, groups=GROUPS)
    assert st.entropy.shape == (model.n_layers, model.n_heads, ids.shape[1])
    assert_matches(st, expected(reference_patterns(model, ids)))


@pytest.mark.parametrize("budget", [1, 2000, 9000])
def test_chunk_boundaries(tiny_llama, reference_patterns, budget):
    """Tiny budgets force chunks of 1..few rows; results must not depend on the chunking."""
    ids = tiny_llama.encode("chunk boundaries are not special")
    st = stream_stats(tiny_llama, ids, groups=GROUPS, budget=budget)
    assert_matches(st, expected(reference_patterns(tiny_llama, ids)))


def test_layer_subset_and_group_errors(tiny_llama):
    st = stream_stats(tiny_llama, "abc", layers=[1])
    assert st.layers == (1,) and st.entropy.shape[0] == 1
    with pytest.raises(InputError, match="at most 16"):
        StatsRequest(groups=[KeyGroup(f"g{i}", i, i + 1) for i in range(17)])
    with pytest.raises(InputError, match="empty"):
        KeyGroup("bad", 4, 4)
    with pytest.raises(InputError, match="no key group"):
        st.mass("nope")


def test_decode_rows_equal_full_recompute(tiny_llama):
    ids = tiny_llama.encode("the decode path")
    T = ids.shape[1]
    groups = [KeyGroup("ctx", 0, T), KeyGroup("new", T)]
    gen = generate_with_stats(tiny_llama, ids, max_new_tokens=6, groups=groups, stats_in_prefill="last")
    assert gen.n_new == 6
    full = torch.cat([ids, gen.new_ids], 1)[:, :-1]  # the rows that produced each new token
    ref = stream_stats(tiny_llama, full, groups=groups)
    rows = slice(T - 1, None)
    assert gen.stats.query_pos.tolist() == list(range(T - 1, T + 5))
    for key in ("entropy", "max_prob", "group_mass"):
        assert torch.allclose(getattr(gen.stats, key), getattr(ref, key)[:, :, rows], atol=1e-5), key
    assert torch.equal(gen.stats.argmax, ref.argmax[:, :, rows])


def test_generation_matches_hf_generate(tiny_llama):
    ids = tiny_llama.encode("greedy")
    gen = generate_with_stats(tiny_llama, ids, max_new_tokens=5)
    with torch.no_grad():
        ref = tiny_llama.hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=258)
    assert gen.new_ids.tolist()[0] == ref[0, ids.shape[1]:].tolist()


def test_round_trip_and_corruption(tmp_path, tiny_llama):
    st = stream_stats(tiny_llama, "save me", groups=GROUPS[:1])
    path = st.save(tmp_path / "s.safetensors")
    back = HeadStats.load(path)
    assert back.group_names == st.group_names and back.layers == st.layers and back.token_ids == st.token_ids
    assert torch.equal(back.entropy, st.entropy) and torch.equal(back.argmax, st.argmax)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError):
        HeadStats.load(path)


def test_to_frame_is_tidy(tiny_llama):
    df = stream_stats(tiny_llama, "tidy", groups=GROUPS[:1]).to_frame()
    assert set(df.columns) == {"layer", "head", "metric", "value"}
    assert len(df) == 2 * 4 * 3


def test_estimate_grows_linearly_not_quadratically():
    small = stream_estimate(30, 9, 1024, chunk=128).bytes
    big = stream_estimate(30, 9, 8192, chunk=128).bytes
    assert big / small < 8.5  # T x 8 -> memory about x 8 (chunk fixed), never x 64


@pytest.mark.slow
def test_embedded_stream_equals_full(smol, reference_patterns):
    ids = smol.encode("Attention sinks soak up mass.\nThe first token often gets most of it.")
    st = stream_stats(smol, ids, groups=GROUPS, budget=smol.n_heads * ids.shape[1] * 16 * 5)
    assert_matches(st, expected(reference_patterns(smol, ids)), atol=1e-4)
