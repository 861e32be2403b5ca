"""Sink profile of the embedded model over the task prompts (issue 5): which tokens act as sinks.

Writes results/sinks/profile-<rule>.json (+ parquet tables, HTML figures) for the reference rule
(tau=0.1), the same with a minimum of 4 queries per key, and the paper's alpha/N form (alpha=5).
Run: PYTHONPATH=$PWD python scripts/sinks_profile.py [--per-task 8]
"""
import argparse
import json
from pathlib import Path

from analyses.sinks import load_task, profile_sinks
from analyses.sinks.tasks import TASKS
from probe import load_model
from probe.atomic import write_figure

RULES = {"tau0.1": {"tau": 0.1}, "tau0.1-minq4": {"tau": 0.1, "min_queries": 4},
         "alpha5": {"rule": "alpha", "alpha": 5.0}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--out", default="results/sinks")
    a = ap.parse_args()
    m = load_model(a.model)
    texts = []
    for name in TASKS:
        t = load_task(name)
        items = t.split("heldout")[:a.per_task]
        texts += [t.prompt(it, 0) for it in items] + [t.prompt(it, 1) for it in items[: a.per_task // 2]]
    out = Path(a.out)
    for tag, rule in RULES.items():
        prof = profile_sinks(m, texts, progress=True, **rule)
        prof.save(out / f"profile-{tag}.json")
        write_figure(prof.plot("mass"), out / f"profile-{tag}-mass.html", include_plotlyjs=True)
        write_figure(prof.plot("sinks"), out / f"profile-{tag}-sinks.html", include_plotlyjs=True)
        print(json.dumps({"rule": tag, **prof.summary()}), flush=True)


if __name__ == "__main__":
    main()
