"""What an edit does to one prompt: the next-token distribution and a generation, before and after.

The interactive intervention of the LLM Transparency Tool, on our engine: pick heads, an edit
(:func:`edit_spec`: zero or mean ablation, uniform attention, a temperature, or a saved ACT
calibration) and a prompt; :func:`compare_edit` runs the plain model and the model under
:func:`probe.intervene` (active for this call only, in this thread: the shared model is never
changed) and returns an :class:`EditComparison`: both next-token distributions, the tokens whose
probability moved most, the KL divergence and greedy continuations side by side.

Mean ablation replaces a head's output by its mean over every position of reference texts
(:func:`head_means`; default the first texts of ``data/similarity/prompts.txt``), the usual
"mean over a reference distribution" of ablation studies (Wang et al. 2022, IOI, use a task's
mean; here the task is the user's prompt, so a neutral corpus is the reference).

>>> from probe import load_model
>>> m = load_model("tiny-llama")
>>> c = compare_edit(m, "hello world", edit_spec(m, "zero", ["L1H0", "L1H1"]), max_new_tokens=2)
>>> c.kl > 0, len(c.to_frame()) == 10, round(float(c.before["p"].sum()), 3) <= 1.0
(True, True, True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from probe import InterventionSpec, MeanAblate, Temperature, Uniform, ZeroAblate, intervene, tap
from probe.errors import InputError
from probe.heads import HeadId, as_heads

EDITS = ("zero", "mean", "uniform", "temperature", "calibration")
EDIT_LABELS = {"zero": "zero-ablate (output := 0)", "mean": "mean-ablate (output := mean over reference texts)",
               "uniform": "uniform attention over the visible keys", "temperature": "scale the scores by 1/t",
               "calibration": "apply a saved ACT calibration"}
REFERENCE_TEXTS = 8          # texts of the reference set whose positions give the mean outputs
REFERENCE_TOKENS = 64


@dataclass(frozen=True, eq=False)
class EditComparison:
    """Next-token distributions and greedy continuations of one prompt, plain and edited."""

    prompt: str
    edit: str                       # a readable description of the edit
    heads: tuple[HeadId, ...]
    before: pd.DataFrame            # token, id, p, logit, rank (every vocabulary entry, by id)
    after: pd.DataFrame
    generated: dict = field(default_factory=dict)     # "plain" / "edited" -> text
    top: int = 10

    @property
    def kl(self) -> float:
        """KL(before || after) of the next-token distributions (nats)."""
        p, q = self.before["p"].to_numpy(), self.after["p"].to_numpy()
        keep = p > 0
        return float(np.sum(p[keep] * (np.log(p[keep]) - np.log(np.maximum(q[keep], 1e-30)))))

    def top_tokens(self, which: str = "before") -> pd.DataFrame:
        df = self.before if which == "before" else self.after
        return df.nsmallest(self.top, "rank")[["token", "p", "logit", "rank"]]

    def to_frame(self) -> pd.DataFrame:
        """The ``top`` tokens whose probability changed most: p and logit before/after, change, ranks."""
        both = self.before.merge(self.after, on=["id", "token"], suffixes=("_before", "_after"))
        both["dp"] = both["p_after"] - both["p_before"]
        both["dlogit"] = both["logit_after"] - both["logit_before"]
        cols = ["token", "id", "p_before", "p_after", "dp", "logit_before", "logit_after", "dlogit", "rank_before",
                "rank_after"]
        return both.reindex(both["dp"].abs().sort_values(ascending=False).index)[cols].head(self.top) \
            .reset_index(drop=True)

    def plot(self) -> go.Figure:
        """Probability before and after of the most-changed tokens."""
        df = self.to_frame()
        labels = [repr(t) for t in df["token"]]
        fig = go.Figure([go.Bar(name="before", x=labels, y=df["p_before"]), go.Bar(name="after", x=labels, y=df["p_after"])])
        return fig.update_layout(barmode="group", title=f"Next token: the {len(df)} most changed ({self.edit}; "
                                 f"KL {self.kl:.3g} nats)", yaxis_title="probability", height=380)


def head_means(model, heads, texts=None) -> dict[HeadId, torch.Tensor]:
    """Each head's output ``[d_head]`` averaged over every position of ``texts`` (default: the reference set)."""
    heads = as_heads(heads)
    if texts is None:
        from .similarity.data import load_texts

        texts = [t[:2000] for t in load_texts("prompts")[:REFERENCE_TEXTS]]
    rec = _MeanOutputs({h.layer for h in heads})
    with torch.no_grad(), tap(model, rec):
        for text in texts:
            model.hf(model.encode(text)[:, :REFERENCE_TOKENS], logits_to_keep=1)
    return {h: (rec.sums[h.layer][h.head] / rec.count[h.layer]).float() for h in heads}


