"""The README's headline figures are the shipped runs' own numbers (every analysis and the study).

Each claim is a README (or data/<x>/README.md) phrase with ``{name}`` where a number stands; the
phrase is found in the text and every number is compared with the run's value at the precision it
is printed with. A rerun that changes a figure fails here until the text says the new one.
No model is loaded: the runs are read from data/.
"""
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses import registry
from analyses.inference import mean_ci

ROOT = Path(__file__).resolve().parent.parent
NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e-?\d+)?"      # 0.72, +0.077, 1,296, 3e-5


def text(path: str, heading: str | None = None, collapse: bool = True) -> str:
    """A file (or its section under ``heading``, to the next heading), minus signs as '-', spaces collapsed."""
    s = (ROOT / path).read_text().replace("\u2212", "-")
    if heading:
        start = s.index(heading)
        level = heading.split(" ")[0]
        end = re.search(rf"^#{{1,{len(level)}}} ", s[start + len(heading):], re.M)
        s = s[start:start + len(heading) + end.start()] if end else s[start:]
    return re.sub(r"\s+", " ", s) if collapse else s


def printed_as(printed: str, value: float) -> bool:
    """``value`` rounds to ``printed`` at the precision it is printed with ('0.72', '93', '1,296', '3e-5')."""
    printed = printed.replace(",", "")
    if "e" in printed:
        mantissa = printed.split("e")[0]
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return float(printed) == float(f"{value:.{digits}e}")
    digits = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value) <= 0.5 * 10 ** -digits + 1e-9


def claim(where: str, phrase: str, **values) -> None:
    """``phrase`` occurs in ``where`` and each ``{name}`` in it prints ``values[name]`` (other values unused)."""
    parts = re.split(r"\{(\w+)\}", phrase)
    regex = "".join(r"\s+".join(map(re.escape, p.split(" "))) if i % 2 == 0 else f"(?P<{p}>{NUM})"
                    for i, p in enumerate(parts))
    m = re.search(regex, where)
    assert m, f"the text no longer says: {phrase!r}"
    wrong = {k: (got, values[k]) for k, got in m.groupdict().items() if not printed_as(got, float(values[k]))}
    assert not wrong, f"{phrase!r}: printed vs run {wrong}"


def interval(name: str, estimate, lo, hi, scale: float = 1.0) -> dict:
    """``{name}``, ``{name}lo``, ``{name}hi`` for a claim's placeholders."""
    return {name: scale * estimate, f"{name}lo": scale * lo, f"{name}hi": scale * hi}


def flags(where: str, command: str) -> dict[str, str]:
    """``--flag value`` pairs of the first ``command`` (e.g. 'headwise scan atlas') in ``where``, to its ``--out``."""
    line = where[where.index(command):]
    line = line[:line.index("--out ")]
    return dict(re.findall(r"--([\w-]+) (\S+)", line.replace("\\ ", "")))


def ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",")]


# ------------------------------------------------------------------------------------------ retrieval
RETRIEVAL = ("README.md", "### Retrieval heads")


@pytest.fixture(scope="module")
def retrieval():
    return registry.load_result(ROOT / "data" / "retrieval" / "smollm2-135m")


def test_retrieval_sparsity_and_top_heads_are_the_shipped_run(retrieval):
    r, above = retrieval, retrieval.summary()["above"]
    readme, data = text(*RETRIEVAL), text("data/retrieval/README.md")
    spars = interval("v", above.value, *above.ci, scale=100)
    events = r.item_scores()["retrieval_score"]                      # [answered samples, layer, head]
    top = [lh for lh, _ in sorted(np.ndenumerate(r.scores), key=lambda x: -x[1])[:5]]
    heads = {}
    for i, (layer, head) in enumerate(top):
        c = mean_ci(events[:, layer, head])
        heads |= interval(f"h{i}", c.estimate, c.lo, c.hi)
    listed = [f"L{layer}H{head} {{h{i}}} [{{h{i}lo}}, {{h{i}hi}}]" for i, (layer, head) in enumerate(top)]
    claim(readme, "the full issue-18 grid, {n} samples", n=r.n_samples())
    claim(readme, f"{{v}}% [{{vlo}}%, {{vhi}}%] of heads score > 0.1 (n = {{n}} answered samples; top "
                  f"{', '.join(listed[:3])}, each a mean over the {{n2}} with its bootstrap interval)",
          **spars, **heads, n=above.n, n2=events.shape[0])
    claim(data, "| {n} answered of {m} samples | {v}% [{vlo}%, {vhi}%] |", n=above.n, m=r.n_samples(), **spars)
    claim(data, f"Top heads (mean over the {{n}} answered samples, bootstrap interval): {', '.join(listed)}",
          n=above.n, **heads)


