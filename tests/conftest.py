"""Shared fixtures: tiny seeded models (fast) and the embedded model (integration). Nothing loads at import."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_llama():
    from probe import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from probe import load_model

    return load_model("tiny-gpt2", device="cpu")


@pytest.fixture(scope="session")
def smol():
    from probe import load_model

    return load_model("smollm2-135m", device="cpu")


def eager_patterns(model, ids, batch: bool = False):
    """Reference patterns ``[layer, head, T, T]`` (``batch``: ``[layer, B, head, T, T]``) from HF eager attention."""
    from probe import install

    hf = model.hf
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(ids, output_attentions=True)
    finally:
        install(hf)
    pats = torch.stack(out.attentions).float()
    return pats if batch else pats[:, 0]


def layer_windows(cfg) -> list[int | None]:
    """Sliding window of every layer (None: full attention), from the config alone: an independent rule
    for which keys a row sees."""
    L = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [cfg.sliding_window if t == "sliding_attention" else None for t in types[:L]]
    return [getattr(cfg, "sliding_window", None)] * L


@pytest.fixture
def reference_patterns():
    return eager_patterns


# ----------------------------------------------------------------------------- saved results for the dashboard tests

def _grounding(root: Path, L: int, H: int) -> None:
    from analyses.grounding import GroundingResult, heldout_roc
    from analyses.grounding.detector import evaluate

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    X = rng.normal(size=(40, L * H)) * 0.1 + 0.5
    X[:, 3] += 0.3 * y                                         # head L0H3 looks back when grounded
    det, summary = evaluate(X[:28], y[:28], X[28:], y[28:], L, H, n_boot=50, n_perm=5)
    mit = pd.DataFrame({"condition": ["greedy", "guided"], "n": [6, 6], "grounded_rate": [0.25, 0.5],
                        "contradicted_rate": [0.5, 0.25], "heads": ["", ""], "d_greedy": [0.0, 0.25]})
    answers = pd.DataFrame([{"item_id": f"i{i}", "split": "train" if i < 28 else "heldout", "label": float(y[i]),
                             "n_new": 1, "answer": "x", "row_lr": X[i].tolist()} for i in range(40)])
    GroundingResult("tiny-llama", summary, det.head_weights(), mit, heldout_roc(det, answers),
                    answers.drop(columns="row_lr"), det).save(root / "grounding-tiny-llama")


def _sinks(folder: Path, model) -> None:
    """The ACT scan on 4 items per split (fast), with the paper's alpha/N sink rule."""
    from analyses import run
    from analyses.sinks import SINKS, SinksConfig
    from probe import SinkCalibration

    cfg = SinksConfig(limit=4, n_profile=2, act=SinkCalibration(rule="alpha", alpha=2.0), first_layer=0,
                      last_layer=1, n_random=1)
    run(SINKS, model, cfg, store=folder, progress=False)


def scan(root: Path, name: str, model, **overrides):
    """Run analysis ``name`` on ``model`` with its small config (and ``overrides``) into ``root/<name>-<model>``,
    where the dashboard's run button writes it."""
    import dataclasses

    from analyses import registry, run

    analysis = registry.get(name)
    cfg = dataclasses.replace(analysis.config.small(model), **overrides)
    return run(analysis, model, cfg, store=root / f"{name}-{model.model_id}", progress=False)


@pytest.fixture(scope="session")
def results(tmp_path_factory, tiny_llama):
    """A results folder with every analysis' files, written as each analysis' scan writes them."""
    root = tmp_path_factory.mktemp("results")
    scan(root, "retrieval", tiny_llama, lengths=(230,), depths=(30.0, 70.0), k=2, max_new_tokens=6)
    _sinks(root / "sinks-tiny-llama", tiny_llama)
    scan(root, "circuits", tiny_llama, n=2, n_boot=5)
    scan(root, "similarity", tiny_llama, n_prompts=2, n_heldout=1, max_tokens=24, variants=("same",), max_trials=1)
    _grounding(root, tiny_llama.n_layers, tiny_llama.n_heads)
    return root


