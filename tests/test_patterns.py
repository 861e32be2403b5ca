"""Pooled/windowed patterns and the head grid agree with full captured patterns (tiny seeded models)."""
import math

import numpy as np
import pytest

from analyses.atlas import HeadGrid, head_grid
from analyses.patterns import MAX_CELLS, PooledPattern, pattern_window, pooled_pattern
from probe import HeadId, InputError, capture, memory_budget

TEXT = "the cat sat on the mat, the cat sat again"

def _blocks(full: np.ndarray, b: int, reduce) -> np.ndarray:
    """Reference pooling of a full [H, T, T] pattern, block by block, by hand."""
    H, T, _ = full.shape
    n = math.ceil(T / b)
    out = np.zeros((H, n, n))
    for i in range(n):
        for j in range(n):
            out[:, i, j] = reduce(full[:, i * b:(i + 1) * b, j * b:(j + 1) * b])
    return out

@pytest.mark.parametrize("mode", ["max", "mean"])
def test_pooled_equals_pooling_of_full_pattern_across_chunks(tiny_llama, mode):
    full = capture(tiny_llama, TEXT, layers=[1]).patterns[0].numpy()          # (H, T, T)
    T = full.shape[-1]
    with memory_budget(tiny_llama, 4 * T * 16 * 3):                            # 3 query rows per chunk
        p = pooled_pattern(tiny_llama, TEXT, layer=1, cells=7, mode=mode)
    assert p.block == math.ceil(T / 7) and p.pooled.shape == (4, 7, 7)
    ref = _blocks(full, p.block, (lambda x: x.max(axis=(1, 2))) if mode == "max"
                  else (lambda x: x.mean(axis=(1, 2))))
    np.testing.assert_allclose(p.pooled, ref, atol=1e-5)
    if mode == "mean":                                 # every row sums to 1, so block-mean mass totals T
        size = np.diff(p.edges() + [T]).astype(float)
        np.testing.assert_allclose((p.pooled * size[:, None] * size[None, :]).sum((1, 2)), T, rtol=1e-5)

def test_window_equals_capture_slice(tiny_gpt2):
    full = capture(tiny_gpt2, TEXT, layers=[0]).patterns[0].numpy()
    with memory_budget(tiny_gpt2, 4 * 41 * 16 * 5):
        win = pattern_window(tiny_gpt2, TEXT, layer=0, queries=(10, 30), keys=(2, 12))
    np.testing.assert_allclose(win, full[:, 10:30, 2:12], atol=1e-5)

def test_bad_requests_raise_clear_errors(tiny_llama):
    with pytest.raises(InputError, match="cells"):
        pooled_pattern(tiny_llama, TEXT, layer=0, cells=MAX_CELLS + 1)
    with pytest.raises(InputError, match="mode"):
        pooled_pattern(tiny_llama, TEXT, layer=0, mode="median")
    with pytest.raises(InputError, match="inside"):
        pattern_window(tiny_llama, TEXT, layer=0, queries=(5, 2), keys=(0, 3))

def test_pooled_round_trip(tiny_llama, tmp_path):
    p = pooled_pattern(tiny_llama, TEXT, layer=0, cells=5)
    q = PooledPattern.load(p.save(tmp_path / "p.safetensors"))
    np.testing.assert_array_equal(q.pooled, p.pooled)
    assert (q.block, q.mode, q.tokens) == (p.block, p.mode, p.tokens)
    assert set(p.to_frame().columns) >= {"layer", "head", "metric", "value"}

def test_head_grid_matches_full_patterns_and_groups_by_kv(tiny_llama, tmp_path):
    grid = head_grid(tiny_llama, TEXT)
    full = capture(tiny_llama, TEXT).patterns.double()                         # (L, H, T, T)
    ent = -(full * full.clamp_min(1e-30).log()).sum(-1).mean(-1)
    order = tiny_llama.layout.grouped_order()
    np.testing.assert_allclose(grid.matrix("entropy"), ent[:, order].numpy(), atol=1e-4)
    np.testing.assert_allclose(grid.matrix("mass:first"), full[..., 0].mean(-1)[:, order].numpy(), atol=1e-5)
    assert grid.column_labels() == ["kv0:h0", "kv0:h1", "kv1:h2", "kv1:h3"]
    fig = grid.plot("max_prob")
    assert list(fig.data[0].customdata[1][2][:3]) == [1, order[2], str(HeadId(1, order[2]))]   # click: the head
    again = HeadGrid.load(grid.save(tmp_path / "g"))
    np.testing.assert_array_equal(again.matrix("max_prob"), grid.matrix("max_prob"))
    with pytest.raises(InputError, match="no metric"):
        grid.matrix("nope")
