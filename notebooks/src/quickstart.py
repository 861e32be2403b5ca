# %% [md]
# # headwise quickstart
# Load the embedded model (SmolLM2-135M-Instruct, shipped inside a PyPI package: no network),
# capture the attention of a short prompt, look at one head, then get the same per-head
# statistics for a long input without ever holding a `T × T` matrix.
# %%
from probe import HeadId, InterventionSpec, KeyGroup, Uniform, capture, intervene, load_model, stream_stats
from analyses.views import head_heatmap, head_grid

model = load_model("smollm2-135m")
model.n_layers, model.n_heads, model.n_kv_heads
# %% [md]
# The indirect-object prompt: the model should name Mary.
# %%
ids = model.encode("When Mary and John went to the store, John gave a drink to")
model.tokenizer.decode(model.hf(ids).logits[0, -1].argmax())
# %% [md]
# ## Full patterns for a short input
# `capture` runs the TransformerLens bridge (which shares the model's weights) and returns an
# `AttentionRecord` with patterns `[layer, head, query, key]`.
# %%
rec = capture(model, ids)
tuple(rec.patterns.shape)
# %%
head_heatmap(rec, HeadId(9, 3))
# %% [md]
# ## Streaming statistics
# Per layer, head and query row: entropy, max attention, argmax key and the mass on key groups;
# here the first token, which soaks up much of the attention (an attention sink).
# %%
stats = stream_stats(model, ids, groups=[KeyGroup("first", 0, 1)])
stats.to_frame().head()
# %%
head_grid(stats, "mass:first", n_kv_heads=model.n_kv_heads)
# %% [md]
# ## An intervention
# Make every head in layers 10–29 attend uniformly and see the answer break; the edit is removed
# when the block ends.
# %%
late = [HeadId(l, h) for l in range(10, 30) for h in range(9)]
with intervene(model, InterventionSpec([Uniform(heads=late)])):
    broken = model.tokenizer.decode(model.hf(ids).logits[0, -1].argmax())
restored = model.tokenizer.decode(model.hf(ids).logits[0, -1].argmax())
broken, restored
