# %% [md]
# # Hallucination grounding: Lookback Lens on SmolLM2-135M
# Lookback Lens (Chuang et al., EMNLP 2024, [arXiv 2407.07071](https://arxiv.org/abs/2407.07071)): the
# *lookback ratio* of a head at a generated token is its mean attention on the context divided by
# (that + its mean attention on the new tokens). A logistic regression on the ratios of all
# `30 × 9` heads, averaged over an answer, tells grounded answers from ungrounded ones. Mitigation:
# guided decoding (best of 8 sampled chunks by the detector) and the PAINT-style boost
# `z + α|z|` of context scores ([arXiv 2501.12206](https://arxiv.org/abs/2501.12206)).
#
# The data: passages stating counterfactual facts ("The capital of France is Lyon.") with a
# question; an answer naming the passage's value is grounded, one naming the real value is not.
# The figures below are the saved validation run (`data/grounding/smollm2-135m/`, made by
# `headwise scan grounding`); the cells after them run the model live.
# %%
import numpy as np
import pandas as pd
import plotly.express as px

from analyses.grounding import Detector, GroundingResult, guided_generate, token_scores, token_view
from analyses.grounding.data import DATA, answer_item, build_items, item_regions, split_of

RUN = DATA.parent / "smollm2-135m"
res = GroundingResult.load(RUN)
keys = ["n_train", "n_heldout", "auroc", "auroc_ci", "baseline_auroc", "null_q95", "perm_p", "w_auroc",
        "w_auroc_ci", "w_baseline_auroc", "w_null_q95", "w_perm_p", "template_baseline_auroc"]
pd.Series({k: res.summary[k] for k in keys}, dtype=object)
# %% [md]
# `auroc` is pooled over held-out items; `w_auroc` counts only pairs of answers to the same prompt
# template, because the template alone predicts much of the label (`template_baseline_auroc`).
# Heads ranked by detector coefficient (red: looking back at the passage predicts grounded):
# %%
res.plot()
# %% [md]
# Grounded rate on held-out items before (greedy) and after each mitigation, with the paired
# change vs greedy and vs each condition's control (sampled for guided, random heads for top heads).
# %%
res.mitigation.drop(columns=["heads"]).round(3)
# %% [md]
# ## Live: one held-out item
# %%
from probe import load_model

model = load_model("smollm2-135m")
det = Detector.load(RUN / "detector.json")
item = next(it for it in build_items() if split_of(it) == "heldout" and it.template_id == 1)
row = answer_item(model, item)
print(item.prompt, "|", row["answer"], "| label:", row["label"])
# %% [md]
# Lookback ratio of every head, averaged over the greedy answer's tokens:
# %%
lr = np.asarray(row["row_lr"]).reshape(row["n_new"], model.n_layers, model.n_heads)
px.imshow(lr.mean(0), color_continuous_scale="Viridis", zmin=0, zmax=1,
          labels={"x": "head", "y": "layer", "color": "lookback ratio"}, aspect="auto")
# %% [md]
# Guided decoding on the same item, each generated token coloured by the detector's P(grounded):
# %%
ids, reg = item_regions(model, item)
out = guided_generate(model, ids, det, ctx=(reg.ctx_start, reg.ctx_stop), max_new_tokens=10)
print(repr(out.text), [round(s, 3) for s in out.chunk_scores])
token_view([model.tokenizer.decode([t]) for t in out.new_ids], token_scores(det, out.row_lr))
