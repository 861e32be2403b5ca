"""``AttentionRecord``: full per-head patterns for a short input, saved as safetensors + JSON.

``patterns`` is ``[layer, head, query_pos, key_pos]`` over the chosen ``layers`` and ``heads``.
For a model with learned attention sinks (gpt-oss ``s_aux``) the rows sum to less than 1 and
``sink_mass [layer, head, query_pos]`` records the share the sink took.
Files are written atomically and validated on load (format tag, shapes, rows plus sink summing to 1).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import read_tensors, write_tensors
from .errors import CorruptFileError, InputError
from .heads import HeadId

FORMAT = "headwise.attention_record"


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
        tensors, m = read_tensors(path, FORMAT)
        try:
            rec = cls(model_id=m["model_id"], token_ids=tuple(m["token_ids"]), tokens=tuple(m["tokens"]),
                      layers=tuple(m["layers"]), heads=tuple(m["heads"]), patterns=tensors["patterns"],
                      meta=m.get("meta", {}), sink_mass=tensors.get("sink_mass"))
        except (KeyError, InputError) as exc:
            raise CorruptFileError(f"{path}: attention record is inconsistent ({exc}); capture it again") from exc
        if not rec.row_sums_ok():
            raise CorruptFileError(f"{path}: attention rows do not sum to 1 (with the sink's share, if any); the file "
                                   "is damaged, capture it again")
        return rec


def run_metadata(**extra) -> dict:
    """Versions and settings stored with every record."""
    import transformers

    from . import __version__

    return {"headwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), **extra}
