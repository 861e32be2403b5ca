"""Needle-in-a-haystack harness (Wu et al. 2024, arXiv 2404.15574; code nightdessert/Retrieval_Head).

A haystack of natural text is cut to a token budget, a needle sentence is inserted at a depth
(fraction of the context, snapped back to the preceding sentence end, as the reference does), and
the question is appended: ``<book>{context}</book>\\nBased on the content of the book, Question: {q}\\nAnswer:``
inside the chat template for instruct models (the reference's chat form), plain otherwise. A
completion-style lead-in (``"The secret code ... is"``) is appended by default: it helps a small model.

**Haystacks** (``data/retrieval/haystacks/``): each shipped needle has its own public-domain book
excerpt (Jane Austen, >= 10,000 words each, see ``data/retrieval/README.md``), taken in reading
order and never repeated: a length the excerpt cannot fill is an :class:`InputError` (the embedded
model's full 8k context fits with room to spare). ``repeat=True`` restores the old behaviour
(paragraphs shuffled and cycled) for a short custom haystack. Method notes: docs/methods.md §1.

The answer span ``[s, e)`` is located in the *tokenized prompt* by exact token subsequence search;
if the answer's tokens are not a subsequence (a tokenization boundary merged it with its
neighbours), that is an :class:`InputError`, never a silent zero.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from probe.errors import ContextLengthError, InputError

from ..data import data_path

DEFAULT_HAYSTACK = "northanger_abbey"
QUESTION = "\nBased on the content of the book, Question: {q}\nAnswer:"


@dataclass(frozen=True)
class Needle:
    name: str
    needle: str
    question: str
    answer: str
    lead: str = ""
    haystack: str = ""   # name of its haystack in data/retrieval/haystacks/ ("" = DEFAULT_HAYSTACK)


@dataclass(frozen=True)
class Prompt:
    """One NIAH prompt: token ids ``[1, T]``, the answer span ``[start, stop)`` and its grid cell."""

    ids: torch.Tensor
    start: int
    stop: int
    needle: Needle
    length: int
    depth: float


def load_needles(path: str | Path | None = None) -> list[Needle]:
    path = Path(path) if path else data_path("retrieval", "needles.jsonl")
    return [Needle(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def load_haystack(path: str | Path | None = None, name: str | None = None) -> list[str]:
    """Paragraphs (blank-line separated) of ``path``, or of the shipped haystack ``name``."""
    if path is None:
        folder = data_path("retrieval", "haystacks")
        name = name or DEFAULT_HAYSTACK
        path = folder / f"{name}.txt"
        if not path.exists():
            known = sorted(p.stem for p in folder.glob("*.txt"))
            raise InputError(f"unknown haystack {name!r}; shipped: {known}")
    text = Path(path).read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def select_needles(names: list[str] | None, needles: list[Needle] | None = None) -> list[Needle]:
    needles = needles or load_needles()
    if not names:
        return needles
    known = {n.name: n for n in needles}
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"unknown needle(s) {missing}; known: {sorted(known)}")
    return [known[n] for n in names]


def haystack_text(paragraphs: list[str], n_words: int, seed: int) -> str:
    """Paragraphs in a seeded order, repeated until at least ``n_words`` words (``repeat=True`` only)."""
    rng, out, words = random.Random(seed), [], 0
    while words < n_words:
        order = paragraphs[:]
        rng.shuffle(order)
        for p in order:
            out.append(p)
            words += len(p.split())
    return "\n\n".join(out)


def haystack_ids(tok, paragraphs: list[str], budget: int, *, repeat: bool = False, seed: int = 0) -> list[int]:
    """The first ``budget`` tokens of the paragraphs in reading order, each paragraph used at most once.

    Raises :class:`InputError` when the paragraphs hold fewer tokens (unless ``repeat``).
    """
    if repeat:
        return tok(haystack_text(paragraphs, budget + 50, seed), add_special_tokens=False).input_ids[:budget]
    used, n = [], 0
    for p in paragraphs:
        used.append(p)
        n += len(tok(p, add_special_tokens=False).input_ids) + 1
        if n >= budget + 8:
            break
    ids = tok("\n\n".join(used), add_special_tokens=False).input_ids
    if len(ids) < budget:
        raise InputError(f"the haystack holds {len(ids)} tokens, fewer than the {budget} asked for: use a smaller "
                         "length, a longer haystack, or repeat=True (paragraphs are then reused)")
    return ids[:budget]


def build_prompt(model, needle: Needle, length: int, depth: float, *, max_new_tokens: int = 50,
                 lead: bool = True, paragraphs: list[str] | None = None, seed: int = 0,
                 repeat: bool = False) -> Prompt:
    """The NIAH prompt of about ``length`` tokens with ``needle`` at ``depth`` percent.

    The haystack is ``paragraphs`` or the needle's own shipped haystack; ``repeat``/``seed``: see
    :func:`haystack_ids`."""
    _check_cell(model, needle, length, depth, max_new_tokens)
    tok = model.tokenizer
    overhead = len(_wrap(model, "", needle, lead))  # template + question + lead-in, in tokens
    budget = length - overhead - len(tok(" " + needle.needle, add_special_tokens=False).input_ids)
    if budget < 1:
        raise InputError(f"length {length} leaves no room for haystack around the needle {needle.name!r} "
                         f"(question, template and needle take {length - budget} tokens): use a larger length")
    paragraphs = paragraphs or load_haystack(name=needle.haystack or None)
    hay_ids = haystack_ids(tok, paragraphs, budget, repeat=repeat, seed=seed)
    context = _insert(tok, hay_ids, needle.needle, depth)
    ids = torch.tensor([_wrap(model, context, needle, lead)], dtype=torch.long, device=model.device)
    if ids.shape[1] + max_new_tokens > model.n_ctx:
        raise ContextLengthError(f"prompt of {ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds the "
                                 f"context of {model.model_id} ({model.n_ctx}): use a smaller length")
    start, stop = locate_span(tok, ids[0].tolist(), needle.answer)
    return Prompt(ids, start, stop, needle, length, float(depth))


def _check_cell(model, needle: Needle, length: int, depth: float, max_new_tokens: int) -> None:
    if not 0 <= depth <= 100:
        raise InputError(f"depth {depth} is outside [0, 100]: give depths as percentages of the context")
    if length + max_new_tokens > model.n_ctx:
        raise ContextLengthError(f"length {length} + {max_new_tokens} new tokens exceeds the context of "
                                 f"{model.model_id} ({model.n_ctx} tokens): use lengths <= {model.n_ctx - max_new_tokens}")
    n_needle = len(model.tokenizer(needle.needle, add_special_tokens=False).input_ids)
    if n_needle >= length:
        raise InputError(f"needle {needle.name!r} is {n_needle} tokens, not shorter than the length {length}: "
                         "use a larger length or a shorter needle")
    if needle.answer not in needle.needle:
        raise InputError(f"needle {needle.name!r}: its answer {needle.answer!r} is not part of the needle sentence")


def _insert(tok, hay_ids: list[int], needle: str, depth: float) -> str:
    """Insert the needle at ``depth`` % of the haystack tokens, snapped back to a sentence end."""
    point = int(len(hay_ids) * depth / 100)
    prefix = tok.decode(hay_ids[:point]) if depth < 100 else tok.decode(hay_ids)
    rest = tok.decode(hay_ids)[len(prefix):] if depth < 100 else ""
    if 0 < depth < 100:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", prefix)]
        cut = ends[-1] if ends else 0
        prefix, rest = prefix[:cut], prefix[cut:] + rest
    before = " " if prefix and not prefix[-1].isspace() else ""
    after = " " if rest and not rest[0].isspace() else ""   # depth 0: never glue the needle to the text
    return prefix + before + needle + after + rest


def _wrap(model, context: str, needle: Needle, lead: bool) -> list[int]:
    user = f"<book>{context}</book>" + QUESTION.format(q=needle.question)
    text = model.chat(user)
    if text == user:  # base model: the reference's plain form
        text = context + QUESTION.format(q=needle.question)
    if lead and needle.lead:
        text = text + needle.lead if text.endswith("\n") else text + " " + needle.lead
    return model.tokenizer(text, add_special_tokens=True).input_ids


def locate_span(tok, prompt_ids: list[int], answer: str) -> tuple[int, int]:
    """``[start, stop)`` of the answer's tokens in the prompt (first exact occurrence)."""
    for variant in (" " + answer, answer):
        sub = tok(variant, add_special_tokens=False).input_ids
        n = len(sub)
        for i in range(len(prompt_ids) - n + 1):
            if prompt_ids[i:i + n] == sub:
                return i, i + n
    raise InputError(f"cannot locate the answer {answer!r} in the tokenized prompt (its tokens merge with the "
                     "neighbouring text): end the answer at a word boundary, e.g. with a following '.'")


def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall of ``reference`` words found in ``response`` (lower-cased, no stemming)."""
    ref = re.findall(r"[a-z0-9]+", reference.lower())
    got = re.findall(r"[a-z0-9]+", response.lower())
    if not ref:
        return 0.0
    pool, hits = {}, 0
    for w in got:
        pool[w] = pool.get(w, 0) + 1
    for w in ref:
        if pool.get(w, 0) > 0:
            pool[w] -= 1
            hits += 1
    return hits / len(ref)