def test_retrieval_success_by_length_is_the_shipped_run(retrieval):
    by = retrieval.success_by("length")
    assert (by.n == by.n.iloc[0]).all() and by.length.iloc[-1] == 8000
    cells = {}
    for i, row in by.iterrows():
        cells |= interval(f"s{i}", row.success, row.lo, row.hi, scale=100)
    runs = [f"{{s{i}}}% [{{s{i}lo}}%, {{s{i}hi}}%]" for i in range(len(by))]
    claim(text(*RETRIEVAL), f"by length (n = {{n}} each): {', '.join(runs[:-1])} and {runs[-1]} at 8,000 tokens",
          n=by.n.iloc[0], **cells)
    data = text("data/retrieval/README.md")
    claim(data, "| success [95%] |" + "".join(f" {{s{i}}}% [{{s{i}lo}}, {{s{i}hi}}] |" for i in range(len(by))),
          **cells)
    claim(data, "| answered / samples |" + "".join(f" {k}/{n} |" for k, n in zip(by.k, by.n)))


def test_retrieval_success_by_depth_and_needle_is_the_shipped_run(retrieval):
    data, s = text("data/retrieval/README.md"), retrieval.samples
    depth, needle = retrieval.success_by("depth"), retrieval.success_by("needle").set_index("needle")
    claim(data, "Per depth (0/25/50/75/100 %, n = {n} each): " + ", ".join(f"{{d{i}}}" for i in range(5)) + " answered",
          n=depth.n.iloc[0], **{f"d{i}": k for i, k in enumerate(depth.k)})
    claim(data, "per needle (n = {n} each): `code` {code}, `cat` {cat}, `lisbon` {lisbon}", n=needle.n.iloc[0],
          **needle.k.to_dict())
    late = s[(s.length == 8000) & (s.depth >= 75)]
    claim(data, "at 8,000 the 135M model answers {k} of {n}, mostly with the needle late in the context (depths "
                "75-100: {k2} of {n2})", k=s[s.length == 8000].success.sum(), n=(s.length == 8000).sum(),
          k2=late.success.sum(), n2=len(late))


def test_retrieval_masking_per_length_is_the_shipped_run(retrieval):
    m, s = retrieval.masking, retrieval.samples
    keys = ["needle", "length", "depth"]
    cells = s.merge(m[keys].drop_duplicates(), on=keys).assign(condition="none")
    both = pd.concat([cells[keys + ["condition", "success"]], m[keys + ["condition", "success"]]])
    per = both.pivot_table(index="length", columns="condition", values="success", aggfunc="sum")
    said = "; ".join(f"{L}{' tokens' if i == 0 else ''} {r.none}/{r.top}/{r.random0},{r.random1},{r.random2}"
                     for i, (L, r) in enumerate(per.astype(int).iterrows()))
    assert said in text("data/retrieval/README.md")