# ----------------------------------------------------------------------------- tiny models of many families

FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "stablelm", "gpt_oss",
                "granite", "cohere2", "helium", "gpt2", "gpt_neox", "opt")
WINDOW = 8  # sliding window of the tiny models: smaller than the test prompts

# The engine half of issue 15 (branch families-engine) is not merged yet: checks that go through the engine's
# observed path fail on these families until it lands. Strict xfails: once the engine computes them exactly,
# they fail as XPASS and this table is emptied.



def tiny_family(name: str, seed: int = 0):
    """A seeded random Hugging Face causal LM of family ``name`` (``config.model_type``), eager attention.

    Hidden 64, 3 layers, 4 query heads (2 KV heads where the family has GQA), byte vocabulary (259),
    sliding windows of 8 tokens, softcaps / scales / multipliers that matter. Weights are redrawn
    larger than HF's init (std 1.5/sqrt(fan_in); embeddings std 1; learned sinks std 1) so windows,
    softcaps and sinks change the result.
    """
    import math

    import transformers as tf

    ids = dict(vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    d = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False, **ids)
    alt = ["sliding_attention", "full_attention", "sliding_attention"]
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, final_logit_softcapping=3.0, layer_types=alt)
    configs = {
        "llama": lambda: tf.LlamaConfig(**d),
        "mistral": lambda: tf.MistralConfig(**d, sliding_window=WINDOW),
        "qwen2": lambda: tf.Qwen2Config(**d, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "qwen3": lambda: tf.Qwen3Config(**d, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**d, **gemma, attn_logit_softcapping=5.0),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**d, **gemma),
        "phi3": lambda: tf.Phi3Config(**d),
        "olmo2": lambda: tf.Olmo2Config(**d),
        "stablelm": lambda: tf.StableLmConfig(**d, partial_rotary_factor=0.25, use_qkv_bias=True),
        "gpt_oss": lambda: tf.GptOssConfig(**{**d, "intermediate_size": 64}, head_dim=16, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=WINDOW, layer_types=alt,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "granite": lambda: tf.GraniteConfig(**d, embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5,
                                            attention_multiplier=0.2),
        "cohere2": lambda: tf.Cohere2Config(**d, sliding_window=WINDOW, layer_types=alt, logit_scale=0.5),
        "helium": lambda: tf.HeliumConfig(**d, head_dim=16),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **ids),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**{k: v for k, v in d.items() if k != "num_key_value_heads"},
                                             rotary_pct=0.25),
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                    max_position_embeddings=256, word_embed_proj_dim=32, **ids),
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = tf.AutoModelForCausalLM.from_config(configs[name](), attn_implementation="eager")
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0, 1.0 if "emb" in pname or "wte" in pname or "wpe" in pname
                              else 1.5 / math.sqrt(p.shape[-1]))
                elif "sinks" in pname:
                    p.normal_(0, 1.0)
                elif pname.endswith("bias"):
                    p.normal_(0, 0.1)
                else:  # norm weights
                    p.copy_(1 + 0.1 * torch.randn_like(p))
    return hf.eval()


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``family_model(name)``: the tiny model of ``name`` saved to a folder and loaded with ``load_model`` (cached)."""
    from probe import load_model
    from probe.models.tiny import byte_tokenizer

    root, cache = tmp_path_factory.mktemp("families"), {}

    def get(name: str, dtype: str = "float32"):
        if (name, dtype) not in cache:
            folder = root / name
            if not folder.exists():
                tiny_family(name).save_pretrained(folder)
                byte_tokenizer().save_pretrained(folder)
            cache[name, dtype] = load_model(str(folder), device="cpu", dtype=dtype)
        return cache[name, dtype]

    return get
