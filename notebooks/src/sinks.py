# %% [md]
# # Attention sinks and calibration (ACT)
# **Claim** (Yu et al., ICML 2024, *Unveiling and Harnessing Hidden Attention Sinks*,
# arXiv 2406.15765; methods.md §2): attention sinks, keys that soak up a large share of
# attention, appear not only at the first token but also at later tokens (often punctuation or
# newlines), and not all of them help. Scaling the attention on the non-first sinks of chosen
# heads by β = 0.4 and giving the removed mass to the other keys (ACT), without any training,
# improves accuracy; the heads are chosen offline by calibrating each one alone on a calibration
# split.
#
# **What we run:** (1) a sink profile: which keys each head treats as sinks (column mean > τ = 0.1)
# and what kind of token they are; (2) a small ACT head search on the sentiment task: the
# candidates are only the heads of layers 2–3 (the reference searches layers 2…L−2), with 12 items
# per split, and the control calibrates as many random heads. (3) the calibration saved as a file
# and applied to the model.
# %%
import tempfile
from pathlib import Path

import torch

from probe import load_model
from analyses import run
from analyses.sinks import SINKS, SinksConfig, SinksResult, apply_calibration, load_calibration, profile_sinks

model = load_model("smollm2-135m")
out = Path(tempfile.mkdtemp())
# %% [md]
# ## Where the sinks are
# The column sums come from the streaming statistics, so the texts can be long. `first` is the
# sink ACT leaves untouched (normally the first token).
# %%
texts = ["The cat sat on the mat. It was warm, and the dog slept.\nThen the rain came; everyone ran inside.",
         "Prices rose in March.\nAnalysts said the rise, though small, would last: demand is strong."]
profile = profile_sinks(model, texts, min_queries=4)
{k: round(v["share_of_sinks"], 2) for k, v in profile.summary()["token_types"].items()}
# %% [md]
# What to look at: nearly every head puts most of its attention on the first token; the other
# sinks are punctuation, newlines and ordinary words (`other`).
# %%
profile.plot("mass")
# %%
profile.to_frame().head(10)
# %% [md]
# ## ACT head search, with the random-head control
# `headwise scan sinks` in one call: a sink profile of held-out prompts, then each candidate
# calibrated alone on the calibration split (kept by the gold label's log-probability, finer than
# accuracy on 12 items: `selection="gold_logprob"`; the paper's rule is `"accuracy"`); the heads
# that help are then calibrated together on held-out items, next to the same number of random
# candidate heads (2 seeds).
# %%
cfg = SinksConfig(task="sentiment", limit=12, first_layer=2, last_layer=3, n_random=2, selection="gold_logprob",
                  n_profile=2)
res = run(SINKS, model, cfg, store=out, progress=False)
search = res.search
search.figures()
# %%
search.plot("delta_gold_logprob")
# %%
search.to_frame().query("metric == 'delta_gold_logprob'").nlargest(5, "value")
# %% [md]
# Held-out: plain model, the kept heads calibrated, and random heads (the control).
# %%
{"plain": search.heldout["plain"], "calibrated": search.heldout["calibrated"],
 "random heads": {m: search.random_summary(m)["mean"] for m in ("accuracy", "gold_logprob")}}
# %% [md]
# ## Load and apply the calibration
# The run saved the profile, the search (JSON + parquet) and the calibration file, which records
# the engine's edit (heads, β, τ, the sink rule) and the weights it was made for (another model is
# refused). Applying it edits forward passes and `generate` until `remove()`.
# %%
SinksResult.load(out).search.selected == search.selected, sorted(p.name for p in out.iterdir())
# %%
calib = load_calibration(out / "calib.json")
ids = model.encode("Review: a warm, funny film.\nSentiment:")
with torch.no_grad():
    plain = model.hf(ids).logits[0, -1]
    handle = apply_calibration(model, calib)
    calibrated = model.hf(ids).logits[0, -1]
    handle.remove()
calib.heads, float((calibrated - plain).abs().max())
# %% [md]
# ## The same from the command line
# ```
# headwise scan sinks --model smollm2-135m --task sentiment --selection gold_logprob --out runs/sinks
# headwise generate "The movie was" --calibration runs/sinks/calib.json
# ```
