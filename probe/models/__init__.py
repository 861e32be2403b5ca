"""Load a causal LM once and wrap it for head-level work.

``load_model`` returns a :class:`Model`: the plain Hugging Face model (its attention routed
through headwise's attention function, so streaming statistics and interventions work in
``forward`` and ``generate``), the tokenizer, the head layout, a stable id, and a lazily built
TransformerLens ``TransformerBridge`` for hook-based capture. The bridge wraps a *twin* that
shares every weight tensor with the plain model, so it costs no second copy of the weights.

>>> m = load_model("tiny-llama")
>>> (m.n_layers, m.n_heads, m.n_kv_heads)
(2, 4, 2)
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..errors import ContextLengthError, InputError, ModelLoadError, UnknownModelError, UnsupportedModelError
from ..heads import HeadLayout
from . import embedded, placement, resolve, tiny
from .placement import Placement

DEFAULT_MODEL = embedded.NAME


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str


MODELS: dict[str, ModelInfo] = {
    embedded.NAME: ModelInfo(embedded.NAME, "SmolLM2-135M-Instruct (embedded, offline; 30 layers, 9 heads, 3 KV heads)"),
    "tiny-llama": ModelInfo("tiny-llama", "seeded random Llama for tests (2 layers, 4 heads, 2 KV heads)"),
    "tiny-gpt2": ModelInfo("tiny-gpt2", "seeded random GPT-2 for tests (2 layers, 4 heads)"),
}


def list_models() -> list[ModelInfo]:
    """Named models, the default first. Any local HF folder or a hub id you name also works."""
    return list(MODELS.values())


@dataclass(eq=False)
class Model:
    """A loaded model with its tokenizer and head layout (see module docstring)."""

    hf: torch.nn.Module
    tokenizer: object
    model_id: str
    source: str
    layout: HeadLayout
    n_ctx: int
    weights_hash: str
    _bridge_dir: str | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def n_heads(self) -> int:
        return self.layout.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.layout.n_kv_heads

    @property
    def d_head(self) -> int:
        cfg = self.hf.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def device(self) -> torch.device:
        """Where inputs go (a split model's first GPU, else the CPU; see :mod:`probe.models.placement`)."""
        return placement.input_device(self.hf)

    @property
    def device_map(self) -> dict | None:
        """``{module: device}`` when accelerate split the model (``load_model(device_map=...)``), else None."""
        return placement.device_map(self.hf)

    @cached_property
    def bridge(self):
        """A TransformerLens ``TransformerBridge`` over a weight-sharing twin of ``hf``."""
        from transformer_lens.model_bridge import TransformerBridge

        if self.device_map is not None:
            raise UnsupportedModelError(
                f"{self.model_id} is split by a device map ({', '.join(placement.devices(self.hf))}); the "
                "TransformerLens bridge needs the whole model on one device. capture() uses the engine's "
                "observer instead (source='observer'), which works across devices")
        twin = share_weights(self.hf)
        return TransformerBridge.boot_transformers(self._bridge_dir or self.source, hf_model=twin,
                                                   tokenizer=self.tokenizer, device=str(self.device),
                                                   dtype=next(self.hf.parameters()).dtype)

    def encode(self, text: str, *, max_len: int | None = None) -> torch.Tensor:
        """Token ids ``[1, T]`` for ``text``, with clear errors for empty or over-long input."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text is empty: give at least one word")
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
        limit = max_len or self.n_ctx
        if ids.shape[1] > limit:
            raise ContextLengthError(
                f"the text is {ids.shape[1]} tokens but {self.model_id} takes at most {limit}: "
                f"shorten it to at most {limit} tokens (a longer document: run `headwise stats` on it in pieces)")
        return ids.to(self.device)

    def str_tokens(self, ids: torch.Tensor | list[int]) -> list[str]:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [self.tokenizer.decode([i]) for i in ids]

    def chat(self, user: str) -> str:
        """``user`` wrapped in the chat template (generation prompt added) when the model has one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                      tokenize=False, add_generation_prompt=True)
        return user


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, *, device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | Path | None = None) -> Model:
    """Load a named model, a local HF folder, or (only when named) a hub id; see :func:`list_models`.

    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or ``{module: device}``), ``max_memory``
    (``{0: "20GiB", "cpu": "64GiB"}``) and ``offload_folder`` split the layers over GPUs, the CPU and the
    disk with accelerate (see :mod:`probe.models.placement`); ``device`` is then not given.

    >>> m = load_model("tiny-llama")
    >>> m.n_layers, m.n_heads, m.n_kv_heads
    (2, 4, 2)
    >>> m.str_tokens(m.encode("hi")[0].tolist())
    ['h', 'i']
    """
    where = Placement(device_map, max_memory, None if offload_folder is None else str(offload_folder))
    if where.split and device is not None:
        raise InputError(f"give device={device!r} or device_map={device_map!r}, not both "
                         "(a device map already says where every layer goes)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(dtype, torch.device("cuda" if where.uses_gpu() else "cpu") if where.split else device)
    from transformers.utils import logging as hf_logging

    where = where.fresh()
    hf_logging.disable_progress_bar()  # one line of ours beats 272 lines of "Loading weights"
    try:
        hf, tok, source, model_id, bridge_dir = _resolve(str(name_or_path), dtype, where)
        if not where.split:
            hf = hf.to(device=device, dtype=dtype)
        elif getattr(hf, "hf_device_map", None) is None:  # built in memory (tiny models): accelerate places it now
            hf = placement.dispatch(hf, where, dtype)
    except BaseException:
        placement.drop_folder(where)
        raise
    finally:
        hf_logging.enable_progress_bar()
    placement.own_folder(hf, where)
    hf = hf.eval()
    from ..runtime import install

    install(hf)
    cfg = hf.config
    layout = HeadLayout(cfg.num_hidden_layers, cfg.num_attention_heads,
                        getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
    return Model(hf=hf, tokenizer=tok, model_id=model_id, source=source, layout=layout,
                 n_ctx=int(n_ctx), weights_hash=weights_fingerprint(hf), _bridge_dir=bridge_dir)


def _resolve(name: str, dtype: torch.dtype, where: Placement | None = None):
    """``(hf, tokenizer, source, model_id, bridge_dir)`` for a named model, a local folder or a hub id.

    A local-looking name never goes to the hub (see :mod:`probe.models.resolve`). Folder and hub models
    are placed by ``from_pretrained`` when ``where`` splits them; tiny ones come back unplaced.
    """
    place = (where or Placement()).from_pretrained_kwargs()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = name.lower()
    if key in ("tiny-llama", "tiny-gpt2"):
        hf = tiny.tiny_llama() if key == "tiny-llama" else tiny.tiny_gpt2()
        folder = tiny.materialise(key, hf)
        return hf, AutoTokenizer.from_pretrained(folder), key, key, str(folder)
    if key in (embedded.NAME, "smollm2", "default"):
        folder = embedded.cached_dir()
        return (_from_dir(AutoModelForCausalLM, folder, dtype, place), AutoTokenizer.from_pretrained(folder),
                str(folder), embedded.NAME, str(folder))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder but has no config.json: point at a Hugging Face model folder")
        return (_from_dir(AutoModelForCausalLM, path, dtype, place), AutoTokenizer.from_pretrained(path),
                str(path.resolve()), path.name, str(path))
    if path.exists():
        raise ModelLoadError(f"{path} is a file, not a model folder: give the folder that holds it and config.json")
    where = resolve.kind(name)
    if where == "path":
        raise resolve.missing_path_error(name)
    if where == "hub":
        hf, tok, snapshot = resolve.load_hub(name, dtype, **place)
        return hf, tok, name, name, str(snapshot) if snapshot else name
    known = ", ".join(MODELS)
    raise UnknownModelError(
        f"unknown model {name!r}: use one of {known}, a local Hugging Face folder, or a hub id like org/name")


def _from_dir(auto, folder, dtype, place: dict | None = None):
    try:
        return auto.from_pretrained(folder, dtype=dtype, **(place or {}))
    except Exception as exc:  # surface as a typed error with the folder named
        raise ModelLoadError(f"could not load a causal LM from {folder}: {exc}") from exc


def _dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
        except KeyError:
            raise InputError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16") from None
    return dtype


def share_weights(hf: torch.nn.Module) -> torch.nn.Module:
    """A second module tree whose parameters and buffers *are* ``hf``'s tensors (no copy)."""
    with torch.device("meta"):
        twin = type(hf)(copy.deepcopy(hf.config))
    twin.load_state_dict(hf.state_dict(), assign=True, strict=True)
    modules = dict(twin.named_modules())
    for name, buf in hf.named_buffers():  # non-persistent buffers (rotary inv_freq) too
        owner, _, attr = name.rpartition(".")
        modules[owner]._buffers[attr] = buf
    twin.generation_config = copy.deepcopy(hf.generation_config)
    return twin.eval()


def weights_fingerprint(hf: torch.nn.Module) -> str:
    """A stable hash of the weights: names, shapes, dtypes and a strided sample of every tensor.

    Only exact element values enter it (no float reductions, whose order depends on the thread
    count), so the same weights give the same hash on any machine and thread setting.
    """
    samples = {}
    for name, p in placement.named_state(hf):  # offloaded weights paged in one module at a time
        flat = p.reshape(-1)
        step = max(1, flat.numel() // 4096)
        samples[name] = (f"{name}:{tuple(p.shape)}:{p.dtype}".encode(),
                         torch.cat([flat[::step][:4096], flat[-1:]]).float().cpu().numpy().tobytes())
    h = hashlib.sha256()
    for name in sorted(samples):
        h.update(samples[name][0])
        h.update(samples[name][1])
    return h.hexdigest()[:16]