def test_retrieval_masking_is_the_shipped_run(retrieval):
    t = retrieval.masking_table().set_index("condition")
    v = {"n": int(t.loc["none", "n_cells"])}
    for c in ("none", "top", "random0", "random1", "random2"):
        v |= interval(c, t.loc[c, "success"], t.loc[c, "lo"], t.loc[c, "hi"], scale=100)
    for i in range(3):
        row = t.loc[f"random{i}"]
        v |= interval(f"d{i}", row.d_vs_top, row.d_lo, row.d_hi) | {f"p{i}": row.p_vs_top}
    readme, data = text(*RETRIEVAL), text("data/retrieval/README.md")
    claim(readme, "success {none}% [{nonelo}%, {nonehi}%] unmasked -> {top}% [{toplo}%, {tophi}%]; 10 random heads "
                  "{random0}% [{random0lo}%, {random0hi}%], {random1}% [{random1lo}%, {random1hi}%], {random2}% "
                  "[{random2lo}%, {random2hi}%] (seeds 0-2, n = {n} cells each), i.e. random minus top +{d0} [{d0lo}, "
                  "{d0hi}], +{d1} [{d1lo}, {d1hi}], +{d2} [{d2lo}, {d2hi}] paired over the {n2} cells (McNemar p = "
                  "{p0}, {p1}, {p2})", **v, n2=v["n"])
    claim(data, "| {n} cells | {none}% [{nonelo}%, {nonehi}%] / {top}% [{toplo}%, {tophi}%] (Wilson) |", **v)
    pooled = t.loc["random (pooled)"]
    claim(data, "pooled +{v} [{vlo}, {vhi}] |", **interval("v", pooled.d_vs_top, pooled.d_lo, pooled.d_hi))
    s = retrieval.samples
    at50 = s[s.depth == 50].groupby("length").success.agg(["sum", "count"])
    assert at50.loc[6000].tolist() == at50.loc[8000].tolist()
    claim(readme, "At 6,000 and 8,000 tokens only {k} of the {n} masking cells is answered unmasked",
          k=at50.loc[8000, "sum"], n=at50.loc[8000, "count"])


def test_retrieval_command_is_the_one_that_made_the_run(retrieval):
    data, meta = text("data/retrieval/README.md"), retrieval.meta
    f = flags(data, "headwise scan retrieval --model smollm2-135m --cells")
    assert ints(f["lengths"]) == meta["lengths"] and [float(d) for d in f["depths"].split(",")] == meta["depths"]
    assert int(f["k"]) == meta["k"] and ints(f["seeds"]) == meta["seeds"]
    needles = re.search(r"for n in ([\w ]+); do for L in ([\d ]+); do for d in ([\d ]+); do", data).groups()
    assert sorted(needles[0].split()) == meta["needles"] and [int(x) for x in needles[1].split()] == meta["lengths"]
    masks = re.search(r"M=\$\(for L in ([\d ]+); do", data).group(1)
    assert [int(x) for x in masks.split()] == meta["mask_lengths"]
    assert retrieval.samples.new_ids.map(len).max() <= int(f["max-new-tokens"])


# ------------------------------------------------------------------------------------------ similarity
@pytest.fixture(scope="module")
def similarity():
    """The shipped run and the values its README phrases print (placeholder names as in the phrases)."""
    r = registry.load_result(ROOT / "data" / "similarity" / "smollm2-135m")
    s = r.summary()
    v = {}
    for key, name in (("first_pair_cos", "f"), ("inner_pairs_mean_cos", "i"), ("last_pair_cos", "l"),
                      ("echo_matched", "m"), ("echo_same", "s"), ("echo_random", "r"),
                      ("echo_matched_minus_random", "d"), ("echo_same_minus_random", "e"),
                      ("spearman matched~layer", "x"), ("spearman random~layer", "y"), ("plan_cost", "c")):
        v |= interval(name, s[key].value, *s[key].ci)
    adj = np.asarray(r.prompt_adjacent)                                # [prompts, adjacent pairs]
    least, most = int(adj.mean(0).argmin()), int(adj.mean(0).argmax())
    for name, pair in (("a", least), ("b", most)):
        c = mean_ci(adj[:, pair])
        v |= interval(name, c.estimate, c.lo, c.hi) | {f"{name}0": pair, f"{name}1": pair + 1}
    shared = [b for b in r.plan_blocks if len(b) > 1]
    v |= {"p0": shared[0][0], "p1": shared[0][-1], "q0": shared[1][0], "q1": shared[1][-1]}
    v |= {"prompts": r.n_prompts, "rows": r.n_rows, "texts": s["echo_matched"].n, "tok": r.n_heldout_tokens,
          "pairs": len(r.echo["matched"]), "npairs": s["spearman matched~layer"].n, "budget": r.plan_budget,
          "trials": len(r.plan_log), "run_lo": adj.mean(0)[3:8].min(), "run_hi": adj.mean(0)[3:8].max()}
    return r, v


