"""Validation of the ACT head search on the embedded model (issue 5): every task, zero- and one-shot.

Writes one result per task and setting under results/sinks/ (a rerun skips finished ones and resumes
an interrupted search), then results/sinks/summary.json with the held-out figures.
Run: PYTHONPATH=$PWD python scripts/sinks_validation.py [--tasks sentiment,topic] [--shots 0,1]
"""
import argparse
import json
from pathlib import Path

from analyses.sinks.search import SearchConfig, search_act
from analyses.sinks.tasks import TASKS
from probe import load_model
from probe.atomic import write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--shots", default="0,1")
    ap.add_argument("--out", default="results/sinks")
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    m = load_model(a.model)
    out = Path(a.out)
    summary = []
    for shots in (int(s) for s in a.shots.split(",")):
        for task in a.tasks.split(","):
            res = search_act(m, task, SearchConfig(shots=shots, n_random=a.seeds), out=out / f"{task}-{shots}shot.json")
            summary.append(res.figures())
            print(json.dumps(res.figures()), flush=True)
    write_json(out / "summary.json", summary)


if __name__ == "__main__":
    main()
