"""``AttentionRecord``: full per-head patterns for a short input, saved as safetensors + JSON.

``patterns`` is ``[layer, head, query_pos, key_pos]`` over the chosen ``layers`` and ``heads``.
For a model with learned attention sinks (gpt-oss ``s_aux``) the rows sum to less than 1 and
``sink_mass [layer, head, query_pos]`` records the share the sink took.
Files are written atomically with a sha256 of their contents and validated on load (format tag and
version, sha256, shapes against the metadata, finite probabilities, causal rows summing to 1 with the
sink's share, if any).
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
    sink_mass: torch.Tensor | None = None  # [layer, head, query_pos]: a learned sink's share (None: no sink)

    def __post_init__(self):
        L, H, Q, K = self.patterns.shape
        if (L, H) != (len(self.layers), len(self.heads)) or Q != K or Q != len(self.token_ids):
            raise InputError(f"patterns {tuple(self.patterns.shape)} do not match {len(self.layers)} layers, "
                             f"{len(self.heads)} heads and {len(self.token_ids)} tokens")
        if self.sink_mass is not None and tuple(self.sink_mass.shape) != (L, H, Q):
            raise InputError(f"sink_mass {tuple(self.sink_mass.shape)} does not match patterns [{L}, {H}, {Q}, ...]")

    def row_sums_ok(self, atol: float = 1e-3) -> bool:
        """Rows are distributions: each sums to 1, or to 1 minus the sink's share (never above 1)."""
        sums = self.patterns.float().sum(-1)
        if self.sink_mass is None:
            return bool(torch.allclose(sums, torch.ones_like(sums), atol=atol))
        return bool((sums <= 1 + atol).all() and torch.allclose(sums + self.sink_mass.float(), torch.ones_like(sums),
                                                               atol=atol))

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
        tensors = {"patterns": self.patterns}
        if self.sink_mass is not None:
            tensors["sink_mass"] = self.sink_mass
        return write_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "AttentionRecord":
        """Read a record back, refusing a damaged, edited or foreign file (see :func:`_checked_fields`)."""
        tensors, m = read_tensors(path, FORMAT, versions=VERSIONS)
        try:
            rec = cls(**_checked_fields(path, tensors, m))
        except InputError as exc:
            raise CorruptFileError(f"{path}: attention record is inconsistent ({exc}); capture it again") from exc
        if not rec.row_sums_ok():
            raise CorruptFileError(f"{path}: attention rows do not sum to 1 (with the sink's share, if any); the file "
                                   "is damaged, capture it again")
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
    if set(tensors) not in ({"patterns"}, {"patterns", "sink_mass"}):
        c.fail(f"tensors {sorted(tensors)}, expected ['patterns'] (and 'sink_mass' for a model with sinks)")
    pats, sink = tensors["patterns"], tensors.get("sink_mass")
    c.shape("patterns", pats, (len(layers), len(heads), len(ids), len(ids)))
    c.probabilities("patterns", pats)
    if sink is not None:
        c.shape("sink_mass", sink, (len(layers), len(heads), len(ids)))
        c.probabilities("sink_mass", sink)
    future = torch.triu(torch.ones(len(ids), len(ids), dtype=torch.bool), diagonal=1)
    if bool((pats[..., future].abs() > 1e-6).any()):
        c.fail("patterns put attention on later positions (a causal model never does)")
    meta = m.get("meta", {})
    if not isinstance(meta, dict):
        c.fail("the metadata's 'meta' is not an object")
    return dict(model_id=m["model_id"], token_ids=ids, tokens=tuple(tokens), layers=tuple(layers),
                heads=tuple(heads), patterns=pats, meta=meta, sink_mass=sink)


def run_metadata(**extra) -> dict:
    """Versions and settings stored with every record."""
    import transformers

    from . import __version__

    return {"headwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), **extra}