def test_similarity_readme_is_the_shipped_run(similarity):
    _, v = similarity
    readme = text("README.md", "### Attention similarity across layers")
    for phrase in (
            "{prompts} prompts of up to 128 tokens ({rows} in all), echo and plan losses on {texts} held-out texts, "
            "{tok} predicted tokens",
            "adjacent-layer cosine {f} [{flo}, {fhi}] for the first pair, {i} [{ilo}, {ihi}] on average over the "
            "inner pairs and {l} [{llo}, {lhi}] for the last (n = {prompts} prompts)",
            "pair {a0}→{a1} is the least alike ({a} [{alo}, {ahi}]) and {b0}→{b1} the most ({b} [{blo}, {bhi}]; "
            "n = {prompts} prompts each)",
            "the five pairs 3→4 to 7→8 all reach {run_lo}–{run_hi}",
            "costs {m} [{mlo}, {mhi}] nats/token with heads matched across the two layers, {s} [{slo}, {shi}] with "
            "same-index heads and {r} [{rlo}, {rhi}] with a random head permutation (the control; mean over the "
            "{pairs} pairs, n = {texts} texts): matching beats the control by {d} [{dlo}, {dhi}] and same-index "
            "heads do not ({e} [{elo}, {ehi}])",
            "Spearman {x} [{xlo}, {xhi}] (matched heads' cost against the layer cosine, n = {npairs} pairs), though "
            "the random permutation's cost tracks layer similarity as much ({y} [{ylo}, {yhi}])",
            "The greedy plan (budget {budget} nats, {trials} measured trials) shares layers {p0}→{p1} and {q0}→{q1} "
            "for {c} [{clo}, {chi}] nats/token"):
        claim(readme, phrase, **v)
    # the words around the numbers: matching beats the control, same-index heads do not, cost falls
    assert v["dhi"] < 0 and v["elo"] < 0 < v["ehi"] and v["xhi"] < 0


def test_similarity_data_readme_is_the_shipped_run(similarity):
    _, v = similarity
    data = text("data/similarity/README.md")
    for phrase in ("the {prompts} prompts have {rows} tokens in all, the {texts} held-out texts {tok} predicted tokens",
                   "| {prompts} prompts | {f} [{flo}, {fhi}] / {i} [{ilo}, {ihi}] / {l} [{llo}, {lhi}] |",
                   "({a0}→{a1} / {b0}→{b1}) | {prompts} prompts | {a} [{alo}, {ahi}] / {b} [{blo}, {bhi}] |",
                   "| {texts} texts | {m} [{mlo}, {mhi}] |",
                   "| {texts} texts | {s} [{slo}, {shi}] / {r} [{rlo}, {rhi}] |",
                   "| {texts} texts | {d} [{dlo}, {dhi}]; {e} [{elo}, {ehi}] |",
                   "| {npairs} pairs | {x} [{xlo}, {xhi}]; {y} [{ylo}, {yhi}] |",
                   "greedy plan (budget {budget}): layers {p0}→{p1} and {q0}→{q1} shared | {texts} texts | {c} [{clo}, "
                   "{chi}] nats/token |"):
        claim(data, phrase, **v)


# ------------------------------------------------------------------------------------------ the study
@pytest.fixture(scope="module")
def atlas():
    return registry.load_result(ROOT / "data" / "atlas" / "smollm2-135m")


