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
# held-out facts, against the mean-ratio baseline and a permutation null. Then mitigation on one
# held-out items: guided decoding (with plain sampling as its control) and the boost on the
# detector's top heads (with random heads as the control). Here only 45 items (3 facts) are
# used, so the interval is wide; the CLI command at the end runs all 900.
# %%
import tempfile
from pathlib import Path

from probe import load_model
from analyses.grounding import Detector, GroundingResult, guided_generate, run_grounding, token_scores, token_view
from analyses.grounding.data import build_items

model = load_model("smollm2-135m")
out = Path(tempfile.mkdtemp()) / "grounding"
# %% [md]
# `run_grounding` writes every stage under `out` (dataset shards, detector, mitigation) and
# skips finished stages on a rerun.
# %%
res = run_grounding(model, out, limit=45, n_mitigate=1, k=5, n_perm=20, progress=False)
{k: res.summary[k] for k in ("n_items", "n_grounded", "n_not_grounded", "n_heldout", "auroc", "auroc_ci",
                             "baseline_auroc", "null_mean", "null_q95", "perm_p")}
# %% [md]
# What to look at: the held-out AUROC against the mean-ratio baseline and the permutation null
# (`null_q95`); the head map shows which heads' looking back predicts a grounded answer.
# %%
res.plot()
# %%
res.to_frame().query("metric == 'coef'").nlargest(5, "value")
# %% [md]
# ## Mitigation, with controls
# Grounded rate per condition: `greedy` (before), `sampled` (one sampled chunk: the control for
# `guided`), `guided` (best of 8 chunks by the detector), the boost on the top-k heads, on k random
# heads (control) and on all heads of layers 2…L−1. One item only: an illustration of the protocol, not evidence.
# %%
res.mitigation
# %% [md]
# ## The detector on a new answer
# Guided decoding on a held-out item, and each generated token coloured by the detector's
# probability that it is grounded.
# %%
detector = Detector.load(out / "detector.json")
item = build_items(limit=1)[0]
guided = guided_generate(model, item.prompt, detector, max_new_tokens=6, chunk=3, n_candidates=2)
print(item.prompt)
guided.text, guided.chunk_scores
# %%
token_view([model.tokenizer.decode([t]) for t in guided.new_ids], token_scores(detector, guided.row_lr))
# %% [md]
# ## Save and load
# %%
sorted(p.name for p in out.iterdir())
# %%
again = GroundingResult.load(out)
again.summary["auroc"] == res.summary["auroc"], again.head_weights.shape
# %% [md]
# ## The same from the command line
# ```
# headwise scan grounding --model smollm2-135m --out runs/grounding
# headwise grounding-generate --guided runs/grounding/detector.json "Passage: ... Question: ... Answer:"
# ```
