# %% [md]
# # Grounding: Lookback Lens and the PAINT-style boost
# **Claims.** Lookback Lens (Chuang et al., EMNLP 2024, arXiv 2407.07071): the *lookback ratio*
# of each head, the attention on the context over the attention on the context plus the newly
# generated tokens, averaged over an answer, is enough for a linear detector of ungrounded
# (hallucinated) answers (AUROC 0.91 in-domain on Llama-2-7B-chat); choosing among sampled
# chunks the one the detector finds most grounded reduces hallucinations. PAINT (arXiv
# 2501.12206) boosts the pre-softmax scores of context tokens (`z + α|z|`) in layers 2…L−1 to the
# same end. See methods.md §5.
#
# **What we run:** passages that state a *counterfactual* fact ("the capital of France is Lyon"),
# then a question; an answer copying the passage is grounded, one giving the real-world value is
# not (labelled automatically). The model answers greedily while the streaming statistics record
# every head's lookback ratio; a logistic regression is trained on some facts and evaluated on
# held-out facts, against the mean-ratio baseline and a permutation null. Then mitigation on a
# held-out item: the boost on the detector's top heads (random heads as the control) and guided
# decoding (a randomly kept candidate as the control). First the shipped full run (1,750 items, 300 mitigation items),
# then a live run on 30 items (2 facts: one to train, one held out), whose interval is wide.
# %%
import tempfile
from pathlib import Path

from probe import load_model
from analyses import run
from analyses.data import data_path
from analyses.grounding import (GROUNDING, GroundingConfig, GroundingResult, boost_heads, boost_spec, build_items,
                                guided_generate, item_regions, token_scores)
from analyses.grounding.data import answer_item
from analyses.grounding.plots import token_view

model = load_model("smollm2-135m")
out = Path(tempfile.mkdtemp()) / "grounding"
# %% [md]
# ## The full run, as shipped
# `data/grounding/smollm2-135m/` holds the validation run of the embedded model (1,750 items,
# made by `headwise scan grounding`, see `data/grounding/README.md`); loading it is instant.
# %%
full = GroundingResult.load(data_path("grounding", "smollm2-135m"))
{k: v.text() + (f" (n = {v.n})" if v.n else "") for k, v in full.summary().items()}
# %%
full.plot()
# %% [md]
# The honest baselines come first (the template alone, the fitted mean-ratio baseline), then the
# detector. Mitigation: grounded rate on 300 held-out items per condition (PAINT as stated on every
# head, on the detector's top 20 heads and on 20 random heads; guided decoding and plain sampling),
# with the paired change against greedy decoding and against each condition's control, bootstrap
# intervals and exact McNemar p.
# %%
full.mitigation.drop(columns=["heads"]).round(3)
# %% [md]
# ## A small run, live
# `run` writes every stage's units under `out` (answered item shards, the detector fit,
# mitigation answers) and the result, and skips finished units on a rerun.
# %%
res = run(GROUNDING, model, GroundingConfig(limit=30, n_mitigate=0, n_perm=20), store=out, progress=False)
{k: res.stats[k] for k in ("n_items", "n_grounded", "n_not_grounded", "n_heldout", "auroc", "auroc_ci",
                             "baseline_auroc", "null_q95", "perm_p", "w_auroc", "template_baseline_auroc")}
# %% [md]
# What to look at: the held-out AUROC against the mean-ratio baseline and the permutation null
# (`null_q95`). The prompt template alone predicts much of the label (`template_baseline_auroc`),
# so `w_auroc` counts only pairs of answers to the same template. The head map shows which heads'
# looking back predicts a grounded answer.
# %%
res.plot()
# %%
res.to_frame().query("metric == 'coef'").nlargest(5, "value")
# %% [md]
# ## Mitigation, with controls
# On the first held-out item the model got wrong (its greedy answer contradicts the passage), the
# greedy answer again, then the PAINT-style boost
# (`z + 0.3|z|` on the passage keys, last query row) in the detector's top-5 heads, in 5 random
# heads of layers 2…L−1 (the control) and in all of them. One item: an illustration of the
# protocol; `GroundingConfig(n_mitigate=40)` measures grounded rates over held-out items.
# %%
detector = res.detector
data = res.answers
wrong = data[(data.split == "heldout") & (data.label == 0)].iloc[0]
item = {it.item_id: it for it in build_items(limit=30)}[wrong.item_id]
print(item.prompt)
ids, reg = item_regions(model, item)
conditions = {"greedy": [], "boost top-5": boost_heads(detector, 5), "boost random-5": boost_heads(detector, 5, "random"),
              "boost all": boost_heads(detector)}
{name: answer_item(model, item, spec=boost_spec(heads, (reg.ctx_start, reg.ctx_stop), 0.3) if heads else None)["answer"]
 for name, heads in conditions.items()}
# %% [md]
# Guided decoding keeps, chunk by chunk, the sampled candidate the detector scores most grounded;
# its control keeps a random candidate (`random_choice=True`). A chunk is scored on the rows that
# *produced* its tokens, so two chunks differing only in their last token score the same. Each
# token of the guided answer is coloured by the detector's probability that it is grounded.
# %%
guided = guided_generate(model, ids, detector, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=8, chunk=4,
                         n_candidates=4, seed=1)
sampled = guided_generate(model, ids, detector, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=8, chunk=4,
                          n_candidates=4, seed=1, random_choice=True)
{"guided": (guided.text, guided.chunk_scores), "random candidate": (sampled.text, sampled.chunk_scores)}
# %%
token_view([model.tokenizer.decode([t]) for t in guided.new_ids], token_scores(detector, guided.row_lr))
# %% [md]
# ## Save and load
# %%
sorted(p.name for p in out.iterdir())
# %%
again = GroundingResult.load(out)
again.stats["auroc"] == res.stats["auroc"], again.head_weights.shape
# %% [md]
# ## The same from the command line
# ```
# headwise scan grounding --model smollm2-135m --out runs/grounding
# headwise generate --guided runs/grounding/detector.json --html view.html "The capital of France is Lyon.
# Q: What is the capital of France?
# A:"
# ```
# Rerun the scan to resume; `generate --guided` decodes with the detector and writes the token view.
