"""Which Colored Objects phrasing does a model solve? Prints one JSON line per format and shot count.

Scenes: three coloured objects (the circuits task's single-token colours and objects), one asked
about. Accuracy is top-1 (the full-vocabulary argmax is the right colour) and 3-way (the right
colour beats the other two scene colours), each with a Wilson interval, plus the 3-way hits by the
asked object's position and which position's colour the model picks (a positional bias shows here).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/colored_objects_formats.py --n 150 --shots 0,1
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from analyses.circuits.tasks import COLORS, THINGS, _vocab, single_token
from analyses.inference import wilson
from probe import load_model

FORMATS = {
    "base": "On the table, I see a {c0} {o0}, a {c1} {o1}, and a {c2} {o2}. What color is the {q}? The {q} is",
    "qa": "Q: On the table, I see a {c0} {o0}, a {c1} {o1}, and a {c2} {o2}. What color is the {q}?\nA: The {q} is",
    "list": "Objects on the table:\n- {o0}: {c0}\n- {o1}: {c1}\n- {o2}: {c2}\nThe color of the {q} is",
    "the_is": "The {o0} is {c0}. The {o1} is {c1}. The {o2} is {c2}. What color is the {q}? The {q} is",
    "noq": "The {o0} is {c0}. The {o1} is {c1}. The {o2} is {c2}. So the {q} is",
    "colon": "{o0}: {c0}\n{o1}: {c1}\n{o2}: {c2}\nWhat color is the {q}?\n{q}:",
    "qfirst": "Question: what color is the {q}? On the table, I see a {c0} {o0}, a {c1} {o1}, and a {c2} {o2}. "
              "Answer: the {q} is",
}


def scene(rng, colors, things):
    cs, os_ = rng.sample(colors, 3), rng.sample(things, 3)
    return cs, os_, rng.randrange(3)


def prompt(fmt: str, rng, colors, things, shots: int):
    parts = []
    for _ in range(shots + 1):
        cs, os_, q = scene(rng, colors, things)
        fill = {f"c{i}": cs[i] for i in range(3)} | {f"o{i}": os_[i] for i in range(3)} | {"q": os_[q]}
        parts.append(FORMATS[fmt].format(**fill))
        if len(parts) <= shots:
            parts[-1] += f" {cs[q]}."
    return "\n\n".join(parts), cs, q


@torch.no_grad()
def measure(model, fmt: str, shots: int, n: int, seed: int) -> dict:
    tok = model.tokenizer
    colors, things = _vocab(tok, COLORS, 3, "colours"), _vocab(tok, THINGS, 3, "objects")
    rng, top, three = random.Random(seed), 0, 0
    by_pos, picked = {0: [0, 0], 1: [0, 0], 2: [0, 0]}, [0, 0, 0]
    for _ in range(n):
        text, cs, q = prompt(fmt, rng, colors, things, shots)
        logits = model.hf(model.encode(text), logits_to_keep=1).logits[0, -1]
        cid = [single_token(tok, " " + c) for c in cs]
        choice = int(logits[cid].argmax())
        top += int(logits.argmax()) == cid[q]
        three += choice == q
        by_pos[q][0] += choice == q
        by_pos[q][1] += 1
        picked[choice] += 1
    return {"format": fmt, "shots": shots, "n": n, "seed": seed, "top1": wilson(top, n).to_dict(),
            "three_way": wilson(three, n).to_dict(), "three_way_by_position": {k: f"{a}/{b}" for k, (a, b) in by_pos.items()},
            "picked_position": picked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shots", default="0")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = load_model(a.model, device="cpu")
    for fmt in a.formats.split(","):
        for shots in (int(s) for s in a.shots.split(",")):
            print(json.dumps(measure(model, fmt, shots, a.n, a.seed)), flush=True)


if __name__ == "__main__":
    main()
