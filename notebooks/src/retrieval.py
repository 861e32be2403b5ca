# %% [md]
# # Retrieval heads
# **Claim** (Wu et al. 2024, *Retrieval Head Mechanistically Explains Long-Context Factuality*,
# arXiv 2404.15574; methods.md §1): a sparse set of attention heads (under 5% of heads score
# above 0.1) copy the needle from a long context into the answer, token by token; making the
# top retrieval heads attend uniformly breaks needle-in-a-haystack (NIAH) retrieval, while
# masking the same number of random heads barely matters.
#
# **What we run:** a tiny NIAH grid (one needle, one short context, three depths) on the
# embedded model. At every decode step a head makes a *copy-paste event* when its argmax key
# lies in the answer span and holds the emitted token; a head's score is events / span length,
# averaged over the samples the model answers. Then the masking control: top-K heads vs K
# random heads made uniform during decoding. The scan's default grid is 6 lengths to 8k × 5
# depths × 4 needles (see the CLI command at the end); at the tiny size run live here, the scores are noisy,
# so the notebook first opens the validation run shipped with headwise.
# %%
import tempfile
from pathlib import Path

from probe import load_model
from analyses import run
from analyses.data import data_path
from analyses.retrieval import RETRIEVAL, RetrievalConfig, RetrievalResult

model = load_model("smollm2-135m")
out = Path(tempfile.mkdtemp()) / "retrieval"
# %% [md]
# ## The validation run, as shipped
# `data/retrieval/smollm2-135m/` holds the README's run on the embedded model (contexts of 250 to
# 8,000 tokens, the needle at 5 depths, 3 needles, masking at depth 50 on every length; the
# command and its grid are in `data/retrieval/README.md`). Loading it is instant. Every headline
# carries its n and 95% interval: the sparsity bootstrap is over answered samples, the masking
# success is over cells (Wilson), and each random-K seed is paired with top-K on the same cells.
# %%
full = RetrievalResult.load(data_path("retrieval", "smollm2-135m"))
{k: f"{s.text()} (n = {s.n})" for k, s in full.summary().items()}
# %% [md]
# A 135M model does not answer every context it can read: unmasked success per length, with a
# Wilson interval over that length's samples. Head scores only count the answered samples.
# %%
full.success_by("length")
# %%
full.plot("niah")
# %%
full.masking_table()
# %% [md]
# ## Score every head
# `run` drives the analysis' stages: it builds the prompts, decodes greedily with streaming
# statistics (no `T × T` matrix), scores the heads, and runs the masking experiment on
# `mask_cells`. With `store=DIR` every finished sample is a unit file (an interrupted run resumes)
# and the result and its figures are saved there.
# %%
cfg = RetrievalConfig(lengths=(200,), depths=(0, 50, 100), needles=("code",), k=5, seeds=(0,), max_new_tokens=8,
                      mask_cells=(("code", 200, 0.0), ("code", 200, 100.0)))
res = run(RETRIEVAL, model, cfg, store=out, progress=False)
res.samples[["needle", "length", "depth", "response", "recall", "success"]]
# %% [md]
# What to look at: the scores are sparse (a handful of bright cells), and the fraction of heads
# above the 0.1 threshold is small (its interval resamples the answered samples: with three of
# them it is wide).
# %%
res.plot("heads")
# %%
above = res.summary()["above"]
f"{above.text()} of heads score > {res.threshold} (n = {above.n} answered samples)", res.retrieval_heads()[:8]
# %%
frame = res.to_frame()
frame[frame.metric == "retrieval_score"].nlargest(8, "value")
# %% [md]
# GQA: the 9 query heads of a layer share 3 key/value heads; the grouped view sums up per KV head.
# %%
res.plot("grouped")
# %%
res.grouped().nlargest(5, "max_score")
# %% [md]
# ## Control: mask the top-K heads vs K random heads
# Masking the retrieval heads should hurt the answers more than masking random heads drawn
# outside the top set (`random0`). With two prompts this is an illustration, not evidence; the
# full study masks more heads, with several random seeds, on longer contexts.
# %%
res.masking[["condition", "depth", "heads", "response", "recall"]]
# %% [md]
# Success per condition on the masked cells, with its n and Wilson interval (two cells: an
# interval close to [0, 1]), and each random seed paired with top-K on the same cells.
# %%
res.masking_table()
# %%
res.plot("masking")
# %% [md]
# ## Save and load
# `run` wrote parquet tables, a JSON summary, the figures and one file per unit, atomically.
# %%
sorted(p.name for p in out.iterdir())
# %%
again = RetrievalResult.load(out)
bool((again.scores == res.scores).all()), again.masking_rates() == res.masking_rates()
# %% [md]
# ## The same from the command line
# ```
# headwise scan retrieval --model smollm2-135m --out runs/retrieval      # the default grid: 6 lengths to 8k x 5 depths x 4 needles
# headwise scan retrieval --model smollm2-135m --out runs/retrieval-small --lengths 500,1000 --depths 0,50,100 --needles code
# ```
# Rerun the same command to resume; the figures are written to `runs/retrieval/figures/*.html`.