# (score a, score b, the README phrase; {column} is the agreement row's value, {n_shared} its shared heads)
AGREEMENT = [
    ("retrieval: retrieval score", "atlas: induction",
     "score ρ = {value} [{lo}, {hi}] ({n_items_a} NIAH samples × {n_items_b} sequences resampled), `p_layer = "
     "{p_layer}`; {n_shared} of the top 10 are shared (Jaccard {jaccard} [{jaccard_lo}, {jaccard_hi}] against "
     "{null_jaccard} for the within-layer null, p = {p_overlap}"),
    ("circuits: induction |effect|", "atlas: induction",
     "~ streaming induction ρ = {value} [{lo}, {hi}], Jaccard {jaccard} [{jaccard_lo}, {jaccard_hi}] vs "
     "{null_jaccard} (p = {p_overlap})"),
    ("retrieval: retrieval score", "circuits: induction |effect|",
     "retrieval ~ that circuit, ρ = {value} [{lo}, {hi}], Jaccard {jaccard} [{jaccard_lo}, {jaccard_hi}] vs "
     "{null_jaccard} (p = {p_overlap})"),
    ("sinks: sink mass (first token)", "retrieval: retrieval score",
     "~ retrieval score ρ = {value} [{lo}, {hi}] (`p_layer = {p_layer}`), {n_shared} top-10 heads shared (Jaccard "
     "{jaccard} [{jaccard_lo}, {jaccard_hi}] vs {null_jaccard}, p = {p_overlap}, q = {q_overlap})"),
    ("retrieval: retrieval score", "circuits: ioi |effect|",
     "are not retrieval heads (ρ = {value} [{lo}, {hi}], `p_layer = {p_layer}`; one head, L17H4, in both top-10s: "
     "Jaccard {jaccard} [{jaccard_lo}, {jaccard_hi}] vs null {null_jaccard})"),
    ("circuits: ioi |effect|", "atlas: induction",
     "only weakly induction heads (ρ = {value} [{lo}, {hi}], `p_layer = {p_layer}`, q = {q_rank}; Jaccard {jaccard} "
     "[{jaccard_lo}, {jaccard_hi}] vs {null_jaccard})"),
    ("retrieval: retrieval score", "grounding: |detector weight|",
     "|weight| ~ retrieval ρ = {value} [{lo}, {hi}] (`p_layer = {p_layer}`)"),
    ("grounding: |detector weight|", "atlas: induction", "~ induction {value} [{lo}, {hi}] ({p_layer})"),
    ("sinks: sink mass (first token)", "grounding: |detector weight|", "~ sink mass {value} [{lo}, {hi}] ({p_layer})"),
    ("circuits: ioi |effect|", "grounding: |detector weight|", "~ the IOI effects {value} [{lo}, {hi}] ({p_layer})"),
    ("sinks: sink mass (first token)", "sinks: ACT selected",
     "mass (ρ = {value} [{lo}, {hi}] over the {n_heads} searched heads, `p_layer = {p_layer}`; {n_shared} shared, "
     "Jaccard {jaccard} [{jaccard_lo}, {jaccard_hi}] vs null {null_jaccard}, p = {p_overlap})"),
    ("sinks: ACT selected", "circuits: induction |effect|",
     "nor the induction circuit's (Jaccard {jaccard} [{jaccard_lo}, {jaccard_hi}] vs {null_jaccard}, p = {p_overlap})"),
    ("sinks: ACT selected", "circuits: ioi |effect|",
     "or IOI circuit's ({jaccard} [{jaccard_lo}, {jaccard_hi}] vs {null_jaccard}, p = {p_overlap})"),
    ("sinks: ACT selected", "grounding: |detector weight|",
     "or the detector's ({jaccard} vs {null_jaccard}, p = {p_overlap}; neither side has per-item values"),
    ("atlas: previous_token", "atlas: duplicate_token", "(previous-token ~ duplicate-token ρ = {value} [{lo}, {hi}])"),
]


