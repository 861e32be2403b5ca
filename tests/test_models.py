import pytest
import torch

from probe import (ContextLengthError, InputError, ModelLoadError, UnknownModelError, families, list_models,
                   load_model)
from probe.models import share_weights


def test_list_models_default_first():
    names = [m.name for m in list_models()]
    assert names[0] == "smollm2-135m" and {"tiny-llama", "tiny-gpt2"} <= set(names)


def test_tiny_layouts(tiny_llama, tiny_gpt2):
    assert (tiny_llama.n_layers, tiny_llama.n_heads, tiny_llama.n_kv_heads) == (2, 4, 2)
    assert (tiny_gpt2.n_layers, tiny_gpt2.n_heads, tiny_gpt2.n_kv_heads) == (2, 4, 4)


def test_tiny_models_are_seeded(tiny_llama):
    again = load_model("tiny-llama")
    assert again.weights_hash == tiny_llama.weights_hash
    for a, b in zip(again.hf.parameters(), tiny_llama.hf.parameters()):
        assert torch.equal(a, b)


def test_unknown_model_names_the_choices():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        load_model("no-such-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_encode_errors(tiny_llama):
    with pytest.raises(InputError, match="empty"):
        tiny_llama.encode("   ")
    with pytest.raises(ContextLengthError, match="at most 256"):
        tiny_llama.encode("x" * 300)


def test_twin_shares_every_tensor(tiny_llama):
    twin = share_weights(tiny_llama.hf)
    ours = {n: p.data_ptr() for n, p in tiny_llama.hf.state_dict().items()}
    assert {n: p.data_ptr() for n, p in twin.state_dict().items()} == ours


@pytest.mark.slow
def test_embedded_model_layout_and_ioi(smol):
    assert (smol.n_layers, smol.n_heads, smol.n_kv_heads) == (30, 9, 3)
    ids = smol.encode("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        logits = smol.hf(ids).logits[0, -1]
    assert smol.tokenizer.decode(logits.argmax()) == " Mary"


@pytest.mark.slow
def test_bridge_matches_plain_model_and_costs_no_weights(smol):
    ids = smol.encode("The cat sat on the mat.")
    with torch.no_grad():
        plain = smol.hf(ids).logits
        bridged = smol.bridge(ids)
    assert torch.allclose(plain, bridged, atol=1e-3)
    ptr = families.embedding(smol).weight.data_ptr()
    assert any(p.data_ptr() == ptr for p in smol.bridge.parameters())


def test_weights_hash_ignores_thread_count_but_sees_one_changed_weight(tiny_llama):
    """Cached results and calibration files are keyed on it: it must not change with torch threads."""
    from probe.models import weights_fingerprint

    before = torch.get_num_threads()
    try:
        hashes = set()
        for n in (1, 2):
            torch.set_num_threads(n)
            hashes.add(weights_fingerprint(tiny_llama.hf))
    finally:
        torch.set_num_threads(before)
    assert hashes == {tiny_llama.weights_hash}
    w = families.attention(tiny_llama, 0).q_proj.weight
    with torch.no_grad():
        old = float(w[0, 0])
        w[0, 0] += 1.0
        try:
            assert weights_fingerprint(tiny_llama.hf) != tiny_llama.weights_hash
        finally:
            w[0, 0] = old
