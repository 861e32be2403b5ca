"""``AttentionRecord``: full per-head patterns for a short input, saved as safetensors + JSON.

``patterns`` is ``[layer, head, query_pos, key_pos]`` over the chosen ``layers`` and ``heads``.
Files are written atomically with a sha256 of their contents and validated on load (format tag and
version, sha256, shapes against the metadata, finite probabilities, causal rows summing to 1).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import read_tensors, write_tensors
from .checks import FileCheck, check_token_ids, meta_list
from .errors import CorruptFileError, InputError
from .heads import HeadId

FORMAT = "headwise.attention_record"
VERSIONS = (1,)  # format versions this headwise reads


@dataclass(frozen=True, eq=False)
class AttentionRecord:
    model_id: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    patterns: torch.Tensor  # [layer, head, query_pos, key_pos]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        L, H, Q, K = self.patterns.shape
        if (L, H) != (len(self.layers), len(self.heads)) or Q != K or Q != len(self.token_ids):
            raise InputError(f"patterns {tuple(self.patterns.shape)} do not match {len(self.layers)} layers, "
                             f"{len(self.heads)} heads and {len(self.token_ids)} tokens")

    def pattern(self, head: HeadId | tuple[int, int]) -> torch.Tensor:
        """The ``[query_pos, key_pos]`` pattern of one head."""
        head = HeadId(*head)
        if head.layer not in self.layers or head.head not in self.heads:
            raise InputError(f"{head} is not in this record (layers {list(self.layers)}, heads {list(self.heads)})")
        return self.patterns[self.layers.index(head.layer), self.heads.index(head.head)]

    def save(self, path: str | Path) -> Path:
        meta = {"format": FORMAT, "version": 1, "model_id": self.model_id, "token_ids": list(self.token_ids),
                "tokens": list(self.tokens), "layers": list(self.layers), "heads": list(self.heads),
                "meta": self.meta}
        return write_tensors(path, {"patterns": self.patterns}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "AttentionRecord":
        """Read a record back, refusing a damaged, edited or foreign file (see :func:`_checked_fields`)."""
        tensors, m = read_tensors(path, FORMAT, versions=VERSIONS)
        try:
            rec = cls(**_checked_fields(path, tensors, m))
        except InputError as exc:
            raise CorruptFileError(f"{path}: attention record is inconsistent ({exc}); capture it again") from exc
        sums = rec.patterns.float().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise CorruptFileError(f"{path}: attention rows do not sum to 1; the file is damaged, capture it again")
        return rec


def _checked_fields(path, tensors: dict, m: dict) -> dict:
    """The record's fields from a file, each checked: metadata types, layers and heads strictly
    increasing, one token string per id, patterns ``[layer, head, T, T]`` of finite probabilities
    with nothing on future keys (causal)."""
    c = FileCheck(path, "capture it again")
    if not isinstance(m.get("model_id"), str) or not m["model_id"]:
        c.fail("the metadata has no model_id")
    layers, heads = meta_list(c, m, "layers"), meta_list(c, m, "heads")
    c.increasing("layers", layers)
    c.increasing("heads", heads)
    ids = check_token_ids(c, meta_list(c, m, "token_ids"))
    tokens = meta_list(c, m, "tokens")
    if len(tokens) != len(ids) or any(not isinstance(t, str) for t in tokens):
        c.fail(f"{len(tokens)} token strings for {len(ids)} token ids")
    if set(tensors) != {"patterns"}:
        c.fail(f"tensors {sorted(tensors)}, expected ['patterns']")
    pats = tensors["patterns"]
    c.shape("patterns", pats, (len(layers), len(heads), len(ids), len(ids)))
    c.probabilities("patterns", pats)
    future = torch.triu(torch.ones(len(ids), len(ids), dtype=torch.bool), diagonal=1)
    if bool((pats[..., future].abs() > 1e-6).any()):
        c.fail("patterns put attention on later positions (a causal model never does)")
    meta = m.get("meta", {})
    if not isinstance(meta, dict):
        c.fail("the metadata's 'meta' is not an object")
    return dict(model_id=m["model_id"], token_ids=ids, tokens=tuple(tokens), layers=tuple(layers),
                heads=tuple(heads), patterns=pats, meta=meta)


def run_metadata(**extra) -> dict:
    """Versions and settings stored with every record."""
    import transformers

    from . import __version__

    return {"headwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), **extra}
