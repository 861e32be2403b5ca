"""The tasks of the transfer matrix: each gives one performance value per item (higher is better).

=========== ================================================================ ===========================
task        items                                                            per-item value
=========== ================================================================ ===========================
``niah``    needle-in-a-haystack cells (the retrieval harness, §1)           success (ROUGE-1 recall > 0.5)
``ioi``     IOI prompts (the circuits task, §3), seeds apart from the scan's  logit difference IO - S
``induction`` ``[prefix] r_1..r_n r_1..r_k``, distinct random tokens        top-1 is ``r_{k+1}`` (0/1)
``grounded`` held-out grounding items (facts never used to fit, §5)          answer names the passage's value
``act``     held-out items of the ACT search's task (§2)                     argmax label is gold (0/1)
``loss``    held-out texts (data/similarity)                                 minus the mean token NLL
=========== ================================================================ ===========================

``decode_only`` runs the rows that emit the scored tokens as decode rows (the prompt but its last
token is prefilled, the last token is the first decode step), so a knock-out restricted to decoding
(retrieval's uniform attention, §1) acts exactly on the rows that produce the answer; every other
knock-out acts on the whole forward. For ``loss`` every row emits, so ``decode_only`` does not apply.

Methods: docs/methods.md §7.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from probe import InterventionSpec, greedy, intervene, stop_ids
from probe.errors import InputError

from .repeats import prefix_ids, token_ids

TASKS = ("niah", "ioi", "induction", "grounded", "act", "loss")
METRICS = {"niah": "NIAH success", "ioi": "IOI logit difference", "induction": "induction accuracy",
           "grounded": "held-out grounded rate", "act": "ACT task accuracy", "loss": "minus LM loss (nats/token)"}


@dataclass(frozen=True)
class TaskSettings:
    """What the tasks are built from (the ``transfer`` stage's settings)."""

    n_items: int = 32
    seed: int = 0
    niah_cells: tuple = (("code", 300, 25.0), ("cat", 300, 50.0), ("lisbon", 300, 75.0), ("word", 300, 25.0))
    max_new_tokens: int = 16
    induction_len: int = 12
    token_range: tuple | None = None
    bos: str = "auto"
    loss_texts: int = 4
    loss_tokens: int = 128
    act_task: str = "sentiment"
    act_shots: int = 0


# ----------------------------------------------------------------------------- forwards whose emitting rows decode

@torch.no_grad()
def last_logits(model, ids, mask=None, pos=None, *, decode_only: bool = False) -> torch.Tensor:
    """``[B, vocab]`` logits of the last position (``decode_only``: that row as one decode step)."""
    if not decode_only:
        return model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
    if ids.shape[1] < 2:
        raise InputError("a prompt of one token has no prefill to decode from")
    out = model.hf(input_ids=ids[:, :-1], attention_mask=None if mask is None else mask[:, :-1],
                   position_ids=None if pos is None else pos[:, :-1], use_cache=True, logits_to_keep=1)
    out = model.hf(input_ids=ids[:, -1:], attention_mask=mask, position_ids=None if pos is None else pos[:, -1:],
                   past_key_values=out.past_key_values, use_cache=True)
    return out.logits[:, -1].float()


@torch.no_grad()
def answer(model, ids: torch.Tensor, *, max_new_tokens: int, decode_only: bool = False) -> list[int]:
    """Greedy new tokens after ``ids [1, T]`` (stops at a newline); ``decode_only`` as in :func:`last_logits`."""
    if decode_only:
        past = model.hf(ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
        out = model.hf(ids[:, -1:], past_key_values=past, use_cache=True)
    else:
        out = model.hf(ids, use_cache=True, logits_to_keep=1)
    return greedy(model, out.logits[0, -1], out.past_key_values, max_new_tokens=max_new_tokens,
                  stop=stop_ids(model, newline=True))


# ----------------------------------------------------------------------------- the tasks

def _niah(model, s: TaskSettings):
    from ..retrieval.harness import build_prompt, load_needles

    known = {n.name: n for n in load_needles()}
    missing = sorted({c[0] for c in s.niah_cells} - set(known))
    if missing:
        raise InputError(f"unknown needle(s) {missing} in niah_cells; known: {sorted(known)}")
    return [build_prompt(model, known[n], int(L), float(d), max_new_tokens=s.max_new_tokens) for n, L, d in s.niah_cells]


def _niah_eval(model, prompts, s: TaskSettings, decode_only: bool) -> np.ndarray:
    from ..retrieval.harness import rouge1_recall

    out = []
    for p in prompts:
        new = answer(model, p.ids, max_new_tokens=s.max_new_tokens, decode_only=decode_only)
        text = model.tokenizer.decode(new, skip_special_tokens=True).strip()
        out.append(float(rouge1_recall(p.needle.answer, text) > 0.5))
    return np.array(out)


def _ioi(model, s: TaskSettings):
    from ..circuits.tasks import make_task

    return make_task(model, "ioi", s.n_items, 1000 + s.seed)       # prompts apart from the circuits scan's


def _ioi_eval(model, task, s: TaskSettings, decode_only: bool) -> np.ndarray:
    from ..circuits.patching import logit_diff

    parts = [logit_diff(last_logits(model, task.clean[i:i + 16], decode_only=decode_only), task.good[i:i + 16],
                        task.bad[i:i + 16]) for i in range(0, task.n, 16)]
    return torch.cat(parts).double().cpu().numpy()


def _induction(model, s: TaskSettings):
    low, high = token_ids(model, s.token_range)
    n, k = s.induction_len, s.induction_len // 2
    if high - low < n:
        raise InputError(f"only {high - low} token ids in [{low}, {high}) for {n} distinct random tokens: use a "
                         "smaller induction_len or a wider token_range")
    g = torch.Generator().manual_seed(2000 + s.seed)
    seqs = [torch.randperm(high - low, generator=g, device="cpu")[:n] + low for _ in range(s.n_items)]
    prefix = torch.tensor(prefix_ids(model, s.bos), dtype=torch.long, device="cpu")
    ids = torch.stack([torch.cat([prefix, q, q[:k]]) for q in seqs]).to(model.device)
    return ids, torch.stack([q[k] for q in seqs]).to(model.device)


def _induction_eval(model, task, s: TaskSettings, decode_only: bool) -> np.ndarray:
    ids, want = task
    top = torch.cat([last_logits(model, ids[i:i + 16], decode_only=decode_only).argmax(-1) for i in range(0, len(ids), 16)])
    return (top == want).double().cpu().numpy()


def _grounded(model, s: TaskSettings):
    import random

    from ..grounding.data import build_items, split_of

    items = [it for it in build_items() if split_of(it) == "heldout"]
    random.Random(s.seed).shuffle(items)
    return [(model.encode(it.prompt), it) for it in items[:s.n_items]]


def _grounded_eval(model, items, s: TaskSettings, decode_only: bool) -> np.ndarray:
    from ..grounding.data import label

    out = []
    for ids, it in items:
        text = model.tokenizer.decode(answer(model, ids, max_new_tokens=10, decode_only=decode_only))
        out.append(float(label(text, it.passage_value, it.true_value) == 1))
    return np.array(out)


def _act(model, s: TaskSettings):
    from ..sinks.tasks import label_token_ids, load_task, task_batches

    task = load_task(s.act_task).limited(s.n_items)
    return task_batches(model, task, "heldout", s.act_shots, 16), label_token_ids(model.tokenizer, task.labels)


def _act_eval(model, task, s: TaskSettings, decode_only: bool) -> np.ndarray:
    batches, labels = task
    out = [(last_logits(model, b.ids, b.mask, b.pos, decode_only=decode_only)[:, labels].argmax(-1).cpu() == b.gold)
           for b in batches]
    return torch.cat(out).double().numpy()


def _loss(model, s: TaskSettings):
    from ..similarity.data import load_texts
    from ..similarity.run import tokenize

    return tokenize(model, load_texts("heldout")[:s.loss_texts], s.loss_tokens, "held-out text")


@torch.no_grad()
def _loss_eval(model, texts, s: TaskSettings, decode_only: bool) -> np.ndarray:
    out = []
    for ids in texts:
        logits = model.hf(ids).logits[0, :-1].float()
        out.append(-float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    return np.array(out)


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable[[Any, TaskSettings], Any]
    evaluate: Callable[[Any, Any, TaskSettings, bool], np.ndarray]
    binary: bool
    emits_all_rows: bool = False


REGISTRY = {t.name: t for t in (
    Task("niah", _niah, _niah_eval, True), Task("ioi", _ioi, _ioi_eval, False),
    Task("induction", _induction, _induction_eval, True), Task("grounded", _grounded, _grounded_eval, True),
    Task("act", _act, _act_eval, True), Task("loss", _loss, _loss_eval, False, emits_all_rows=True))}


def get_task(name: str) -> Task:
    if name not in REGISTRY:
        raise InputError(f"unknown task {name!r}: use one of {list(REGISTRY)}")
    return REGISTRY[name]


def evaluate(model, name: str, settings: TaskSettings, spec: InterventionSpec | None = None,
             decode_only: bool = False) -> np.ndarray:
    """Per-item performance of task ``name`` with ``spec`` applied (the task is rebuilt: pure of the settings)."""
    task = get_task(name)
    items = task.build(model, settings)
    with intervene(model, spec or InterventionSpec()):
        return task.evaluate(model, items, settings, decode_only and not task.emits_all_rows)
