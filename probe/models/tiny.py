"""Seeded random models for tests: ``tiny-llama`` (GQA: 4 query heads, 2 KV heads), ``tiny-gpt2``, and
one tiny model per supported architecture family (:func:`tiny_family`).

They use a byte-level tokenizer built in code (256 byte tokens plus ``<bos>``/``<eos>``/``<pad>``),
so they need no file and no network, and the same seed always gives the same weights.

>>> hf, tok = tiny_family("gemma2")
>>> type(hf).__name__, hf.config.num_hidden_layers, hf.config.attn_logit_softcapping, hf.config.sliding_window
('Gemma2ForCausalLM', 3, 2.0, 6)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

SEED = 0
N_CTX = 256
_SPECIALS = ["<bos>", "<eos>", "<pad>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every byte is one token, so any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in _SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", model_max_length=N_CTX)
    return fast


def tiny_llama(seed: int = SEED) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=256 + len(_SPECIALS), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=N_CTX, bos_token_id=256, eos_token_id=257,
                      pad_token_id=258, tie_word_embeddings=False)
    return _seeded(LlamaForCausalLM, cfg, seed)


def tiny_gpt2(seed: int = SEED) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=256 + len(_SPECIALS), n_embd=64, n_layer=2, n_head=4,
                     n_positions=N_CTX, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return _seeded(GPT2LMHeadModel, cfg, seed)


WINDOW = 6  # sliding window of the tiny families: far shorter than any test prompt
_IDS = dict(vocab_size=256 + len(_SPECIALS), bos_token_id=256, eos_token_id=257, pad_token_id=258)
_ROPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=N_CTX, tie_word_embeddings=False)
_ALT = ["sliding_attention", "full_attention", "sliding_attention"]  # alternating local / global layers
_ROTARY = {"rope_type": "default", "rope_theta": 10000.0}

# model_type -> config fields; each family keeps what makes it distinct (README's family table; the checks
# in tests/test_families.py, tests/test_family_access.py and tests/test_family_analyses.py). 3 layers each.
FAMILIES: dict[str, dict] = {
    "llama": dict(_ROPE),                                                              # GQA
    "mistral": dict(_ROPE, sliding_window=WINDOW),                                     # sliding window, all layers
    "qwen2": dict(_ROPE, use_sliding_window=True, sliding_window=WINDOW,
                  max_window_layers=1),                                                # q/k/v bias, sliding layers 1, 2
    "qwen3": dict(_ROPE, head_dim=16, attention_bias=True),                            # q/k norm
    "gemma2": dict(_ROPE, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=_ALT,
                   attn_logit_softcapping=2.0, final_logit_softcapping=5.0),           # softcap + alternating windows
    "gemma3_text": dict(_ROPE, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        final_logit_softcapping=3.0),                                  # local/global, final softcap
    "phi3": dict(_ROPE),                                                               # fused qkv
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     max_position_embeddings=N_CTX, rope_parameters=dict(_ROTARY, partial_rotary_factor=0.25)),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=N_CTX),                   # absolute positions, c_attn
    "opt": dict(hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=N_CTX),                                        # project_in / project_out
    "olmo2": dict(_ROPE),                                                              # q/k norm over all heads
    "cohere2": dict(_ROPE, sliding_window=WINDOW, layer_types=_ALT, logit_scale=0.5),  # NoPE global layers
    "stablelm": dict(_ROPE, use_qkv_bias=True, qk_layernorm=True),                     # partial rotary (0.25)
    "gpt_oss": dict(_ROPE, head_dim=16, sliding_window=WINDOW, layer_types=_ALT, num_local_experts=4,
                    num_experts_per_tok=2, rope_parameters=dict(_ROTARY)),             # learned sinks, experts
    "granite": dict(_ROPE, embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5,
                    attention_multiplier=0.2),                                         # multipliers everywhere
    "helium": dict(_ROPE, head_dim=16),                                                # unknown to the bridge
    # these compute attention inside their own modules, not through AttentionInterface: refused
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=N_CTX),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "mpt": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=N_CTX),
}
BYPASSING = ("falcon", "bloom", "mpt")
SUPPORTED = tuple(n for n in FAMILIES if n not in BYPASSING)  # the families of probe.families.FAMILIES


def tiny_family(name: str, seed: int = SEED) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A tiny seeded causal LM of family ``name`` (a key of :data:`FAMILIES`) and the byte tokenizer.

    Weights are redrawn (:func:`randomise`) so attention is peaked: softcaps saturate, sinks and biases
    take real mass and a sliding window (:data:`WINDOW` keys) visibly changes the pattern.
    """
    if name not in FAMILIES:
        raise KeyError(f"no tiny family {name!r}; choose from {sorted(FAMILIES)}")
    cfg = AutoConfig.for_model(name, **_IDS, **FAMILIES[name])
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        randomise(model, seed)
    finally:
        torch.random.set_rng_state(state)
    return model.eval(), byte_tokenizer()


def save_family(name: str, folder: str | Path, seed: int = SEED) -> Path:
    """Write :func:`tiny_family` ``name`` (weights and tokenizer) to ``folder`` once, for ``load_model(folder)``."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        hf, tok = tiny_family(name, seed)
        hf.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Redraw every weight from a seeded generator: matrices ~ N(0, g^2/fan_in) (g = 2 for queries and
    keys, so scores are large), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.3^2), sinks ~ N(2, 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2:
            gain = 2.0 if any(k in name for k in ("q_proj", "k_proj", "query_key_value", "c_attn", "qkv_proj",
                                                  "Wqkv")) else 1.0
            fan_in = p.shape[-1] if "embed" not in name and "wte" not in name and "wpe" not in name else 1
            new = torch.randn(p.shape, generator=g) * gain / fan_in ** 0.5
        elif leaf == "sinks":
            new = torch.randn(p.shape, generator=g) + 2.0
        elif "norm" in name or "ln" in name or leaf == "weight":
            new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            new = 0.3 * torch.randn(p.shape, generator=g)
        p.copy_(new.to(p.dtype))


def _seeded(cls, cfg, seed: int):
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def materialise(name: str, model) -> Path:
    """Write the config and tokenizer (no weights) to a cache folder, for tools that want a path."""
    from ..atomic import temp_dir
    from .embedded import headwise_home

    folder = headwise_home() / "models" / name
    stamp = folder / "headwise-tiny.json"
    want = {"name": name, "config": model.config.to_dict()}
    if stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(want)):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(folder.parent, f".{name}.")  # umask permissions, not mkdtemp's 0700
    model.config.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    (tmp / "headwise-tiny.json").write_text(json.dumps(want))
    if folder.exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its folder is equivalent
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