def _pair(agreement, a, b):
    rows = agreement[((agreement.score_a == a) & (agreement.score_b == b))
                     | ((agreement.score_a == b) & (agreement.score_b == a))]
    assert len(rows) == 1, (a, b)
    row = rows.iloc[0].to_dict()
    return row | {"n_shared": len(row["shared"].split(", ")) if row["shared"] else 0}


@pytest.mark.parametrize(("a", "b", "phrase"), AGREEMENT, ids=[f"{a}~{b}" for a, b, _ in AGREEMENT])
def test_study_agreement_figures_are_the_shipped_run(atlas, a, b, phrase):
    row = _pair(atlas.agreement, a, b)
    names = re.findall(r"\{(\w+)\}", phrase)
    claim(text("README.md", "### Cross-analysis study"), phrase, **{k: row[k] for k in names})
    if "neither side has per-item values" in phrase:
        assert math.isnan(row["jaccard_lo"])                     # no interval, as the sentence says


def test_study_counts_and_the_act_pairs_are_the_shipped_run(atlas):
    readme, g = text("README.md", "### Cross-analysis study"), atlas.agreement
    act = g[(g.score_a == "sinks: ACT selected") | (g.score_b == "sinks: ACT selected")]
    claim(readme, "none of its {n} pairs reaches q < 0.05", n=len(act))
    assert (act[["q_rank", "q_overlap"]].fillna(1).to_numpy() >= 0.05).all()
    claim(readme, "Of the {n} pairs, {k} agree at q < 0.05 against the within-layer null", n=len(g),
          k=int((g.q_rank < 0.05).sum()))
    shared = _pair(g, "retrieval: retrieval score", "atlas: induction")["shared"]
    assert f"p = 0.001: {shared})" in readme                    # the nine shared heads, named


def test_study_sources_are_the_shipped_run(atlas):
    readme, data = text("README.md", "### Cross-analysis study"), text("data/atlas/README.md")
    src = atlas.sources.set_index("analysis").n_samples
    items = {s.name: s.items.shape[0] for s in atlas.scores if s.items is not None}
    n = {"heads": atlas.layout.n_layers * atlas.layout.n_heads, "niah": items["retrieval: retrieval score"],
         "circ": src["circuits"], "sim": src["similarity"], "prof": items["sinks: sink mass (first token)"],
         "seq": atlas.meta["n_sequences"], "len": atlas.meta["seq_len"], "boot": atlas.meta["n_boot"],
         "perm": atlas.meta["n_perm"], "min": 1 / (atlas.meta["n_perm"] + 1)}
    assert n["boot"] == n["perm"] and items["atlas: induction"] == n["seq"]
    claim(readme, "{heads} heads; sources: retrieval {niah} answered NIAH samples at 300/600 tokens, circuits {circ} "
                  "prompts per task, similarity {sim} prompts, the shipped grounding detector, sinks profile {prof} "
                  "prompts", **n)
    claim(readme, "{seq} repeated sequences of 2 × {len} tokens; {boot} bootstrap and permutation draws, so `p_layer "
                  "= {min}` is the smallest possible", **n)
    claim(data, "`agreement.parquet` ({pairs} pairs", pairs=len(atlas.agreement))
    claim(data, "`transfer.parquet` ({cells} cells: {r} roles x {t} tasks)", cells=len(atlas.transfer),
          r=atlas.transfer.role.nunique(), t=atlas.transfer.task.nunique())
    claim(data, "| {niah} answered of {all} NIAH samples |", niah=n["niah"], all=src["retrieval"])
    claim(data, "| {circ} prompts per task |", **n)
    claim(data, "| {sim} prompts |", **n)
    claim(data, "| {g} held-out answers |", g=src["grounding"])


def test_similarity_run_was_made_by_the_default_settings(similarity):
    from analyses.similarity import SimilarityConfig, load_texts

    r, _ = similarity
    cfg = SimilarityConfig()
    assert "headwise scan similarity --model smollm2-135m --threads 1 --out" in text("data/similarity/README.md")
    assert (r.window, r.plan_budget, r.plan_variant, len(r.plan_log)) == (cfg.window, cfg.budget, cfg.plan_variant,
                                                                         cfg.max_trials)
    assert r.n_prompts == len(load_texts(cfg.prompts)) and r.base_texts.shape[0] == len(load_texts(cfg.heldout))
    assert set(r.echo) == set(cfg.variants)


