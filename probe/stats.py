"""Streaming per-head statistics: what the attention did, row by row, without keeping T x T.

A :class:`StatsRequest` says which layers to watch and which key groups to measure mass on
(e.g. a needle span, the context vs generated tokens, the first token). While it is active the
attention function hands every chunk of probabilities to a :class:`StatsCollector`, which keeps
per layer, head and query row: entropy, max probability, argmax key and group masses; and per
layer, head and key: the received attention sum and how many queries could see the key (for
sink column means). Decode steps append rows, so one record covers prefill and generation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import eager
from .atomic import read_tensors, write_tensors
from .checks import FileCheck, check_token_ids, meta_list
from .errors import InputError

FORMAT = "headwise.head_stats"
VERSIONS = (1,)  # format versions this headwise reads
TENSORS = ("query_pos", "entropy", "max_prob", "argmax", "group_mass", "received_sum", "received_count")  # in a file
MAX_GROUPS = 16


@dataclass(frozen=True)
class KeyGroup:
    """Keys ``[start, stop)`` (``stop=None``: to the end, so it grows with generated tokens)."""

    name: str
    start: int = 0
    stop: int | None = None

    def __post_init__(self):
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise InputError(f"key group {self.name!r} is empty: need 0 <= start < stop")

    def mask(self, n_keys: int, device) -> torch.Tensor:
        m = torch.zeros(n_keys, dtype=torch.bool, device=device)
        m[self.start:n_keys if self.stop is None else min(self.stop, n_keys)] = True
        return m


@dataclass(frozen=True)
class StatsRequest:
    layers: tuple[int, ...] | None = None
    groups: tuple[KeyGroup, ...] = ()
    received: bool = True
    from_pos: int = 0  # only rows with query position >= from_pos (e.g. the last prefill row onward)

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        if len(self.groups) > MAX_GROUPS:
            raise InputError(f"at most {MAX_GROUPS} key groups, got {len(self.groups)}")
        if len({g.name for g in self.groups}) != len(self.groups):
            raise InputError("key group names must be unique")


@dataclass(frozen=True, eq=False)
class HeadStats:
    """Per-head streaming statistics for one sequence (batch size 1).

    Row arrays are ``[layer, head, query]`` over the rows in ``query_pos`` (prefill rows, then one
    row per decode step); ``group_mass`` adds a group axis; ``received_sum`` is ``[layer, head, key]``
    and ``received_count`` ``[key]``. ``layers`` maps the first axis to model layers.
    """

    model_id: str
    layers: tuple[int, ...]
    group_names: tuple[str, ...]
    query_pos: torch.Tensor
    entropy: torch.Tensor
    max_prob: torch.Tensor
    argmax: torch.Tensor
    group_mass: torch.Tensor
    received_sum: torch.Tensor
    received_count: torch.Tensor
    token_ids: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)

    def received_mean(self) -> torch.Tensor:
        """Column means ``[layer, head, key]``: the ACT sink statistic."""
        return self.received_sum / self.received_count.clamp(min=1)

    def mass(self, group: str) -> torch.Tensor:
        """``[layer, head, query]`` attention mass on a named key group."""
        try:
            return self.group_mass[..., self.group_names.index(group)]
        except ValueError:
            raise InputError(f"no key group {group!r}; groups: {list(self.group_names)}") from None

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise InputError(f"layer {layer} was not collected; collected: {list(self.layers)}") from None

    def to_frame(self) -> pd.DataFrame:
        """Tidy per-head summary: one row per layer, head and metric (means over query rows)."""
        rows = []
        for li, layer in enumerate(self.layers):
            for h in range(self.entropy.shape[1]):
                metrics = {"entropy": self.entropy[li, h].mean(), "max_prob": self.max_prob[li, h].mean()}
                for gi, g in enumerate(self.group_names):
                    metrics[f"mass:{g}"] = self.group_mass[li, h, :, gi].mean()
                rows += [{"layer": layer, "head": h, "metric": k, "value": float(v)} for k, v in metrics.items()]
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> Path:
        tensors = {k: getattr(self, k) for k in TENSORS}
        meta = {"format": FORMAT, "version": 1, "model_id": self.model_id, "layers": list(self.layers),
                "group_names": list(self.group_names), "token_ids": list(self.token_ids), "meta": self.meta}
        return write_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "HeadStats":
        """Read statistics back, refusing a damaged, edited or foreign file (see :func:`_check_stats`)."""
        t, m = read_tensors(path, FORMAT, versions=VERSIONS)
        c = FileCheck(path)
        if not isinstance(m.get("model_id"), str):
            c.fail("the metadata has no model_id")
        layers, names = meta_list(c, m, "layers"), meta_list(c, m, "group_names")
        c.increasing("layers", layers)
        c.unique_strings("group_names", names)
        ids = check_token_ids(c, meta_list(c, m, "token_ids"))
        if set(t) != set(TENSORS):
            c.fail(f"tensors {sorted(t)}, expected {sorted(TENSORS)}")
        if not isinstance(m.get("meta", {}), dict):
            c.fail("the metadata's 'meta' is not an object")
        stats = cls(model_id=m["model_id"], layers=tuple(layers), group_names=tuple(names), token_ids=ids,
                    meta=m.get("meta", {}), **t)
        _check_stats(stats, c)
        return stats


def _check_stats(st: HeadStats, c: FileCheck) -> None:
    """Shapes against each other and the metadata; every number in its range.

    Rows: ``query_pos`` strictly increasing, ``argmax`` a visible key (``<= query_pos``), ``max_prob``
    and group masses probabilities, entropy in ``[0, log(keys + 1)]``. Keys: ``received_count`` whole
    numbers of rows, ``received_sum`` in ``[0, received_count]``; no row or key past ``token_ids``.
    """
    if st.entropy.dim() != 3:
        c.fail(f"entropy has shape {tuple(st.entropy.shape)}, expected (layer, head, query)")
    L, H, Q = st.entropy.shape
    K = st.received_count.shape[0] if st.received_count.dim() == 1 else -1
    if len(st.layers) != L:
        c.fail(f"the metadata lists {len(st.layers)} layers, the tensors hold {L}")
    for name, want in (("query_pos", (Q,)), ("max_prob", (L, H, Q)), ("argmax", (L, H, Q)),
                       ("group_mass", (L, H, Q, len(st.group_names))), ("received_count", (None,)),
                       ("received_sum", (L, H, K))):
        c.shape(name, getattr(st, name), want)
    c.integers("query_pos", st.query_pos)
    c.integers("argmax", st.argmax)
    c.increasing("query_pos", st.query_pos.tolist())
    qp = st.query_pos.double()
    c.between("argmax", st.argmax, 0, qp, tol=0)
    c.probabilities("max_prob", st.max_prob)
    c.probabilities("group_mass", st.group_mass)
    c.between("entropy", st.entropy, 0.0, torch.log(qp + 2))
    count = st.received_count.double()
    c.between("received_count", count, 0, Q, tol=0)
    if bool((count != count.round()).any()):
        c.fail("received_count holds fractions (it counts query rows)")
    c.between("received_sum", st.received_sum, 0.0, count * (1 + 1e-4))
    if st.token_ids and ((Q and int(qp.max()) >= len(st.token_ids)) or K > len(st.token_ids)):
        c.fail(f"rows or keys reach past the {len(st.token_ids)} token ids")


class StatsCollector:
    """Receives chunks from the attention function and assembles a :class:`HeadStats`."""

    def __init__(self, request: StatsRequest, n_layers: int, n_heads: int, model_id: str = ""):
        self.request = request
        self.layers = tuple(range(n_layers)) if request.layers is None else tuple(sorted(set(request.layers)))
        self.n_heads, self.model_id = n_heads, model_id
        self._rows: dict[int, list[dict]] = {l: [] for l in self.layers}
        self._recv: dict[int, torch.Tensor] = {}
        self._count = torch.zeros(0, dtype=torch.float64)

    @property
    def has_rows(self) -> bool:
        return any(self._rows.values())

    def wants(self, layer: int) -> bool:
        return layer in self._rows

    def on_chunk(self, layer: int, q_pos: torch.Tensor, probs: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        if probs.shape[0] != 1:
            raise InputError("streaming statistics take one sequence at a time (batch size 1)")
        keep = q_pos >= self.request.from_pos
        if not bool(keep.any()):
            return
        if not bool(keep.all()):
            q_pos, probs = q_pos[keep], probs[:, :, keep]
            scores = None if scores is None else scores[:, :, keep]
        K = probs.shape[-1]
        groups = (torch.stack([g.mask(K, probs.device) for g in self.request.groups])
                  if self.request.groups else None)
        stats = eager.row_stats(probs, groups, scores)
        stats["q_pos"] = q_pos
        self._rows[layer].append({k: v.detach().cpu() for k, v in stats.items()})
        if self.request.received:
            self._receive(layer, q_pos, probs)

    def on_stats(self, layer: int, q_pos: torch.Tensor, stats: dict[str, torch.Tensor],
                 received: torch.Tensor | None = None) -> None:
        """Precomputed row statistics (the fused-kernel path; same meaning as :meth:`on_chunk`).

        ``stats``: ``entropy, max_prob, argmax [B, H, c]`` and ``group_mass [B, H, c, G]`` over the rows
        ``q_pos``; ``received [B, H, K]``: column sums of the final pattern over rows ``>= from_pos``.
        """
        if stats["entropy"].shape[0] != 1:
            raise InputError("streaming statistics take one sequence at a time (batch size 1)")
        keep = q_pos >= self.request.from_pos
        if not bool(keep.any()):
            return
        names = ("entropy", "max_prob", "argmax") + (("group_mass",) if self.request.groups else ())
        row = {k: stats[k][:, :, keep].detach().cpu() for k in names}
        if self.request.groups and row["group_mass"].shape[-1] != len(self.request.groups):
            raise InputError(f"got {row['group_mass'].shape[-1]} group masses for {len(self.request.groups)} "
                             "key groups: pass the request's groups to the kernel")
        row["q_pos"] = q_pos[keep].detach().cpu()
        self._rows[layer].append(row)
        if self.request.received and received is not None:
            self._add_received(layer, q_pos[keep], received[0].detach().double().cpu())

    def _receive(self, layer, q_pos, probs) -> None:
        self._add_received(layer, q_pos, probs[0].sum(1).detach().double().cpu())

    def _add_received(self, layer, q_pos, col) -> None:
        """Add column sums ``col [H, K]`` over query rows ``q_pos`` (and, once per forward, the counts)."""
        K = col.shape[-1]
        prev = self._recv.get(layer)
        if prev is None or prev.shape[1] < K:
            grown = torch.zeros(self.n_heads, K, dtype=torch.float64)
            if prev is not None:
                grown[:, :prev.shape[1]] = prev
            prev = grown
        prev[:, :K] += col
        self._recv[layer] = prev
        if layer == self.layers[0]:
            seen = (torch.arange(K)[None, :] <= q_pos.cpu()[:, None]).sum(0).double()
            if self._count.shape[0] < K:
                self._count = torch.cat([self._count, torch.zeros(K - self._count.shape[0], dtype=torch.float64)])
            self._count[:K] += seen

    def result(self, token_ids=(), meta: dict | None = None) -> HeadStats:
        if not any(self._rows.values()):
            raise InputError("no attention was computed while collecting: run the model inside collect_stats()")
        per_layer = [self._cat(self._rows[l]) for l in self.layers]
        K = max((r.shape[1] for r in self._recv.values()), default=0)
        recv = torch.stack([self._pad(self._recv.get(l), K) for l in self.layers]).float()
        G = len(self.request.groups)
        stack = lambda key: torch.stack([p[key] for p in per_layer])  # noqa: E731
        group_mass = stack("group_mass") if G else torch.zeros(*stack("entropy").shape, 0)
        return HeadStats(model_id=self.model_id, layers=self.layers,
                         group_names=tuple(g.name for g in self.request.groups),
                         query_pos=per_layer[0]["q_pos"], entropy=stack("entropy").float(),
                         max_prob=stack("max_prob").float(), argmax=stack("argmax").long(),
                         group_mass=group_mass.float(), received_sum=recv, received_count=self._count.float(),
                         token_ids=tuple(int(t) for t in token_ids), meta=meta or {})

    @staticmethod
    def _cat(chunks: list[dict]) -> dict[str, torch.Tensor]:
        keys = chunks[0].keys()
        out = {k: torch.cat([c[k][0] if k != "q_pos" else c[k] for c in chunks], dim=-1 if k != "group_mass" else -2)
               for k in keys}
        return out

    def _pad(self, t: torch.Tensor | None, K: int) -> torch.Tensor:
        out = torch.zeros(self.n_heads, K, dtype=torch.float64)
        if t is not None:
            out[:, :t.shape[1]] = t
        return out
