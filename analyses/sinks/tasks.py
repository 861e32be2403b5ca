"""Classification tasks scored by the label tokens' log-probabilities (as the ACT paper scores them).

A :class:`Task` is a prompt template plus labelled items from ``data/sinks/`` (or a task file of
your own: :meth:`Task.save`, ``headwise scan sinks --task my_task.json``). The prediction for
an item is the label whose first token gets the highest log-probability after the prompt.
Prompts are batched with left padding (explicit position ids), which gives the same last-row
logits as running each prompt alone, edits included (the engine detects sinks per sequence).

>>> t = load_task("sentiment")
>>> t.labels, len(t.split("calib")) > 0
(('positive', 'negative'), True)
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from probe.atomic import read_json, write_json
from probe.errors import CorruptFileError, InputError

from ..data import data_path


TEMPLATES = {
    "sentiment": ("Classify the sentiment of each review as positive or negative.\n\n", "Review: {x}\nSentiment:"),
    "topic": ("Classify each news sentence by topic: sports, business, science or world.\n\n", "Sentence: {x}\nTopic:"),
    "qtype": ("Classify each question by the type of its answer: person, location, number or description.\n\n",
              "Question: {x}\nAnswer type:"),
}
TASKS = tuple(TEMPLATES)
SPLITS = ("demo", "calib", "heldout")
TASK_FORMAT = "headwise.sinks_task"


@dataclass(frozen=True)
class Item:
    text: str
    label: int


@dataclass(frozen=True)
class Task:
    """A labelled task: ``items`` by split, the label words and the prompt template."""

    name: str
    labels: tuple[str, ...]
    items: dict
    header: str
    template: str

    def split(self, name: str) -> list[Item]:
        if name not in SPLITS:
            raise InputError(f"unknown split {name!r}: use one of {SPLITS}")
        return list(self.items[name])

    def prompt(self, item: Item, shots: int = 0) -> str:
        """The prompt for ``item``: header, ``shots`` demonstrations per label, then the query."""
        demos = self.demos(shots)
        body = "".join(self.template.format(x=d.text) + f" {self.labels[d.label]}\n\n" for d in demos)
        return self.header + body + self.template.format(x=item.text)

    def limited(self, n: int | None) -> "Task":
        """The task with at most ``n`` calibration and held-out items (demonstrations kept)."""
        if n is None:
            return self
        return replace(self, items={s: tuple(v) if s == "demo" else tuple(v)[:n] for s, v in self.items.items()})

    def to_dict(self) -> dict:
        return {"format": TASK_FORMAT, "version": 1, "name": self.name, "labels": list(self.labels),
                "header": self.header, "template": self.template,
                "items": {s: [[it.text, it.label] for it in self.items[s]] for s in SPLITS}}

    def fingerprint(self) -> str:
        """A hash of everything the task holds (stamps units that depend on it)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path) -> Path:
        """A task file ``headwise scan sinks --task PATH`` reads."""
        return write_json(path, self.to_dict())

    def demos(self, shots: int) -> list[Item]:
        if shots < 0:
            raise InputError(f"shots must be >= 0, not {shots}")
        pool = self.items["demo"]
        by_label = [[d for d in pool if d.label == k] for k in range(len(self.labels))]
        if shots > min(len(b) for b in by_label):
            raise InputError(f"task {self.name!r} has {min(len(b) for b in by_label)} demonstrations per label; "
                             f"ask for at most that many shots")
        out = [b[i] for i in range(shots) for b in by_label]
        random.Random(0).shuffle(out)
        return out


