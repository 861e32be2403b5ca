"""Task suite with counterfactual (corrupted) pairs, after Merullo et al. (ICLR 2024) §3.

Every task is a :class:`TaskBatch`: clean and corrupted token ids of the *same* length (so a head's
output can be patched position by position), and per prompt a set of "good" answer tokens and a
set of "bad" (counterfactual) tokens. The metric is the logit difference
``LD = logsumexp(logits[good]) - logsumexp(logits[bad])`` at the last position, which for
single-token sets is ``logit(answer) - logit(counterfactual)``.

Tasks (all words must be single tokens for the model; :func:`make_pair` raises otherwise):

- ``ioi`` (Wang et al. 2022): "When Mary and John went to the store, John gave a drink to" -> Mary,
  bad John; corruption "ABC": three fresh names.
- ``colored_objects`` (Merullo et al.): three coloured objects, "What color is the X?"; corruption asks
  about another object (minimal difference), bad = that object's colour.
- ``induction``: random tokens repeated; clean "..A B .. A" -> B, corruption "..A C .. A" -> C.
- ``greater_than`` (Hanna et al. 2023) on digit-level years: "from the year 17d5 to the year 17" -> the
  tens digit; good = digits > d, bad = digits < d; corruption starts at year 1701.

>>> from probe import load_model
>>> t = make_task(load_model("smollm2-135m"), "ioi", n=4, seed=0)   # doctest: +SKIP
>>> t.clean.shape == t.corrupt.shape                               # doctest: +SKIP
True
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from probe.errors import InputError

NAMES = ["Mary", "John", "Alice", "Bob", "James", "Sarah", "David", "Anna", "Michael", "Emma", "Tom", "Kate",
         "Paul", "Lisa", "Peter", "Laura", "Mark", "Julia", "George", "Helen", "Steve", "Rachel", "Frank", "Linda"]
PLACES = ["store", "park", "school", "office", "beach", "market", "library", "station", "garden", "hospital"]
OBJECTS_IOI = ["drink", "book", "ball", "gift", "letter", "ring", "bag", "key", "card", "cake"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "pink", "brown", "gray"]
THINGS = ["pencil", "notebook", "cup", "book", "ball", "hat", "shoe", "box", "key", "phone", "lamp", "plate",
          "bowl", "chair", "bag", "car"]

IOI_TEMPLATE = "When {A} and {B} went to the {P}, {C} gave a {O} to"
CO_TEMPLATE = ("On the table, I see a {c0} {o0}, a {c1} {o1}, and a {c2} {o2}. "
               "What color is the {q}? The {q} is")
GT_TEMPLATE = "The war lasted from the year 17{yy} to the year 17"


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """Clean/corrupted prompts of one task, all of one length ``T``.

    ``clean, corrupt``: ``[N, T]`` token ids; ``good, bad``: ``[N, G]`` token ids padded with -1;
    ``positions``: per prompt a dict of named key positions (e.g. ``"io"``, ``"s2"``, ``"answer"``)
    used by the head-role analysis and the intervention.
    """

    name: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    good: torch.Tensor
    bad: torch.Tensor
    positions: tuple[dict, ...] = field(default=())

    def __post_init__(self):
        if self.clean.shape != self.corrupt.shape or self.clean.dim() != 2:
            raise InputError(f"task {self.name!r}: clean {tuple(self.clean.shape)} and corrupted "
                             f"{tuple(self.corrupt.shape)} prompts must be [N, T] of equal shape for patching")
        n = self.clean.shape[0]
        if self.good.shape[0] != n or self.bad.shape[0] != n:
            raise InputError(f"task {self.name!r}: need one good/bad token set per prompt ({n})")
        if ((self.good >= 0).sum(1) == 0).any() or ((self.bad >= 0).sum(1) == 0).any():
            raise InputError(f"task {self.name!r}: every prompt needs at least one good and one bad token")

    @property
    def n(self) -> int:
        return int(self.clean.shape[0])

    def subset(self, idx) -> "TaskBatch":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.clean.device)
        return TaskBatch(self.name, self.clean[idx], self.corrupt[idx], self.good[idx], self.bad[idx],
                         tuple(self.positions[i] for i in idx.tolist()) if self.positions else ())


def single_token(tokenizer, word: str) -> int:
    """The one token id of ``word``; :class:`InputError` when it is not exactly one token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(f"answer {word!r} is {len(ids)} tokens {ids} for this tokenizer: answers and "
                         "counterfactuals must be single tokens (write them with their leading space, e.g. ' Mary')")
    return int(ids[0])


def make_pair(model, clean: str, corrupt: str, answer: str, counter: str) -> tuple[list[int], list[int], int, int]:
    """Tokenise one clean/corrupted pair and check its answer and counterfactual are single tokens."""
    tok = model.tokenizer
    a, b = single_token(tok, answer), single_token(tok, counter)
    c, d = (tok.encode(t, add_special_tokens=False) for t in (clean, corrupt))
    if len(c) != len(d):
        raise InputError(f"clean prompt is {len(c)} tokens but its corruption is {len(d)}: a pair must have the "
                         "same length so heads can be patched position by position (use single-token swaps)")
    return c, d, a, b


def _vocab(tok, words, need: int = 1, what: str = "words"):
    """Words (with a leading space) that are single tokens for this tokenizer; at least ``need`` of them."""
    found = [w for w in words if len(tok.encode(" " + w, add_special_tokens=False)) == 1]
    if len(found) < need:
        raise InputError(f"this tokenizer has {len(found)} single-token {what} (the task needs {need}): "
                         "choose a task without one-token words (induction, greater_than) or a model "
                         "with a word-level tokenizer")
    return found


