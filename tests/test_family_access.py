"""Family-agnostic model access (probe.families), run-from-layer, and capture's bridge / observer paths.

Every family of the mapping is built tiny and seeded (:func:`probe.models.tiny.tiny_family`), with windows
smaller than the prompt and softcaps, scales and sinks that matter.
"""
import functools
import threading

import pytest
import torch

from conftest import eager_patterns
from probe import InterventionSpec, UnsupportedModelError, ZeroAblate, capture, families, intervene, tap
from probe.models.tiny import SUPPORTED as FAMILY_NAMES
from probe.models.tiny import tiny_family


def _ids(T: int = 20, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def plain():
    """Plain Hugging Face models (never installed into headwise), eager attention, one per family."""
    def build(name):
        hf, _ = tiny_family(name)
        hf.set_attn_implementation("eager")
        return hf

    return functools.cache(build)


# ----------------------------------------------------------------------------- the mapping

def test_every_mapped_family_has_a_tiny_model():
    """The test families are exactly the mapping's (and the refused ones its refusals): none goes untested."""
    from probe.models.tiny import BYPASSING

    assert sorted(FAMILY_NAMES) == sorted(families.FAMILIES) and sorted(BYPASSING) == sorted(families.REFUSED)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_mapping_finds_every_part(family_model, name):
    """Blocks and attention modules in order; attention_out's input is the engine's head outputs, heads concatenated."""
    m = family_model(name)
    fam, L = families.family(m), m.n_layers
    assert fam.name == name and len(families.blocks(m)) == L
    assert [families.attention(m, l).layer_idx for l in range(L)] == list(range(L))
    assert families.embedding(m) is m.hf.get_input_embeddings()
    assert families.unembedding(m).weight.shape[0] == m.hf.config.vocab_size
    heads, fed = {}, {}

    class Heads:
        layers = None

        def on_output(self, layer, q_pos, out):                    # [B, T, H, D]
            heads[layer] = out.detach().clone()

    hooks = [families.attention_out(m, l).register_forward_pre_hook(
        lambda mod, args, l=l: fed.__setitem__(l, args[0].detach().clone())) for l in range(L)]
    try:
        with torch.no_grad(), tap(m, Heads()):
            m.hf(_ids())
    finally:
        for h in hooks:
            h.remove()
    for l in range(L):
        B, T, H, D = heads[l].shape
        assert H == m.n_heads and torch.equal(fed[l], heads[l].reshape(B, T, H * D))


def _patched_heads(m, ids, module, width: int, slot: int, values):
    """Patterns ``[L, H, T, T]`` and head outputs ``[L, T, H, D]`` with ``module``'s output slice ``slot`` replaced."""
    pats, outs = {}, {}

    class Seen:
        layers = None

        def on_probs(self, layer, q_pos, probs):
            pats[layer] = probs[0].detach().clone()

        def on_output(self, layer, q_pos, out):
            outs[layer] = out[0].detach().clone()

    def patch(mod, args, out):
        out = out.clone()
        out[..., slot * width:(slot + 1) * width] = values[..., slot * width:(slot + 1) * width]
        return out

    handle = module.register_forward_hook(patch) if values is not None else None
    try:
        with torch.no_grad(), tap(m, Seen()):
            m.hf(ids)
    finally:
        if handle is not None:
            handle.remove()
    return torch.stack([pats[l] for l in sorted(pats)]), torch.stack([outs[l] for l in sorted(outs)])


@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if families.FAMILIES[n].head_inputs])
def test_head_inputs_hold_each_heads_query_key_and_value_apart(family_model, name):
    """Path patching's receivers: one head's slice of q (one KV head's of k, v) replaced with another run's
    changes that head (that KV group) only; OLMo2's q/k norms span heads, so its slices are after them."""
    m, clean, other = family_model(name), _ids(seed=1), _ids(seed=2)
    layer, group = 1, m.n_heads // m.n_kv_heads
    base_p, base_z = _patched_heads(m, clean, families.head_input(m, layer, "q"), m.d_head, 0, None)
    for channel, slot in (("q", 2), ("k", 1), ("v", 1)):
        mod, seen = families.head_input(m, layer, channel), {}
        handle = mod.register_forward_hook(lambda _, a, o, seen=seen: seen.__setitem__("v", o.detach().clone()))
        with torch.no_grad():
            m.hf(other)
        handle.remove()
        pats, z = _patched_heads(m, clean, mod, m.d_head, slot, seen["v"])
        hit = [slot] if channel == "q" else list(range(slot * group, (slot + 1) * group))
        rest = [h for h in range(m.n_heads) if h not in hit]
        assert torch.equal(pats[:layer + 1, rest], base_p[:layer + 1, rest]), channel   # other heads untouched
        assert torch.equal(z[layer, :, rest], base_z[layer, :, rest]), channel
        assert not torch.allclose(z[layer, :, hit], base_z[layer, :, hit]), channel     # the patched head(s) changed