def load_task(name: str, *, demo_per_label: int = 2, calib_frac: float = 0.5, seed: int = 0) -> Task:
    """A shipped task (``data/sinks/<name>.txt``, split seeded into demonstrations, calibration and
    held-out items) or a task file written by :meth:`Task.save`.

    ``"<name>@large"``: the same demonstrations with the generated calibration and held-out splits
    (>= 200 items each, :mod:`analyses.sinks.items`)."""
    if name.endswith(".json"):
        return _task_file(Path(name))
    if name.endswith("@large") and name[:-len("@large")] in TEMPLATES:
        from .items import large_task

        return large_task(name[:-len("@large")], demo_per_label=demo_per_label, seed=seed)
    if name not in TEMPLATES:
        raise InputError(f"unknown task {name!r}: choose one of {', '.join(TASKS)} (each also as "
                         "<task>@large) or give a task file (.json)")
    lines = [ln.split("\t", 1) for ln in (data_path("sinks", f"{name}.txt")).read_text(encoding="utf-8").splitlines() if ln.strip()]
    labels = tuple(dict.fromkeys(lab for lab, _ in lines))
    rng = random.Random(seed)
    splits = {s: [] for s in SPLITS}
    for k, lab in enumerate(labels):
        group = [Item(text.strip(), k) for la, text in lines if la == lab]
        rng.shuffle(group)
        rest = group[demo_per_label:]
        n_cal = round(len(rest) * calib_frac)
        splits["demo"] += group[:demo_per_label]
        splits["calib"] += rest[:n_cal]
        splits["heldout"] += rest[n_cal:]
    for s in ("calib", "heldout"):
        rng.shuffle(splits[s])
    header, template = TEMPLATES[name]
    return Task(name, labels, {s: tuple(v) for s, v in splits.items()}, header, template)


def _task_file(path: Path) -> Task:
    d = read_json(path, "task file")
    if not isinstance(d, dict) or d.get("format") != TASK_FORMAT:
        raise CorruptFileError(f"{path} is not a headwise task file (format {TASK_FORMAT!r}): write one with Task.save")
    try:
        items = {s: tuple(Item(str(t), int(k)) for t, k in d["items"][s]) for s in SPLITS}
        task = Task(d["name"], tuple(d["labels"]), items, d["header"], d["template"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{path}: task file is missing or has a bad field ({exc})") from exc
    if not task.items["calib"] or not task.items["heldout"]:
        raise InputError(f"{path}: the task needs calibration and held-out items")
    return task


def label_tokens(tokenizer, labels) -> tuple[str, list[int]]:
    """``(suffix, ids)``: the prompt ends with ``suffix`` and label k is scored by token ``ids[k]``.

    Normally the first token of `` label`` (suffix ""); for a tokenizer that splits off the space
    (byte-level), the space goes into the prompt and the label's own first token is scored.
    """
    first = lambda t: tokenizer(t, add_special_tokens=False).input_ids[0]  # noqa: E731
    for suffix, fmt in (("", " {}"), (" ", "{}")):
        ids = [first(fmt.format(lab)) for lab in labels]
        if len(set(ids)) == len(ids):
            return suffix, ids
    raise InputError(f"labels {labels} share a first token under this tokenizer: rename them")


def label_token_ids(tokenizer, labels) -> list[int]:
    return label_tokens(tokenizer, labels)[1]


@dataclass(frozen=True)
class Batch:
    """Left-padded prompts: ``ids``/``mask``/``pos`` ``[B, T]`` and gold labels ``[B]``."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    gold: torch.Tensor


def make_batches(model, prompts: list[str], gold: list[int], batch_size: int = 16) -> list[Batch]:
    """Tokenise and left-pad prompts, grouping similar lengths together to waste little padding."""
    tok = model.tokenizer
    encoded = [tok(p, add_special_tokens=True).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = []
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        T = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long, device=model.device)
        mask = torch.zeros(len(idx), T, dtype=torch.long, device=model.device)
        for r, i in enumerate(idx):
            ids[r, T - len(encoded[i]):] = torch.tensor(encoded[i], device=model.device)
            mask[r, T - len(encoded[i]):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        labels = torch.tensor([gold[i] for i in idx], device="cpu")  # compared with host log-probabilities
        batches.append(Batch(ids, mask, pos, labels))
    return batches


def task_batches(model, task: Task, split: str, shots: int = 0, batch_size: int = 16) -> list[Batch]:
    items = task.split(split)
    suffix = label_tokens(model.tokenizer, task.labels)[0]
    return make_batches(model, [task.prompt(it, shots) + suffix for it in items], [it.label for it in items],
                        batch_size)


@torch.no_grad()
def label_logprobs(model, batch: Batch, label_ids: list[int]) -> torch.Tensor:
    """``[B, n_labels]`` log-probabilities of the label tokens after each prompt (full-vocabulary softmax)."""
    out = model.hf(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.pos, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].float(), -1)[:, label_ids].cpu()


def score(logprobs: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean log-probability of the gold label."""
    return {"accuracy": float((logprobs.argmax(-1) == gold).float().mean()),
            "gold_logprob": float(logprobs.gather(1, gold[:, None]).mean())}