class _MeanOutputs:
    """Tap observer: running sums of each head's output ``[H, D]`` over positions, per layer."""

    def __init__(self, layers: set[int]):
        self.layers, self.sums, self.count = layers, {}, {}

    def on_output(self, layer: int, q_pos: torch.Tensor, out: torch.Tensor):
        s = out.detach().double().sum(dim=(0, 1))                        # [B, T, H, D] -> [H, D]
        self.sums[layer] = self.sums.get(layer, 0) + s
        self.count[layer] = self.count.get(layer, 0) + out.shape[0] * out.shape[1]
        return None


def edit_spec(model, kind: str, heads, *, temperature: float = 2.0, calibration=None,
              means: dict | None = None) -> InterventionSpec:
    """The intervention of one edit ``kind`` (:data:`EDITS`) on ``heads`` (a calibration brings its own heads)."""
    if kind not in EDITS:
        raise InputError(f"unknown edit {kind!r}: use one of {EDITS}")
    if kind == "calibration":
        if calibration is None:
            raise InputError("apply a calibration: choose a saved calib.json (run the sinks analysis to make one)")
        from .sinks.calibration import check_model

        check_model(model, calibration)
        if not calibration.heads:
            raise InputError(f"this calibration keeps no heads ({calibration.task}): applying it changes nothing; "
                             "rerun the sinks search with --selection gold_logprob")
        return calibration.spec()
    heads = [model.layout.check(h) for h in as_heads(heads)]
    if not heads:
        raise InputError("pick at least one head to edit (click it on a grid or add it in the head list)")
    if kind == "zero":
        return InterventionSpec([ZeroAblate(heads=heads)])
    if kind == "uniform":
        return InterventionSpec([Uniform(heads=heads)])
    if kind == "temperature":
        return InterventionSpec([Temperature(heads=heads, temperature=float(temperature))])
    means = means if means is not None else head_means(model, heads)
    return InterventionSpec([MeanAblate(heads=heads, values=[means[h] for h in heads])])


def describe(spec: InterventionSpec) -> str:
    """One line naming each edit of ``spec`` and its heads."""
    parts = []
    for e in spec.edits:
        extra = f" t={e.temperature:g}" if isinstance(e, Temperature) else ""
        heads = ", ".join(map(str, e.heads[:6])) + (f" +{len(e.heads) - 6}" if len(e.heads) > 6 else "")
        parts.append(f"{e.kind}{extra} on {heads}")
    return "; ".join(parts) or "no edit"


def compare_edit(model, prompt: str, spec: InterventionSpec, *, top: int = 10, max_new_tokens: int = 20,
                 chat: bool = False, progress=None) -> EditComparison:
    """Next-token distributions and greedy continuations of ``prompt``, plain and under ``spec``.

    ``progress(done, total, step)`` is told after each of the four runs (two forwards, two generations).
    """
    from .generate import generate_text

    if not spec:
        raise InputError("the edit is empty: pick heads and an edit")
    spec.validate(model.layout, n_ctx=model.n_ctx)
    ids = model.encode(model.chat(prompt) if chat else prompt)
    tell = progress or (lambda *a: None)
    gen = (lambda: generate_text(model, prompt, max_new_tokens=max_new_tokens, chat=chat)) if max_new_tokens \
        else (lambda: "")
    tell(0, 4, "next token, plain")
    before = _next_token(model, ids)
    tell(1, 4, "generation, plain")
    plain = gen()
    with intervene(model, spec):
        tell(2, 4, "next token, edited")
        after = _next_token(model, ids)
        tell(3, 4, "generation, edited")
        edited = gen()
    tell(4, 4, "done")
    return EditComparison(prompt, describe(spec), tuple(spec.heads()), before, after,
                          {"plain": plain, "edited": edited}, top)


@torch.no_grad()
def _next_token(model, ids: torch.Tensor) -> pd.DataFrame:
    logits = model.hf(ids).logits[0, -1].double().cpu()
    p = torch.softmax(logits, -1)
    rank = torch.empty_like(p, dtype=torch.long)
    rank[torch.argsort(-p, stable=True)] = torch.arange(1, p.numel() + 1, device="cpu")
    return pd.DataFrame({"id": np.arange(p.numel()), "token": vocab_strings(model.tokenizer, p.numel()),
                         "p": p.numpy(), "logit": logits.numpy(), "rank": rank.numpy()})


@lru_cache(maxsize=4)
def vocab_strings(tokenizer, n: int) -> tuple[str, ...]:
    """The text of token ids ``0..n-1`` (ids the tokenizer does not know: ``<id N>``); memoised per tokenizer."""
    known = len(tokenizer)
    toks = tokenizer.convert_ids_to_tokens(list(range(min(n, known))))
    out = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in toks]
    return tuple(out + [f"<id {i}>" for i in range(known, n)])
