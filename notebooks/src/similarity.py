# %% [md]
# # Attention similarity across layers (EchoAtt)
# **Claim** (Rajabzadeh et al. 2024, *EchoAtt: Attend, Copy, then Adjust*, arXiv 2409.14595;
# methods.md §4): the inner layers of a language model have highly similar attention maps, so
# a block of layers can share one layer's attention at little cost. LiSA (Mu et al. 2024,
# arXiv 2408.01890) adds that heads must be realigned across layers and that shallow layers are
# fragile.
#
# **What we run:** layer × layer and head × head similarity (cosine of the causal maps and a
# row-wise Jensen–Shannon divergence); then the *echo* experiment on held-out text: layer l+1
# reuses layer l's pattern (`PatternEcho`), with heads matched across the
# two layers (`matched`) or randomly permuted (`random`, the control), and we measure the loss
# increase. If similarity predicts shareability, the loss increase falls as similarity rises
# (negative rank correlation). Finally a greedy sharing plan under a loss budget.
# %%
import tempfile
from pathlib import Path

from probe import load_model
from analyses import run
from analyses.data import data_path
from analyses.similarity import SIMILARITY, SimilarityConfig, SimilarityResult

model = load_model("smollm2-135m")
out = Path(tempfile.mkdtemp()) / "similarity"
# %% [md]
# ## The full run, as shipped
# `data/similarity/smollm2-135m/` holds the validation run of the embedded model (20 prompts, 12
# held-out texts, the default settings; command in `data/similarity/README.md`). Every headline
# carries its n and a 95% interval: prompts resampled for the cosines, held-out texts for the
# losses (paired with the baseline), layer pairs for the rank correlations.
# %%
full = SimilarityResult.load(data_path("similarity", "smollm2-135m"))
{k: f"{s.text()} (n = {s.n})" for k, s in full.summary().items()}
# %% [md]
# Matching heads across the two layers is what makes an echo cheap: the random permutation is the
# control, and same-index heads are no better than it.
# %%
full.plot("echo")
# %% [md]
# ## A small run, live
# %%
cfg = SimilarityConfig(n_prompts=2, n_heldout=2, max_tokens=32, variants=("matched", "random"), max_trials=2)
res = run(SIMILARITY, model, cfg, store=out, progress=False)
summary = res.summary()
{k: f"{summary[k].text()} (n = {summary[k].n})" for k in ("first_pair_cos", "inner_pairs_mean_cos", "last_pair_cos")}
# %% [md]
# What to look at: a bright band along the diagonal (adjacent layers attend alike), weakest for
# the first layers.
# %%
res.plot("layers")
# %%
res.plot("heads")
# %% [md]
# ## Echo: reuse layer l's pattern in layer l+1
# One bar per adjacent pair: the loss increase (nats/token) of sharing, for matched heads and for
# a random head permutation (the control), against the pair's similarity.
# %%
res.plot("echo")
# %% [md]
# Spearman's rho of echo cost against similarity over the adjacent layer pairs (n = pairs), with
# the interval over resampled pairs:
# %%
{k: f"{s.text()} (n = {s.n})" for k, s in summary.items() if k.startswith("spearman")}
# %% [md]
# The sharing plan: blocks of consecutive layers that share the first layer's pattern, grown
# greedily while the measured loss stays under the budget (on two short held-out texts the
# measured cost is noisy and can even be negative; its interval resamples the two).
# %%
plan = summary["plan_cost"]
[b for b in res.plan_blocks if len(b) > 1], f"{plan.text()} nats/token (n = {plan.n} held-out texts)"
# %%
frame = res.to_frame()
frame[frame.scope == "echo"].head()
# %% [md]
# ## Save and load
# `out` holds one file per finished unit (rerunning resumes; every measured plan trial is a unit
# too) and the result: matrices (safetensors), the tidy table (parquet), the summary (JSON), figures.
# %%
again = SimilarityResult.load(out)
bool((again.layer_cos == res.layer_cos).all()), sorted(p.name for p in out.iterdir())
# %% [md]
# ## The same from the command line
# ```
# headwise scan similarity --model smollm2-135m --out runs/similarity
# ```
# It also writes all four figures to `runs/similarity/figures/`.
