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
                    d_head: int = 0, activations: tuple[int, int] = (0, 0)) -> Estimate:
    """Streaming statistics at their peak: the larger phase of a layer plus every result kept so far.

    ``work`` (what one attention call holds): ``chunk x T`` scores per head (three fp32 buffers:
    scores, probabilities, one temporary), the flash output and the repeated keys and values
    (``3 x heads x T x d_head``), and the model's own tensors around its attention;
    ``activations = (mlp, attention)`` are the model's own (:func:`activation_bytes`): the MLP
    phase never overlaps the attention call. Results: per layer, head and row entropy, max, sink
    mass (fp32), argmax (int64) and the group masses; per layer, head and key the received sums
    (fp64) and per layer and key the counts.
    """
    mlp, attention = activations
    work = n_heads * chunk * n_tokens * 4 * 3 + 3 * n_heads * n_tokens * d_head * 4 + attention
    rows = n_layers * n_heads * n_tokens * (4 * 3 + 8 + 4 * n_groups)
    keys = n_layers * (n_heads + 1) * n_tokens * 8
    return Estimate(f"streaming statistics over {n_tokens} tokens (chunk {chunk})", max(work, mlp) + rows + keys,
                    work)


def activation_bytes(config, n_tokens: int) -> tuple[int, int]:
    """``(mlp, attention)``: the fp32 tensors a plain forward holds in a layer's MLP and around its attention.

    MLP: the activation, up projection and their product (``3 x d_ff``) beside the residual
    stream and its norm (``2 x d_model``); attention: the residual stream and its norm, the q/k/v
    projections and their rotated copies (``2 x (heads + 2 kv_heads) x d_head``), per token.
    Read from the Hugging Face config (``hidden_size``, ``intermediate_size``, head counts).
    """
    d = int(getattr(config, "hidden_size", 0) or 0)
    ff = int(getattr(config, "intermediate_size", 0) or 4 * d)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    dh = int(getattr(config, "head_dim", None) or d // heads)
    return n_tokens * (3 * ff + 2 * d) * 4, n_tokens * (2 * d + 2 * (heads + 2 * kv) * dh) * 4


def check_budget(est: Estimate, budget: int, hint: str) -> None:
    if est.bytes > budget:
        raise MemoryBudgetError(f"{est} exceeds the budget of {human(budget)}. {hint}")
