# %% [md]
# # Circuits across tasks and their overlap
# **Claim** (Merullo, Eickhoff, Pavlick, ICLR 2024, *Circuit Component Reuse Across Tasks in
# Transformer Language Models*, arXiv 2310.08744; methods.md §3): the circuits two different
# tasks use share many of their heads (about 78% between Indirect Object Identification and
# Colored Objects in GPT-2 Medium), and heads of one task's circuit can be steered to fix the
# other task.
#
# **What we run:** for IOI ("When Mary and John went to the store, John gave a drink to" → Mary)
# and an induction task, per-head activation patching (exact: one patched run per head), with
# attribution patching (EAP) and EAP-IG as fast estimates; the circuit is the top 5% of heads;
# faithfulness of the circuit next to a random-head control; then the overlap of the two
# circuits (Jaccard, overlap coefficient, rank correlation) against a random null. The paper's
# method follows: path patching stage by stage (Wang et al. 2022), EAP-IG shortlisting the
# senders and path patching confirming the top 2% and 5% per stage. Only 2 prompts per task and
# 6 shortlisted senders per stage here, so the numbers are illustrations; the CLI command at the
# end runs the full study (32 prompts, 30 senders per stage, 3 tasks, bootstrap intervals, the
# steering intervention).
# %%
import tempfile
from pathlib import Path

from probe import load_model
from analyses import registry, run
from analyses.circuits import CIRCUITS, CircuitsConfig, CircuitsResult
from analyses.data import data_dir

model = load_model("smollm2-135m")
out = Path(tempfile.mkdtemp()) / "circuits"
# %% [md]
# `run` runs every task (one unit file per finished task, so a rerun resumes), then the
# overlap, the head roles (previous-token, duplicate-token, induction, mover scores) and writes
# everything under `out`.
# %%
res = run(CIRCUITS, model, CircuitsConfig(tasks=("ioi", "induction"), n=2, ig_steps=2, n_boot=20,
                                   shortlist=6), store=out,
          progress=False)
ioi = res.task("ioi")
ioi.accuracy, [str(h) for h in ioi.circuit]
# %% [md]
# What to look at: a few heads carry most of the effect (dark cells); the dots mark the circuit.
# %%
ioi.plot()
# %% [md]
# Faithfulness: `kept` is the share of the clean logit difference kept when everything *but*
# the circuit is mean-ablated, `removed` the share lost when the circuit is ablated. The control
# does the same with as many random heads in the same layers: it should keep and remove little.
# %%
{name: {k: round(v, 2) for k, v in f.items() if k in ("kept", "removed")}
 for name, f in [("circuit", ioi.faithfulness), ("random heads", ioi.faithfulness["random_control"])]}
# %% [md]
# Do the fast estimates rank heads like exact patching? (Spearman over all heads.)
# %%
ioi.method_agreement()
# %% [md]
# ## Overlap between the tasks
# `null_mean`/`null_q95`/`p_null`: the same statistic for random head sets of the same sizes.
# %%
res.overlap[["task_a", "task_b", "metric", "value", "null_mean", "null_q95", "p_null"]]
# %%
res.plot()
# %% [md]
# The circuit heads with their role scores (e.g. induction heads in the induction circuit).
# %%
res.circuit_roles().round(2)
# %%
res.to_frame().head()
# %% [md]
# ## Path patching, stage by stage
# Each stage's receivers are the heads the stage below kept (the logits first); a sender's score
# is the share of the logit difference its path to the receivers carries. The table lists the
# path-patched circuits at the top 2% and 5% per stage with their faithfulness and a random-head
# control.
# %%
res.paths.table()
# %% [md]
# ## The validation run, as shipped
# `data/circuits/smollm2-135m/` holds the README's path-patching run of the embedded model
# (command, time and load in `data/circuits/README.md`): per task and stage the kept heads at 2% and 5%,
# faithfulness with its bootstrap interval and the difference to 10 random head sets
# (`kept_normalised - random`), the overlap with both denominators and the random null, and each
# stage's heads next to the role score of the class the stage stands for (rank 1 = the strongest head).
# %%
shipped = registry.load_result(data_dir() / "circuits" / "smollm2-135m")
shipped.paths.table()
# %%
shipped.paths.overlap
# %%
shipped.stage_roles()
# %% [md]
# ## Save and load
# `run` already wrote the files (parquet per task, overlap, roles, JSON summary, figures, units).
# %%
sorted(p.name for p in out.iterdir())
# %%
again = CircuitsResult.load(out)
[str(h) for h in again.task("ioi").circuit] == [str(h) for h in ioi.circuit]
# %% [md]
# ## The same from the command line
# ```
# headwise scan circuits --model smollm2-135m --tasks ioi,colored_objects,induction --out runs/circuits
# ```
# With both `ioi` and `colored_objects` the scan also runs the steering intervention
# (`res.repair`, key `repair` of `summary.json`: accuracy before/after, and a random-head control).