def _pack(name, rows, device) -> TaskBatch:
    clean, corrupt, good, bad, pos = zip(*rows)
    lengths = {len(c) for c in clean}
    if len(lengths) != 1:
        raise InputError(f"task {name!r}: prompts have different lengths {sorted(lengths)}; "
                         "choose single-token words so every prompt has the template's length")
    width_g, width_b = max(map(len, good)), max(map(len, bad))
    pad = lambda xs, w: [list(x) + [-1] * (w - len(x)) for x in xs]  # noqa: E731
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731  on the model's device
    return TaskBatch(name, t(clean), t(corrupt), t(pad(good, width_g)), t(pad(bad, width_b)), tuple(pos))


def _index(tok_ids, token, start=0):
    return tok_ids.index(token, start)


def ioi(model, n: int, seed: int = 0) -> TaskBatch:
    rng, tok = random.Random(seed), model.tokenizer
    names = _vocab(tok, NAMES, 5, "names")
    rows = []
    while len(rows) < n:
        a, b, c, d, e = rng.sample(names, 5)
        p, o = rng.choice(_vocab(tok, PLACES, 1, "places")), rng.choice(_vocab(tok, OBJECTS_IOI, 1, "objects"))
        if rng.random() < 0.5:  # ABB and BAB orders
            clean_t = IOI_TEMPLATE.format(A=a, B=b, P=p, C=b, O=o)
        else:
            clean_t = IOI_TEMPLATE.format(A=b, B=a, P=p, C=b, O=o)
        corr_t = IOI_TEMPLATE.format(A=c, B=d, P=p, C=e, O=o)
        cl, co, ans, cf = make_pair(model, clean_t, corr_t, " " + a, " " + b)
        s1 = _index(cl, cf)
        rows.append((cl, co, [ans], [cf], {"io": _index(cl, ans), "s1": s1, "s2": _index(cl, cf, s1 + 1),
                                          "answer": _index(cl, ans)}))
    return _pack("ioi", rows, model.device)


def colored_objects(model, n: int, seed: int = 0) -> TaskBatch:
    rng, tok = random.Random(seed), model.tokenizer
    colors, things = _vocab(tok, COLORS, 3, "colours"), _vocab(tok, THINGS, 3, "objects")
    rows = []
    while len(rows) < n:
        cs, os_ = rng.sample(colors, 3), rng.sample(things, 3)
        qi, ri = rng.sample(range(3), 2)
        fill = {f"c{i}": cs[i] for i in range(3)} | {f"o{i}": os_[i] for i in range(3)}
        cl, co, ans, cf = make_pair(model, CO_TEMPLATE.format(q=os_[qi], **fill),
                                    CO_TEMPLATE.format(q=os_[ri], **fill), " " + cs[qi], " " + cs[ri])
        color_pos = [_index(cl, single_token(tok, " " + c)) for c in cs]
        rows.append((cl, co, [ans], [cf], {"answer": color_pos[qi], "colors": color_pos,
                                          "distractors": [p for i, p in enumerate(color_pos) if i != qi]}))
    return _pack("colored_objects", rows, model.device)


def induction(model, n: int, seed: int = 0, length: int = 12, k: int = 6, low: int = 1000,
              high: int = 20000) -> TaskBatch:
    """Random tokens ``r_1..r_L`` then ``r_1..r_k``: predict ``r_{k+1}``; corruption swaps ``r_{k+1}``."""
    g = torch.Generator().manual_seed(seed)
    low, high = token_range(model, low, high)
    rows = []
    for _ in range(n):
        toks = torch.randperm(high - low, generator=g, device="cpu")[:length + 1].add(low).tolist()
        seq, other = toks[:length], toks[length]
        clean = seq + seq[:k]
        corrupt = list(clean)
        corrupt[k] = other  # first occurrence of the answer replaced: induction now predicts `other`
        rows.append((clean, corrupt, [seq[k]], [other], {"answer": k, "prev": k - 1}))
    return _pack("induction", rows, model.device)


def token_range(model, low: int = 1000, high: int = 20000) -> tuple[int, int]:
    """Ids to draw random tokens from, clipped to the vocabulary (small test tokenizers included)."""
    high = min(high, len(model.tokenizer))
    return min(low, high // 4), high


def greater_than(model, n: int, seed: int = 0) -> TaskBatch:
    """Digit-level greater-than: good tens digits > d, bad < d (the equal digit is ambiguous, left out)."""
    rng, tok = random.Random(seed), model.tokenizer
    digits = [single_token(tok, str(i)) for i in range(10)]
    rows = []
    while len(rows) < n:
        d, u = rng.randint(2, 7), rng.randint(1, 9)
        cl, co = (tok.encode(GT_TEMPLATE.format(yy=yy), add_special_tokens=False) for yy in (f"{d}{u}", "01"))
        if len(cl) != len(co):
            raise InputError("greater_than: year prompts tokenise to different lengths; this tokenizer does not "
                             "split digits one by one, so the digit-level task does not apply")
        rows.append((cl, co, digits[d + 1:], digits[:d], {"answer": len(cl) - 8}))
    return _pack("greater_than", rows, model.device)


TASKS = {"ioi": ioi, "colored_objects": colored_objects, "induction": induction, "greater_than": greater_than}


def make_task(model, name: str, n: int = 32, seed: int = 0) -> TaskBatch:
    """Generate ``n`` clean/corrupted prompts of task ``name`` (see module docstring)."""
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    if n < 1:
        raise InputError(f"need at least one prompt, got n={n}")
    return TASKS[name](model, n, seed)
