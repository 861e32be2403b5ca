"""After scripts/sinks_validation.py: (1) re-select the heads of each finished search by the gold label's
log-probability (finer than accuracy on a ~30-item split), rerunning only the held-out evaluation and the
random-head control; (2) evaluate the zero-shot-selected heads in the one-shot setting (held-out, with the
random-head control), for tasks whose one-shot search was not run.
Run: PYTHONPATH=$PWD python scripts/sinks_reselect.py
"""
import json
from pathlib import Path

from analyses.sinks.search import SearchConfig, SearchResult, heldout_eval, reselect
from analyses.sinks.tasks import load_task
from probe import HeadId, load_model
from probe.atomic import read_json, write_figure, write_json

out = Path("results/sinks")
m = load_model("smollm2-135m")
summary = []
for path in sorted(out.glob("*shot.json")):
    base = SearchResult.load(path)
    variants = [base]
    target = path.with_name(path.stem + "-logprob.json")
    if not target.exists():
        reselect(m, base, "gold_logprob").save(target)
    variants.append(SearchResult.load(target))
    write_figure(base.plot(), path.with_suffix(".html"), include_plotlyjs=True)
    for res in variants:
        fig = {"metric": res.config["metric"], **res.figures()}
        if res.shots == 0:
            transfer = path.with_name(f"{path.stem}-{res.config['metric']}-to-1shot.json")
            if not transfer.exists():
                cfg = SearchConfig(**{**res.config, "shots": 1})
                write_json(transfer, heldout_eval(m, load_task(res.task), cfg, [HeadId.parse(h) for h in res.selected]))
            fig["heldout_1shot_same_heads"] = read_json(transfer)
        summary.append(fig)
        print(json.dumps(fig), flush=True)
write_json(out / "summary-all.json", summary)
