# %% [md]
# # The cross-analysis study: which heads do what, and does one role predict another
# Every analysis in headwise names heads by its own rule (retrieval heads, sink heads, ACT-calibrated
# heads, circuit heads, Lookback Lens weights). The study (`headwise scan atlas`, methods.md §7) puts
# them side by side and asks two questions:
#
# 1. **Agreement**: do two per-head scores rank heads alike? Spearman's rho with an interval that
#    resamples the items behind the scores (prompts, samples, sequences) where they exist, a
#    permutation null that shuffles heads **within their layer** (so a shared depth trend is not
#    agreement), and the top-k overlap (Jaccard) against the same null.
# 2. **Causal transfer**: knock out the top heads of role X by that analysis' own method and
#    measure task Y, against as many random heads drawn in the same layers (>= 5 sets); a cell is
#    "beyond random" only when the role's drop has a paired interval above 0 and exceeds the random
#    sets' upper bound.
#
# The study also computes three roles of its own from streaming statistics on repeated random
# tokens `x_1..x_n x_1..x_n` (Olsson et al. 2022): **induction** (attention to the token after the
# earlier copy), **previous-token** and **duplicate-token**, without keeping any T x T pattern.
#
# This notebook runs a small study on the embedded model (a minute on a laptop CPU): the streaming
# roles, the Lookback Lens detector shipped in `data/grounding/`, and a transfer matrix of the
# induction and previous-token roles on the induction task and the LM loss.
# %%
import tempfile
from pathlib import Path

from probe import load_model
from analyses import registry, run
from analyses.data import data_dir
from analyses.atlas import ATLAS, AtlasConfig, AtlasResult

model = load_model("smollm2-135m")
out = Path(tempfile.mkdtemp()) / "atlas"
# %%
cfg = AtlasConfig(results=(str(out.parent),), analyses=("grounding",), n_sequences=8, seq_len=12, k=9,
                  n_boot=500, n_perm=500, roles=("induction", "previous_token"), tasks=("induction", "loss"),
                  n_random=5, n_items=8, induction_len=12, loss_texts=2, loss_tokens=64, reference_texts=2)
res = run(ATLAS, model, cfg, store=out, progress=False)
{k: s.text() + (f" (n = {s.n})" if s.n else "") for k, s in res.summary().items()}
# %% [md]
# ## Score agreement
# One cell per pair of scores: Spearman's rho (for the similarity family, a categorical score, the
# rank eta^2), `*` where the within-layer permutation null gives q < 0.05 (Benjamini-Hochberg over
# the table). The `resampled` column says what the interval resamples: `items` (both scores have
# per-item values), `items (shared)` (the same sequences behind both, resampled together) or
# `heads` (no per-item values: the interval is over heads and says less).
# %%
res.plot("agreement")
# %%
res.agreement[["score_a", "score_b", "value", "lo", "hi", "p_layer", "q_rank", "jaccard", "null_jaccard",
               "p_overlap", "resampled", "n_heads"]].round(3)
# %% [md]
# The top-k overlap of the same pairs (Jaccard of the k best heads of each score):
# %%
res.plot("overlap")
# %% [md]
# ## Causal transfer
# Rows: the role whose heads are knocked out (mean ablation for the study's own roles); columns: the
# task measured. Each cell shows the role's drop beyond the random sets' drop, relative to the
# unedited model; the table has the drops with their intervals and `n_items`.
# %%
res.plot("transfer")
# %%
res.transfer[["role", "task", "n_items", "n_heads", "plain", "drop_top", "drop_lo", "drop_hi",
              "drop_random", "random_lo", "random_hi", "n_random", "beyond_random"]].round(3)
# %%
res.roles_table
# %% [md]
# ## A head card
# Everything the study knows about one head: its value, rank and percentile in every score, the
# roles the analyses give it, the transfer cells it takes part in (as a knocked-out role head or as
# one of a random set), and a sample pattern (pooled into blocks for long texts).
# %%
best = res.roles_table.set_index("role").loc["induction", "heads"].split(", ")[0]
card = res.card(best, model=model)
print(card.text())
# %%
card.plot("pattern")
# %%
card.plot("transfer")
# %%
card.to_frame().head(8)
# %% [md]
# ## Save and load
# `out` holds one file per finished unit (a rerun resumes; a changed setting recomputes only the
# units it changes) and the result: the scores with their per-item values (safetensors), the
# agreement, transfer and per-item outcome tables (parquet), the summary (JSON) and the figures.
# %%
again = AtlasResult.load(out)
again.transfer.equals(res.transfer), sorted(p.name for p in out.iterdir())
# %% [md]
# ## The study of the embedded model, as shipped
# `data/atlas/smollm2-135m/` holds the README's run (retrieval, induction and ACT roles x NIAH,
# induction, IOI, ACT-task, loss and grounded rate: 18 cells; command in `data/atlas/README.md`): it
# opens without a rerun. Each drop has its paired interval over `n_items`, next to the random sets'.
# %%
shipped = registry.load_result(data_dir() / "atlas" / "smollm2-135m")
{k: s.text() + (f" (n = {s.n})" if s.n else "") for k, s in shipped.summary().items()}
# %%
shipped.transfer[["role", "task", "n_items", "plain", "drop_top", "drop_lo", "drop_hi", "p_value", "drop_random",
                  "random_lo", "random_hi", "beyond_random"]].round(3)
# %% [md]
# ## The same from the command line
# ```
# headwise scan atlas --model smollm2-135m --results results --out results/atlas   # reuses the saved runs
# headwise scan atlas --model smollm2-135m --results results --run-missing ...      # or runs small ones
# headwise head L3H4 --model smollm2-135m --results results                         # one head's card
# ```
# Without `--run-missing` a missing analysis is refused before any work, with the command to run it.
# The README's "Cross-analysis study" section has the study on the embedded model with every number's
# n and interval.
