"""ACT with power (issue 18): generated >= 200-item splits, both rules, random heads outside the set."""
import dataclasses

import pytest

from analyses.sinks import items, load_task
from analyses.sinks.power import ActPower, act_power, heldout_power, random_outside
from analyses.sinks import SinksConfig
from probe.errors import InputError
from probe.heads import HeadId


@pytest.mark.parametrize("name", ["sentiment", "topic", "qtype"])
def test_generated_splits_ship_reproducibly_with_enough_distinct_items(name):
    assert items.read(name) == items.generate(name)                    # the shipped file is the generator's
    t = load_task(f"{name}@large")
    calib, held = ({i.text for i in t.split(s)} for s in ("calib", "heldout"))
    assert len(held) == len(t.split("heldout")) >= 200 and len(calib) >= 200
    assert not calib & held                                           # the search never sees a held-out item
    small = load_task(name)
    assert not held & {i.text for s in ("demo", "calib", "heldout") for i in small.split(s)}
    assert t.split("demo") == small.split("demo") and t.labels == small.labels
    per_label = [sum(i.label == k for i in t.split("heldout")) for k in range(len(t.labels))]
    assert len(set(per_label)) == 1                                   # balanced
    words = {w.lower().strip(".,?:;") for x in held for w in x.split()}
    assert len(words) >= 150                                          # lexical variety, not one frame


@pytest.mark.parametrize("name", ["sentiment", "topic"])
def test_a_limited_generated_task_keeps_every_label(name):
    # the file lists one label's items first: --limit N once gave a one-label search and held-out split
    t = load_task(f"{name}@large")
    n = 8 * len(t.labels)
    for s in ("calib", "heldout"):
        per_label = [sum(i.label == k for i in t.limited(n).split(s)) for k in range(len(t.labels))]
        assert per_label == [8] * len(t.labels)
        assert sorted(i.text for i in t.split(s)) == sorted(r[2].strip() for r in items.read(name) if r[1] == s)


def test_random_controls_never_draw_a_selected_head():
    cands = [HeadId(l, h) for l in range(2) for h in range(4)]
    sel = [HeadId(0, 1), HeadId(1, 2)]
    for seed in range(20):
        drawn = random_outside(cands, sel, 2, seed)
        assert len(drawn) == 2 and not set(drawn) & set(sel)
    with pytest.raises(InputError, match="outside"):
        random_outside(cands, cands[:6], 3, 0)
    from analyses.sinks.search import control_pool       # the held-out stage's control: flagged fallback

    assert control_pool(cands, sel) == ([h for h in cands if h not in sel], True)
    assert control_pool(cands, cands[:6]) == (cands, False)
    # 4 of 8 kept: the 4 outside are one set, whatever the seed (an old run's 10 "random" controls were
    # all that complement, hence one accuracy for every seed)
    assert control_pool(cands, cands[:4]) == (cands, False)
    with pytest.raises(InputError, match="same set"):
        random_outside(cands, cands[:4], 4, 0)
    assert len({tuple(random_outside(cands, cands[:3], 3, s)) for s in range(10)}) > 1


def _trimmed(name, n):
    """The generated task with only ``n`` items per split (the tests' CPU budget)."""
    t = load_task(name)
    return dataclasses.replace(t, items={k: tuple(v)[:n] for k, v in t.items.items()})


def test_heldout_power_reports_both_metrics_with_intervals(tiny_llama, tmp_path):
    task = _trimmed("sentiment@large", 48)
    cfg = SinksConfig(first_layer=0, last_layer=1)
    sel = {"accuracy": [HeadId(0, 1)], "gold_logprob": []}
    p = heldout_power(tiny_llama, task, cfg, sel, n_random=10, progress=False)
    acc = p.rules["accuracy"]
    assert p.n_heldout == 48 and len(acc["random_heads"]) == 10
    assert all("L0H1" not in hs for hs in acc["random_heads"])
    for m in ("accuracy", "gold_logprob"):
        v = acc["verdicts"][m]
        assert v["n_draws"] == 10 and v["gain"]["n"] == 48 and v["gain"]["lo"] <= v["gain"]["estimate"] <= v["gain"]["hi"]
        assert v["test"] == ("mcnemar_exact" if m == "accuracy" else "sign_flip") and 0 <= v["p_value"] <= 1
    assert p.rules["gold_logprob"]["verdicts"] == {}                  # no head kept: nothing to judge
    lo, hi = p.plain["accuracy"]["lo"], p.plain["accuracy"]["hi"]
    assert 0 <= lo <= p.plain["accuracy"]["estimate"] <= hi <= 1
    df = p.to_frame()
    assert {"plain", "calibrated", "gain", "random_gain"} <= set(df.quantity) and p.plot().data
    back = ActPower.load(p.save(tmp_path / "p.json"))
    assert back.rules == p.rules and back.n_heldout == 48


def test_act_power_runs_search_then_judges(tiny_llama, tmp_path):
    cfg = SinksConfig(first_layer=0, last_layer=1)
    p = act_power(tiny_llama, _trimmed("qtype@large", 24), cfg, n_random=3, min_draws=3, out=tmp_path,
                  progress=False)
    assert set(p.rules) == {"accuracy", "gold_logprob"} and p.task == "qtype@large"
    assert (tmp_path / "search_qtype@large.json").exists() and (tmp_path / "power_qtype@large.json").exists()
    for r in p.rules.values():
        for v in r["verdicts"].values():
            assert v["is_gain"] == (v["gain"]["lo"] > 0 and v["gain"]["estimate"] > v["control"]["hi"]
                                    and v["n_draws"] >= 3)


@pytest.mark.parametrize(("folder", "task", "layers", "accuracy_rule", "logprob_rule"), [
    ("smollm2-135m", "sentiment@large", (2, 28), "no gain", "gain"),
    ("smollm2-135m-qtype", "qtype@large", (2, 28), "gain", "no gain"),
    ("smollm2-135m-topic", "topic@large", (2, 28), None, "gain")])
def test_the_shipped_act_runs_say_what_the_readme_says(folder, task, layers, accuracy_rule, logprob_rule):
    """data/sinks' validation runs (README, data/sinks/README.md): 240 held-out items each, searched over the
    stated candidate layers; the held-out accuracy verdict of each selection rule (None: the rule kept no head),
    and a gold log-probability gain beyond random for the log-probability rule on every task."""
    from analyses import registry
    from analyses.data import data_dir

    r = registry.load_result(data_dir() / "sinks" / folder)
    s = r.summary()
    assert r.n_samples() == 240 and task in str(r.power.task) and s["plain"].ci is not None
    cand = [c["layer"] for c in r.search.candidates]
    assert (min(cand), max(cand)) == layers and len(cand) == 9 * (layers[1] - layers[0] + 1)
    if accuracy_rule is None:
        assert s["accuracy_kept"].value == 0 and "accuracy_accuracy_verdict" not in s
    else:
        assert s["accuracy_accuracy_verdict"].value.split(":")[0] == accuracy_rule
    assert s["gold_logprob_accuracy_verdict"].value.split(":")[0] == logprob_rule
    assert s["gold_logprob_gold_logprob_verdict"].value == "gain"          # every task: log-prob beyond random
