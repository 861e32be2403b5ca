"""Memory estimates made before a run, so a user learns the cost before paying it."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import MemoryBudgetError

DEFAULT_CAPTURE_BUDGET = 2 * 2**30


@dataclass(frozen=True)
class Estimate:
    what: str
    bytes: int
    work: int = 0        # the part one attention call holds (on the layer's device); the rest is results

    def __str__(self) -> str:
        return f"{self.what}: ~{human(self.bytes)}"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def capture_estimate(n_layers: int, n_heads: int, n_tokens: int, bytes_per: int = 4) -> Estimate:
    """Full patterns ``[layers, heads, T, T]`` plus the hooks' own copies (~2x, measured)."""
    patterns = n_layers * n_heads * n_tokens * n_tokens * bytes_per
    return Estimate(f"capture of {n_layers}x{n_heads} heads over {n_tokens} tokens", 2 * patterns)


def stream_estimate(n_layers: int, n_heads: int, n_tokens: int, chunk: int, n_groups: int = 0) -> Estimate:
    """Streaming statistics: chunk x T scores per head, plus the per-row and per-key results."""
    work = n_heads * chunk * n_tokens * 4 * 3
    results = n_layers * n_heads * n_tokens * (4 * 3 + 4 * n_groups + 8)
    return Estimate(f"streaming statistics over {n_tokens} tokens (chunk {chunk})", work + results, work)


def check_budget(est: Estimate, budget: int, hint: str) -> None:
    if est.bytes > budget:
        raise MemoryBudgetError(f"{est} exceeds the budget of {human(budget)}. {hint}")