@pytest.mark.parametrize("where", ["README.md", "data/atlas/README.md"])
def test_study_command_is_the_one_that_made_the_run(atlas, where):
    meta = atlas.meta
    f = flags(text(where), "headwise scan atlas --model smollm2-135m --results results --roles")
    assert f["roles"].split(",") == meta["roles"] and f["tasks"].split(",") == meta["tasks"]
    assert (int(f["n-items"]), int(f["max-new-tokens"]), int(f["loss-texts"])) == \
        (meta["n_items"], meta["max_new_tokens"], meta["loss_texts"])
    cells = [c.split(":") for c in f["niah-cells"].split(",")]
    assert [[n, int(L), float(d)] for n, L, d in cells] == [list(c) for c in meta["niah_cells"]]


def test_study_transfer_prose_is_the_shipped_run(atlas):
    readme, t = text("README.md", "### Cross-analysis study"), atlas.transfer.set_index(["role", "task"])
    ret, ind, act = t.loc[("retrieval", "niah")], t.loc[("induction", "niah")], t.loc[("act", "loss")]
    claim(readme, "removes needle retrieval ({lost} of {answered} answered cells lost, p = {p})",
          lost=ret.drop_top * ret.n_items, answered=ret.plain * ret.n_items, p=ret.p_value)
    claim(readme, "removes retrieval too (drop {d} [{dlo}, {dhi}], p = {p}, n = {n} cells)",
          **interval("d", ind.drop_top, ind.drop_lo, ind.drop_hi), p=ind.p_value, n=ind.n_items)
    claim(readme, 'its one "beyond random" cell is a loss increase of {d} nats/token on {n} texts', d=act.drop_top,
          n=act.n_items)
    assert list(t.index[t.beyond_random]) == [("retrieval", "niah"), ("retrieval", "induction"), ("induction", "niah"),
                                              ("induction", "induction"), ("act", "loss")]


ROLE = {"retrieval": "retrieval", "induction": "induction", "ACT": "act"}
TASK = [("grounded", "grounded"), ("IOI", "ioi"), ("loss", "loss"), ("ACT task", "act"), ("NIAH", "niah"),
        ("induction", "induction")]


def _cells(section: str):
    """The transfer table's rows as (role, task, [n, plain, drop, random, verdict]), one per task."""
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) != 6 or " → " not in cells[0]:
            continue
        if cells[0].split()[0] not in ROLE:
            continue                                                  # the header
        role, tasks = ROLE[cells[0].split()[0]], cells[0].split(" → ")[1].split(" / ")
        for i, part in enumerate(tasks):
            task = next(t for k, t in TASK if k in part)
            yield role, task, [c.split(" / ")[i] if " / " in c else c for c in cells[1:]]


def test_study_transfer_table_is_the_shipped_run(atlas):
    t = atlas.transfer.set_index(["role", "task"])
    seen = []
    for role, task, (n, plain, drop, rand, verdict) in _cells(text("README.md", "### Cross-analysis study", False)):
        row, where = t.loc[(role, task)], f"{role} -> {task}"
        seen.append((role, task))
        assert int(n.split()[0]) == row.n_items, where
        assert printed_as(plain, row.plain), (where, plain, row.plain)
        for cell, cols in ((drop, ("drop_top", "drop_lo", "drop_hi")), (rand, ("drop_random", "random_lo", "random_hi"))):
            nums = re.findall(NUM, cell.split(", p =")[0])
            assert all(printed_as(x, row[c]) for x, c in zip(nums, cols)), (where, cell, [row[c] for c in cols])
        if "p = " in drop:
            assert printed_as(re.search(r"p = (" + NUM + ")", drop).group(1), row.p_value), (where, drop)
        assert verdict.startswith(("**yes**", "called")) == bool(row.beyond_random), (where, verdict)
    assert sorted(seen) == sorted(t.index), "every transfer cell is in the table once"


