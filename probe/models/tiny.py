"""Seeded random models for tests: ``tiny-llama`` (GQA: 4 query heads, 2 KV heads) and ``tiny-gpt2``.

They use a byte-level tokenizer built in code (256 byte tokens plus ``<bos>``/``<eos>``/``<pad>``),
so they need no file and no network, and the same seed always gives the same weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