@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if not families.FAMILIES[n].head_inputs])
def test_fused_qkv_families_refuse_head_inputs(family_model, name):
    with pytest.raises(UnsupportedModelError, match="fused"):
        families.head_input(family_model(name), 0, "q")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_embedding_is_what_inputs_embeds_replaces(plain, name):
    """Gemma's embedding scale lives in its embedding module: feeding it back gives the same logits."""
    hf, ids = plain(name), _ids()
    with torch.no_grad():
        assert torch.equal(hf(inputs_embeds=families.embedding(hf)(ids)).logits, hf(ids).logits)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_run_from_every_layer_is_the_full_forward(plain, name):
    """Left-padded batch, explicit positions: rerunning blocks l.. gives the model's own logits, bit for bit."""
    hf, ids = plain(name), _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=pos).logits
        last = hf(ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        r = families.record(hf, ids, attention_mask=mask, position_ids=pos)
        assert torch.equal(r.logits, want)
        for l in range(hf.config.num_hidden_layers):
            assert torch.equal(r.run(l), want), f"run from layer {l}"
            assert torch.equal(r.run(l, keep=1), last)
        assert torch.equal(families.logits(hf, r.hidden(0)), want)


@pytest.mark.parametrize("name", [n for n in ("llama", "mistral", "gemma2", "gpt2", "gpt_oss",
                                                                   "cohere2", "opt")])
def test_run_from_with_an_intervention_active(family_model, name):
    """Recorded on the plain model, rerun under an edit of layers >= l: the edited full forward, bit for bit."""
    m = family_model(name)
    ids = _ids()
    with torch.no_grad():
        r = families.record(m, ids, start=1)
        spec = InterventionSpec([ZeroAblate(heads=["L1H0", "L2H3"])])
        with intervene(m, spec):
            want = m.hf(ids).logits
            got = r.run(1)
        assert torch.equal(got, want)           # unedited layers < l compute what the plain model did (item 1)
        assert not torch.allclose(got, r.logits, atol=1e-3)        # the edit did something

        class Patch:                                                # an on_output tap (exact patching)
            layers = {2}

            def on_output(self, layer, q_pos, out):
                return out * 0.5

        with tap(m, Patch()):
            want = m.hf(ids).logits
            got = r.run(2)
        assert torch.equal(got, want)


def test_record_leaves_no_hook_even_when_the_forward_fails(plain):
    hf = plain("llama")
    with pytest.raises(IndexError):
        families.record(hf, torch.full((1, 4), 10_000))             # token id outside the vocabulary
    assert all(not b._forward_pre_hooks for b in families.blocks(hf))
    families.record(hf, _ids())
    assert all(not b._forward_pre_hooks for b in families.blocks(hf))


def test_record_ignores_forwards_of_other_threads(plain):
    """A forward run by another thread while we record passes through our hooks untouched."""
    hf, mine, theirs = plain("mistral"), _ids(seed=1), _ids(seed=2)
    with torch.no_grad():
        alone = families.record(hf, mine)
        seen = {}

        def other():
            seen["logits"] = hf(theirs).logits

        def start_other(module, args):                              # in our thread, mid-recording (once)
            if not seen:
                seen["started"] = True
                t = threading.Thread(target=other)
                t.start()
                t.join()

        handle = families.blocks(hf)[1].register_forward_pre_hook(start_other)
        try:
            r = families.record(hf, mine)
        finally:
            handle.remove()
    assert torch.equal(seen["logits"], hf(theirs).logits)
    for l in alone.inputs:
        assert torch.equal(r.inputs[l], alone.inputs[l])
    assert torch.equal(r.run(0), alone.logits)


def test_unknown_and_refused_architectures_raise_typed_errors():
    import transformers as tf

    falcon = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM.*AttentionInterface"):
        families.blocks(falcon)
    starcoder = tf.Starcoder2ForCausalLM(tf.Starcoder2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError, match="starcoder2.*no mapping"):
        families.record(starcoder, torch.zeros(1, 3, dtype=torch.long))


def test_resume_refuses_layers_it_did_not_record_and_a_cache(plain):
    from transformers import DynamicCache

    from probe import InputError

    hf = plain("gpt2")
    r = families.record(hf, _ids(), start=2)
    with pytest.raises(InputError, match="record with start <= 1"):
        r.run(1)
    with pytest.raises(InputError, match="without a KV cache"):
        families.record(hf, _ids(), past_key_values=DynamicCache(config=hf.config))


# ----------------------------------------------------------------------------- capture: bridge and observer

@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if n != "helium"])
def test_capture_through_the_bridge_equals_eager_patterns(family_model, name):
    m, ids = family_model(name), _ids()
    rec = capture(m, ids, source="bridge")
    assert rec.meta["source"] == "bridge.hook_pattern"
    assert torch.allclose(rec.patterns, eager_patterns(m, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES])