# ------------------------------------------------------------------------------ grounding, sinks, circuits
def _stat(s, key):
    """A summary Stat's value and bounds as claim() values."""
    v = s[key]
    return {"v": v.value, "lo": v.ci[0], "hi": v.ci[1]}


def test_grounding_readme_is_the_shipped_run():
    s = registry.load_result(ROOT / "data" / "grounding" / "smollm2-135m").summary()
    where = text("README.md", "### Hallucination grounding")
    claim(where, "the prompt template alone scores AUROC {v} [{lo}, {hi}]", **_stat(s, "baseline_template_only"))
    claim(where, "fitted mean-ratio baseline {v} [{lo}, {hi}]", **_stat(s, "baseline_mean_ratio_fitted"))
    claim(where, "the detector gets **{v} [{lo}, {hi}]** (n = {n};", **_stat(s, "auroc"), n=s["auroc"].n)
    claim(where, "**{v} [{lo}, {hi}]** counting only pairs", **_stat(s, "w_auroc"))
    claim(where, "greedy decoding is grounded on {v} [{lo}, {hi}]", **_stat(s, "mitigation_greedy"))
    claim(where, "every head) {v} [{lo}, {hi}], **{dv} [{dlo}, {dhi}]**", **_stat(s, "mitigation_paint"),
          **{f"d{k}": x for k, x in _stat(s, "mitigation_paint_vs_greedy").items()})
    claim(where, "top - random {v} [{lo}, {hi}])", **_stat(s, "mitigation_paint_top20_vs_paint_random20"))
    claim(where, "{v} [{lo}, {hi}] against its own control", **_stat(s, "mitigation_guided_vs_sampled"))


@pytest.mark.parametrize(("folder", "phrase", "key"), [
    ("smollm2-135m", "a paired change of {v} [{lo}, {hi}] (n = 240", "accuracy_accuracy_gain"),
    ("smollm2-135m", "**gains** accuracy, {v} [{lo}, {hi}]", "gold_logprob_accuracy_gain"),
    ("smollm2-135m-qtype", "a paired gain of **{v} [{lo}, {hi}]**", "accuracy_accuracy_gain"),
    ("smollm2-135m-topic", "raise accuracy to {v} [{lo}, {hi}]", "gold_logprob_calibrated"),
    ("smollm2-135m-topic", "**{v} [{lo}, {hi}]** (McNemar", "gold_logprob_accuracy_gain")])
def test_sinks_readme_is_the_shipped_runs(folder, phrase, key):
    s = registry.load_result(ROOT / "data" / "sinks" / folder).summary()
    claim(text("README.md", "### Attention sinks and ACT"), phrase, **_stat(s, key))


def test_circuits_readme_is_the_shipped_run():
    res = registry.load_result(ROOT / "data" / "circuits" / "smollm2-135m")
    tab = res.paths.table().set_index(["task", "frac"])
    where = text("README.md", "### Circuits across tasks")
    for task, phrase in [("ioi", "The circuit alone keeps {v} [{lo}, {hi}]"),
                         ("greater_than", "the 2% circuit (10 heads) keeps {v} [{lo}, {hi}]")]:
        row = tab.loc[(task, 0.02)]
        claim(where, phrase, v=row["kept_normalised"], lo=row["kept_normalised lo"], hi=row["kept_normalised hi"])
    o = res.paths.overlap.set_index(["frac", "task_a", "task_b", "metric"]).sort_index().loc[(0.02, "ioi", "colored_objects")]
    claim(where, "Jaccard {j} [{jlo}, {jhi}], overlap coefficient {c} [{clo}, {chi}] at 2%",
          j=o.loc["jaccard", "value"], jlo=o.loc["jaccard", "lo"], jhi=o.loc["jaccard", "hi"],
          c=o.loc["overlap_coefficient", "value"], clo=o.loc["overlap_coefficient", "lo"],
          chi=o.loc["overlap_coefficient", "hi"])
