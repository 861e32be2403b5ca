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


def stream_estimate(n_layers: int, n_heads: int, n_tokens: int, chunk: int, n_groups: int = 0, *,
                    d_head: int = 0, forward: int = 0) -> Estimate:
    """Streaming statistics: what one attention call holds (``work``) plus the results kept per row and key.

    ``work``: ``chunk x T`` scores per head (three fp32 buffers: scores, probabilities, one
    temporary), the flash output and the repeated keys and values (``3 x heads x T x d_head``),
    and ``forward``, the model's own activations (:func:`forward_bytes`). Results: per layer,
    head and row entropy, max, sink mass (fp32), argmax (int64) and the group masses, held twice
    while they are concatenated; per layer, head and key the received sums (fp64, then fp32).
    """
    work = n_heads * chunk * n_tokens * 4 * 3 + 3 * n_heads * n_tokens * d_head * 4 + forward
    rows = n_layers * n_heads * n_tokens * (4 * 3 + 8 + 4 * n_groups) * 2
    keys = n_layers * n_heads * n_tokens * (8 + 4)
    return Estimate(f"streaming statistics over {n_tokens} tokens (chunk {chunk})", work + rows + keys, work)


def forward_bytes(config, n_tokens: int) -> int:
    """Peak activations of one plain forward (fp32): the residual stream and a layer's attention and MLP
    temporaries (``4 x d_model + 3 x d_ff`` per token; read from the Hugging Face config)."""
    d = int(getattr(config, "hidden_size", 0) or 0)
    ff = int(getattr(config, "intermediate_size", 0) or 4 * d)
    return n_tokens * (4 * d + 3 * ff) * 4


def check_budget(est: Estimate, budget: int, hint: str) -> None:
    if est.bytes > budget:
        raise MemoryBudgetError(f"{est} exceeds the budget of {human(budget)}. {hint}")