def test_capture_through_the_observer_equals_eager_patterns(family_model, name):
    m, ids = family_model(name), _ids()
    rec = capture(m, ids, source="observer", layers=[0, 2], heads=[1, 3])
    assert rec.meta["source"] == "observer.on_probs" and rec.patterns.shape == (2, 2, 20, 20)
    assert torch.allclose(rec.patterns, eager_patterns(m, ids)[[0, 2]][:, [1, 3]], atol=1e-5, rtol=0)


def test_a_family_the_bridge_refuses_is_captured_through_the_observer(family_model):
    m, ids = family_model("helium"), _ids()
    with pytest.raises(UnsupportedModelError, match="TransformerLens bridge"):
        capture(m, ids, source="bridge")
    rec = capture(m, ids)
    assert rec.meta["source"] == "observer.on_probs" and "HeliumForCausalLM" in rec.meta["bridge_refused"]
    assert torch.allclose(rec.patterns, eager_patterns(m, ids), atol=1e-5, rtol=0)


def test_analyses_that_need_the_mapping_refuse_an_unknown_family_before_any_work(monkeypatch):
    from types import SimpleNamespace

    import transformers as tf
    from analyses import run
    from analyses.circuits import CIRCUITS, CircuitsConfig, run_task
    from analyses.sinks import SINKS, SinksConfig

    hf = tf.Starcoder2ForCausalLM(tf.Starcoder2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=1))
    model = SimpleNamespace(hf=hf)                       # anything past the check would fail on this stub
    with pytest.raises(UnsupportedModelError, match="starcoder2"):
        run(SINKS, model, SinksConfig(), progress=False)
    with pytest.raises(UnsupportedModelError, match="starcoder2"):
        run(CIRCUITS, model, CircuitsConfig(), progress=False)
    with pytest.raises(UnsupportedModelError, match="starcoder2"):
        run_task(model, "induction")
