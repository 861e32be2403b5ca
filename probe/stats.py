"""Streaming per-head statistics: what the attention did, row by row, without keeping T x T.

A :class:`StatsRequest` says which layers to watch and which key groups to measure mass on
(e.g. a needle span, the context vs generated tokens, the first token). While it is active the
attention function hands every chunk of probabilities to a :class:`StatsCollector`, which keeps
per layer, head and query row: entropy, max probability, argmax key, group masses and the mass a
learned sink took; per layer, head and key: the received attention sum; and per layer and key how
many queries could see it (from the layer's real mask: sliding windows differ from full layers).
Decode steps append rows, so one record covers prefill and generation. Rows, keys, groups and the
argmax are token positions, also when a sliding-window cache holds only the last keys.
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
VERSIONS = (1, 2)  # format versions this headwise reads (1: no sink_mass, one received_count row for all layers)
TENSORS_V1 = ("query_pos", "entropy", "max_prob", "argmax", "group_mass", "received_sum", "received_count")
TENSORS = TENSORS_V1 + ("sink_mass",)  # in a version-2 file, with "group_count" when it was collected
MAX_GROUPS = 16
OUTPUTS = ("model", "pass")


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

    def contains(self, positions: torch.Tensor) -> torch.Tensor:
        """Bool, shaped like ``positions``: which token positions fall in the group."""
        inside = positions >= self.start
        return inside if self.stop is None else inside & (positions < self.stop)


@dataclass(frozen=True)
class StatsRequest:
    layers: tuple[int, ...] | None = None
    groups: tuple[KeyGroup, ...] = ()
    received: bool = True
    from_pos: int = 0  # only rows with query position >= from_pos (e.g. the last prefill row onward)
    # "model": on the CPU statistics path the attention output is SDPA's own, bit for bit (one more flash
    # call per layer); "pass": a prefill's output comes from the statistics pass's probabilities (no flash
    # call; equal to float32 rounding, not bit for bit). See probe.fast.
    output: str = "model"

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.output not in OUTPUTS:
            raise InputError(f"output must be one of {OUTPUTS}, not {self.output!r}: 'model' keeps the model's "
                             "own attention output bit for bit, 'pass' builds it from the statistics pass (faster)")
        if len(self.groups) > MAX_GROUPS:
            raise InputError(f"at most {MAX_GROUPS} key groups, got {len(self.groups)}")
        if len({g.name for g in self.groups}) != len(self.groups):
            raise InputError("key group names must be unique")


@dataclass(frozen=True, eq=False)
class HeadStats:
    """Per-head streaming statistics for one sequence (batch size 1).

    Row arrays are ``[layer, head, query]`` over the rows in ``query_pos`` (prefill rows, then one
    row per decode step); ``group_mass`` adds a group axis; ``sink_mass`` is the share a learned sink
    (gpt-oss ``s_aux``) took, zero for models without one (rows of the real pattern sum to 1 - sink);
    ``received_sum`` is ``[layer, head, key]`` and ``received_count`` ``[layer, key]`` (the queries that
    could see each key); ``group_count`` ``[layer, query, group]`` is how many keys of each group the
    row could see (a sliding window hides old ones: divide a group mass by it for a mean per key).
    ``layers`` maps the first axis to model layers; ``argmax`` holds key positions.
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
    sink_mass: torch.Tensor | None = None
    group_count: torch.Tensor | None = None  # None in files written before it existed

    def __post_init__(self):
        if self.sink_mass is None:
            object.__setattr__(self, "sink_mass", torch.zeros_like(self.entropy))
        if self.received_count.dim() == 1:  # version-1 files: one count row shared by every layer
            object.__setattr__(self, "received_count",
                               self.received_count.expand(len(self.layers), -1).contiguous())

    def received_mean(self) -> torch.Tensor:
        """Column means ``[layer, head, key]``: the ACT sink statistic."""
        return self.received_sum / self.received_count[:, None, :].clamp(min=1)

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
        if self.group_count is not None:
            tensors["group_count"] = self.group_count
        meta = {"format": FORMAT, "version": 2, "model_id": self.model_id, "layers": list(self.layers),
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
        want = set(TENSORS_V1) if m.get("version") == 1 else set(TENSORS)
        if set(t) not in (want, want | {"group_count"}):
            c.fail(f"tensors {sorted(t)}, expected {sorted(want)}")
        if not isinstance(m.get("meta", {}), dict):
            c.fail("the metadata's 'meta' is not an object")
        stats = cls(model_id=m["model_id"], layers=tuple(layers), group_names=tuple(names), token_ids=ids,
                    meta=m.get("meta", {}), **t)
        _check_stats(stats, c)
        return stats


def _check_stats(st: HeadStats, c: FileCheck) -> None:
    """Shapes against each other and the metadata; every number in its range.

    Rows: ``query_pos`` strictly increasing, ``argmax`` a visible key (``<= query_pos``), ``max_prob``,
    group and sink masses probabilities, entropy in ``[0, log(keys + 1)]``, group counts whole numbers.
    Keys: ``received_count [layer, key]`` whole numbers of rows, ``received_sum`` in ``[0, received_count]``;
    no row or key past ``token_ids``.
    """
    if st.entropy.dim() != 3:
        c.fail(f"entropy has shape {tuple(st.entropy.shape)}, expected (layer, head, query)")
    L, H, Q = st.entropy.shape
    K = st.received_count.shape[-1] if st.received_count.dim() == 2 else -1
    if len(st.layers) != L:
        c.fail(f"the metadata lists {len(st.layers)} layers, the tensors hold {L}")
    for name, want in (("query_pos", (Q,)), ("max_prob", (L, H, Q)), ("argmax", (L, H, Q)),
                       ("group_mass", (L, H, Q, len(st.group_names))), ("received_count", (L, None)),
                       ("received_sum", (L, H, K)), ("sink_mass", (L, H, Q))):
        c.shape(name, getattr(st, name), want)
    if st.group_count is not None:
        c.shape("group_count", st.group_count, (L, Q, len(st.group_names)))
        c.between("group_count", st.group_count, 0, st.query_pos.double()[None, :, None] + 1, tol=0)
        if bool((st.group_count != st.group_count.round()).any()):
            c.fail("group_count holds fractions (it counts keys)")
    c.integers("query_pos", st.query_pos)
    c.integers("argmax", st.argmax)
    c.increasing("query_pos", st.query_pos.tolist())
    qp = st.query_pos.double()
    c.between("argmax", st.argmax, 0, qp, tol=0)
    c.probabilities("max_prob", st.max_prob)
    c.probabilities("group_mass", st.group_mass)
    c.probabilities("sink_mass", st.sink_mass)
    c.between("entropy", st.entropy, 0.0, torch.log(qp + 2))
    count = st.received_count.double()
    c.between("received_count", count, 0, Q, tol=0)
    if bool((count != count.round()).any()):
        c.fail("received_count holds fractions (it counts query rows)")
    c.between("received_sum", st.received_sum, 0.0, count[:, None, :] * (1 + 1e-4))
    if st.token_ids and ((Q and int(qp.max()) >= len(st.token_ids)) or K > len(st.token_ids)):
        c.fail(f"rows or keys reach past the {len(st.token_ids)} token ids")


def _group_counts(call, groups: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[1, rows, G]``: how many keys of each group (``groups [G, K]`` bool) each kept row sees.

    Causal calls without a mask tensor read it off cumulative sums (row ``i`` sees keys ``0..diag+i``)
    instead of a ``T x K`` visibility matrix.
    """
    if call.mask is None and not call.all_visible:
        seen = groups.double().cumsum(-1)
        own = (torch.arange(call.n_queries, device=groups.device) + call.diag)[keep]
        return seen[:, own.clamp(max=call.n_keys - 1)].T.float()[None]
    return (call.visible(slice(None))[0, 0][keep].float() @ groups.T.float())[None]


class StatsCollector:
    """Receives chunks from the attention function and assembles a :class:`HeadStats`.

    Everything is stored by token position: :class:`~probe.call.AttentionCall` maps the key indices
    of each call (which, against a sliding-window cache, start wherever the window starts) to positions.
    """

    def __init__(self, request: StatsRequest, n_layers: int, n_heads: int, model_id: str = ""):
        self.request = request
        self.layers = tuple(range(n_layers)) if request.layers is None else tuple(sorted(set(request.layers)))
        self.n_heads, self.model_id = n_heads, model_id
        self._rows: dict[int, list[dict]] = {l: [] for l in self.layers}
        self._recv: dict[int, torch.Tensor] = {}
        self._count: dict[int, torch.Tensor] = {}

    @property
    def has_rows(self) -> bool:
        return any(self._rows.values())

    def wants(self, layer: int) -> bool:
        return layer in self._rows

    def on_chunk(self, layer: int, call, chunk) -> None:
        """One :class:`~probe.eager.Chunk` of the eager engine for the call ``call`` (batch size 1)."""
        if chunk.probs.shape[0] != 1:
            raise InputError("streaming statistics take one sequence at a time (batch size 1)")
        keep = chunk.q_pos[0] >= self.request.from_pos
        if not bool(keep.any()):
            return
        probs, scores, sink, seen = chunk.probs, chunk.scores, chunk.sink, chunk.seen
        if not bool(keep.all()):
            probs, seen = probs[:, :, keep], seen[:, :, keep]
            scores = None if scores is None else scores[:, :, keep]
            sink = None if sink is None else sink[:, :, keep]
        k_pos = call.k_pos[0]
        groups = (torch.stack([g.contains(k_pos) for g in self.request.groups]) if self.request.groups else None)
        stats = eager.row_stats(probs, groups, scores)
        stats["argmax"] = k_pos[stats["argmax"]]
        if sink is not None:
            stats["sink_mass"] = sink
        if groups is not None:
            stats["group_count"] = (seen[0, 0].to(probs.dtype) @ groups.T.to(probs.dtype))[None]
        self._add_rows(layer, chunk.q_pos[0][keep], stats)
        if self.request.received:
            self._add_received(layer, k_pos, probs[0].sum(1).detach().double(), seen[0, 0].sum(0).double(),
                               int(chunk.q_pos[0].max()))

    def on_stats(self, layer: int, call, stats: dict[str, torch.Tensor], received: torch.Tensor | None = None) -> None:
        """Precomputed row statistics (the fused-kernel path; same meaning as :meth:`on_chunk`).

        ``stats``: ``entropy, max_prob, argmax [B, H, Tq]`` (argmax a key index) and ``group_mass
        [B, H, Tq, G]`` over the call's query rows; ``received [B, H, K]``: column sums of the final
        pattern over rows at positions ``>= from_pos``.
        """
        if stats["entropy"].shape[0] != 1:
            raise InputError("streaming statistics take one sequence at a time (batch size 1)")
        q_pos = call.q_pos[0]
        keep = q_pos >= self.request.from_pos
        every = bool(keep.all())  # decode rows and most prefills: no row to drop, no copy
        if not (every or bool(keep.any())):
            return
        names = ("entropy", "max_prob", "argmax") + (("group_mass",) if self.request.groups else ())
        row = {k: stats[k] if every else stats[k][:, :, keep] for k in names}
        if self.request.groups and row["group_mass"].shape[-1] != len(self.request.groups):
            raise InputError(f"got {row['group_mass'].shape[-1]} group masses for {len(self.request.groups)} "
                             "key groups: pass the request's groups to the kernel")
        row["argmax"] = call.k_pos[0][row["argmax"]]
        if self.request.groups:
            groups = torch.stack([g.contains(call.k_pos[0]) for g in self.request.groups])
            row["group_count"] = _group_counts(call, groups, keep)
        self._add_rows(layer, q_pos if every else q_pos[keep], row)
        if self.request.received and received is not None:
            row0 = 0 if every else int(torch.nonzero(keep)[0])
            self._add_received(layer, call.k_pos[0], received[0].detach().double(),
                               call.visible_counts(row0)[0].double(), int(q_pos.max()))

    def _add_rows(self, layer: int, q_pos: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        row = {k: v.detach().cpu() for k, v in stats.items()}
        if "sink_mass" not in row:
            row["sink_mass"] = torch.zeros_like(row["entropy"])
        row["q_pos"] = q_pos.detach().cpu()
        self._rows[layer].append(row)

    def _add_received(self, layer: int, k_pos: torch.Tensor, col: torch.Tensor, count: torch.Tensor,
                      last: int) -> None:
        """Add column sums ``col [H, K]`` and visible counts ``count [K]`` at the keys' token positions.

        Keys at negative positions (padding) or after the last query ``last`` (a static cache's free
        slots) are never visible and are left out.
        """
        k_pos, col, count = k_pos.cpu(), col.cpu(), count.cpu()
        real = (k_pos >= 0) & (k_pos <= last)
        k_pos, col, count = k_pos[real], col[:, real], count[real]
        n = int(k_pos.max()) + 1 if k_pos.numel() else 0
        recv, cnt = self._recv.get(layer), self._count.get(layer)
        if recv is None or recv.shape[1] < n:
            grown, grown_cnt = torch.zeros(self.n_heads, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
            if recv is not None:
                grown[:, :recv.shape[1]], grown_cnt[:cnt.shape[0]] = recv, cnt
            recv, cnt = grown, grown_cnt
        recv.index_add_(1, k_pos, col)
        cnt.index_add_(0, k_pos, count)
        self._recv[layer], self._count[layer] = recv, cnt

    def result(self, token_ids=(), meta: dict | None = None) -> HeadStats:
        if not any(self._rows.values()):
            raise InputError("no attention was computed while collecting: run the model inside collect_stats()")
        per_layer = [self._cat(self._rows[l]) for l in self.layers]
        K = max((r.shape[1] for r in self._recv.values()), default=0)
        recv = torch.stack([self._pad(self._recv.get(l), K) for l in self.layers]).float()
        count = torch.stack([self._pad(self._count.get(l), K, rows=False) for l in self.layers]).float()
        G = len(self.request.groups)
        stack = lambda key: torch.stack([p[key] for p in per_layer])  # noqa: E731
        group_mass = stack("group_mass") if G else torch.zeros(*stack("entropy").shape, 0)
        group_count = stack("group_count") if G else torch.zeros(len(self.layers), stack("entropy").shape[-1], 0)
        return HeadStats(model_id=self.model_id, layers=self.layers,
                         group_names=tuple(g.name for g in self.request.groups),
                         query_pos=per_layer[0]["q_pos"], entropy=stack("entropy").float(),
                         max_prob=stack("max_prob").float(), argmax=stack("argmax").long(),
                         group_mass=group_mass.float(), received_sum=recv, received_count=count,
                         token_ids=tuple(int(t) for t in token_ids), meta=meta or {},
                         sink_mass=stack("sink_mass").float(), group_count=group_count.float())

    @staticmethod
    def _cat(chunks: list[dict]) -> dict[str, torch.Tensor]:
        keys = chunks[0].keys()
        out = {k: torch.cat([c[k][0] if k != "q_pos" else c[k] for c in chunks],
                            dim=-2 if k in ("group_mass", "group_count") else -1) for k in keys}
        return out

    def _pad(self, t: torch.Tensor | None, K: int, rows: bool = True) -> torch.Tensor:
        out = torch.zeros((self.n_heads, K) if rows else (K,), dtype=torch.float64)
        if t is not None:
            out[..., :t.shape[-1]] = t
        return out
