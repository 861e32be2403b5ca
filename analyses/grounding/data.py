"""Counterfactual grounding items, generated answers and automatic labels.

Each item is a short passage that states a counterfactual fact ("the capital of France is
Lyon") and asks about it. The embedded model answers greedily; the answer is labelled
grounded (1) if it names the passage's value and not the real-world one, not grounded (0) if it
names the real-world value and not the passage's, and dropped as ambiguous otherwise. Templates
and facts ship in ``data/grounding/facts.json``; the answers are the units of the ``items`` stage.

Methods: docs/methods.md §5.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from probe.errors import CorruptFileError
from probe.streaming import generate_with_stats

from ..data import data_path
from .lookback import Regions, ratios_from_stats, regions

NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


@dataclass(frozen=True)
class Item:
    item_id: str
    fact_id: int
    template_id: int
    prompt: str
    context_end: int      # character offset where the response header (the last line) starts
    passage_value: str
    true_value: str
    passage: tuple[int, int] = (0, 0)   # character span of the passage (filler + statement), not the question


def load_facts(path: str | Path | None = None) -> dict:
    path = Path(path) if path else data_path("grounding", "facts.json")
    try:
        spec = json.loads(path.read_text())
        assert spec["templates"] and spec["facts"] and spec["fillers"]
    except (OSError, ValueError, KeyError, AssertionError) as exc:
        raise CorruptFileError(f"{path}: not a grounding facts file ({exc}); restore data/grounding/facts.json") from exc
    return spec


def build_items(spec: dict | None = None, limit: int | None = None) -> list[Item]:
    """Every fact x counterfactual value x template, in a fixed order (fillers rotate).

    ``extra_templates`` (a later round) come after all items of ``templates``, and ``extra_facts``
    (the round after, with every template) after those, so the shards of an earlier run stay
    valid when templates or facts are added.
    """
    spec = spec or load_facts()
    base = list(enumerate(spec["templates"]))
    n0, facts = len(spec["templates"]), list(enumerate(spec["facts"]))
    extra_t = [(n0 + i, t) for i, t in enumerate(spec.get("extra_templates", []))]
    extra_f = [(len(facts) + i, f) for i, f in enumerate(spec.get("extra_facts", []))]
    items = _items(spec, base, facts) + _items(spec, extra_t, facts) + _items(spec, base + extra_t, extra_f)
    return items[:limit]


def _items(spec: dict, templates: list[tuple[int, str]], facts: list[tuple[int, dict]]) -> list[Item]:
    items = []
    for fi, fact in facts:
        for ai, alt in enumerate(fact["alts"]):
            for ti, tmpl in templates:
                filler = spec["fillers"][(fi + ai + ti) % len(spec["fillers"])]
                statement = fact["statement"].format(x=alt)
                statement = statement[0].upper() + statement[1:]
                prompt = tmpl.format(filler=filler, statement=statement, question=fact["question"])
                span = _passage_span(prompt, statement, filler if "{filler}" in tmpl else None)
                items.append(Item(f"f{fi}a{ai}t{ti}", fi, ti, prompt, prompt.rindex("\n"), alt, fact["true"], span))
    return items


def _passage_span(prompt: str, statement: str, filler: str | None) -> tuple[int, int]:
    """Characters of the passage: the statement (with its full stop) and the filler sentence, if any."""
    s0 = prompt.index(statement)
    s1 = s0 + len(statement) + (prompt[s0 + len(statement):].startswith("."))
    if filler is None:
        return s0, s1
    f0 = prompt.index(filler)
    return min(s0, f0), max(s1, f0 + len(filler))


def split_of(item: Item, held_out: float = 0.3) -> str:
    """Split by fact (never the same fact in both sets), from a hash so it is stable."""
    h = int(hashlib.sha256(f"fact{item.fact_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < held_out else "train"


def label(answer: str, passage_value: str, true_value: str) -> int | None:
    """1 grounded (passage value only), 0 not grounded (real-world value only), None ambiguous.

    >>> label(" Lyon.", "Lyon", "Paris"), label(" Paris", "Lyon", "Paris"), label(" Nice", "Lyon", "Paris")
    (1, 0, None)
    """
    def has(v):
        forms = {v.lower(), NUMBERS.get(v.lower(), v.lower())}
        return any(re.search(rf"\b{re.escape(f)}\b", answer.lower()) for f in forms)

    p, t = has(passage_value), has(true_value)
    return 1 if p and not t else 0 if t and not p else None


def item_regions(model, item: Item, reading: str = "code") -> tuple[torch.Tensor, Regions]:
    """Token ids of the prompt and its key regions (context = everything before the response header)."""
    return text_regions(model, item.prompt, item.context_end, reading)


def text_regions(model, prompt: str, context_end: int | None = None, reading: str = "code"):
    """Ids and regions of ``prompt`` whose context is ``prompt[:context_end]`` (default: up to its last line).

    A one-line prompt keeps all but its last token as context.
    """
    ids = model.encode(prompt)
    if context_end is None:
        context_end = prompt.rfind("\n")
    if context_end <= 0:
        return ids, regions(ids.shape[1], 0, ids.shape[1] - 1, reading)
    head = model.encode(prompt[:context_end])
    c1 = head.shape[1]
    if c1 >= ids.shape[1] or not torch.equal(ids[0, :c1], head[0]):
        c1 = int((ids[0, :c1] == head[0, :min(c1, ids.shape[1])]).cumprod(0).sum())
    return ids, regions(ids.shape[1], 0, c1, reading)


def answer_item(model, item: Item, *, max_new_tokens: int = 10, reading: str = "code", spec=None) -> dict:
    """Greedy answer with lookback ratios of the rows that produced each answer token."""
    ids, reg = item_regions(model, item, reading)
    gen = generate_with_stats(model, ids, max_new_tokens=max_new_tokens, groups=reg.groups(),
                              stats_in_prefill="last", stop_at_newline=True, prefill_spec=spec, decode_spec=spec)
    answer = model.tokenizer.decode(gen.new_ids[0])
    row = {"item_id": item.item_id, "fact_id": item.fact_id, "template_id": item.template_id,
           "split": split_of(item), "prompt": item.prompt, "answer": answer, "n_new": gen.n_new,
           "passage_value": item.passage_value, "true_value": item.true_value,
           "label": label(answer, item.passage_value, item.true_value), "ctx_stop": reg.ctx_stop,
           "new_start": reg.new_start, "prompt_len": reg.prompt_len}
    if gen.n_new and gen.stats is not None:
        lr = ratios_from_stats(gen.stats, reg)[:gen.n_new]  # row i produced new token i
        row["row_lr"] = lr.flatten().tolist()
    else:
        row["row_lr"] = []
    return row
