"""Fused Triton kernels vs the eager reference (probe.eager defines the meaning), on CPU under
``TRITON_INTERPRET=1``; bf16 and speed checks need CUDA and are marked ``gpu``.

Sizes are small (the interpreter costs ~10 ms per tile step): T <= 70, D = 16, blocks of 16.
"""
import contextvars
import os
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel modules are imported

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")
pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")

from probe import eager  # noqa: E402
from probe.errors import InputError  # noqa: E402
from probe.interventions import (MeanAblate, SinkCalibration, SpanBoost, SpanKnockout, Temperature,  # noqa: E402
                                 Uniform, ZeroAblate)
from probe.kernels import fused_attend, kernel_backend, plan_supported, reference_attend  # noqa: E402

BLOCKS = dict(block_m=16, block_n=16)
GROUPS = [(0, 1), (3, 9), (20, None)]


def inputs(T=37, H=4, KV=2, D=16, Tq=None, B=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    Tq = T if Tq is None else Tq
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, KV, T, D, generator=g)
    v = torch.randn(B, KV, T, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def compare(q, k, v, plan=None, mask=None, groups=GROUPS, received_from=0, atol=2e-5):
    scale = q.shape[-1] ** -0.5
    out, st, col = fused_attend(q, k, v, scale=scale, mask=mask, plan=plan, groups=groups, received=True,
                                received_from=received_from, **BLOCKS)
    r_out, r_st, r_col = reference_attend(q, k, v, scale=scale, mask=mask, plan=plan, groups=groups,
                                          received_from=received_from)
    assert out.dtype == q.dtype and out.shape == r_out.shape
    assert torch.isfinite(out).all() and torch.isfinite(st["entropy"]).all()
    torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=atol)
    for key in ("entropy", "max_prob", "group_mass"):
        torch.testing.assert_close(st[key].double(), r_st[key], atol=atol, rtol=atol, msg=key)
    assert torch.equal(st["argmax"], r_st["argmax"])
    torch.testing.assert_close(col.double(), r_col, atol=atol * 10, rtol=atol)
    return out, st, col


def plan_of(*edits, layer=0):
    from probe.interventions import InterventionSpec

    return eager.compile_plan(InterventionSpec(edits), layer, decoding=False)


def test_plain_gqa_odd_length_statistics():
    q, k, v = inputs(T=37, H=4, KV=2)
    out, st, col = compare(q, k, v)
    # hand-checkable facts of the causal pattern: row 0 sees only key 0; received sums add up to the rows
    assert float(st["max_prob"][0, 0, 0]) == pytest.approx(1.0) and int(st["argmax"][0, 0, 0]) == 0
    assert float(col.sum()) == pytest.approx(4 * 37, rel=1e-5)


def test_score_edits_and_ablated_head():
    plan = plan_of(Uniform(heads=["L0H0"]), Temperature(heads=["L0H1"], temperature=0.5),
                   SpanBoost(heads=["L0H2"], spans=[(2, 6), (30, 33)], alpha=0.7),
                   SpanBoost(heads=["L0H3"], spans=[(0, 4)], alpha=2.0, rows="last"),
                   ZeroAblate(heads=["L0H1"]))
    q, k, v = inputs(T=41, H=4, KV=2, seed=1)
    out, st, _ = compare(q, k, v, plan)
    assert (out[:, :, 1] == 0).all() and (out[:, :, 0] != 0).any()
    # the uniform head attends 1/(i+1) everywhere: entropy log(i+1)
    torch.testing.assert_close(st["entropy"][0, 0], torch.log(torch.arange(1, 42.0)), atol=1e-5, rtol=1e-5)


def test_act_detected_sinks_with_dominant_sink():
    q, k, v = inputs(T=45, H=4, KV=2, seed=2)
    u = torch.nn.functional.normalize(torch.ones(16), dim=0)
    q += 3.0 * u
    k[:, :, 5] = 8.0 * u  # key 5 aligns with every query: a sink taking almost all the mass (m -> 1)
    # key 0 is not a sink here (mean < tau), so key 5 is the first detected sink: keep_first would spare it
    plan = plan_of(SinkCalibration(heads=["L0H0"], beta=0.4, tau=0.1, keep_first=False),
                   SinkCalibration(heads=["L0H1"], beta=0.2, rule="alpha", alpha=3.0, keep_first=False),
                   SinkCalibration(heads=["L0H2"], beta=0.3, sinks=(0, 5)))
    out, st, _ = compare(q, k, v, plan, atol=5e-5)
    plain, _, _ = fused_attend(q, k, v, scale=0.25, groups=(), **BLOCKS)
    for h in range(3):  # ACT changed every calibrated head (detected and given sinks), not the others
        assert (out[:, 6:, h] - plain[:, 6:, h]).abs().max() > 1e-2
    torch.testing.assert_close(out[:, :, 3], plain[:, :, 3])


def test_extreme_sink_no_nan():
    """m = 1 up to float rounding: the split accumulators stay finite (a log-gamma bias would not)."""
    q, k, v = inputs(T=33, H=2, KV=1, seed=3)
    q[:] = 1.0
    k[:, :, 0] = 60.0  # scores 240 at key 0
    plan = plan_of(SinkCalibration(heads=["L0H0"], beta=0.5, sinks=(0,), keep_first=False))
    out, st, _ = compare(q, k, v, plan, atol=5e-5)
    assert torch.isfinite(out).all()


def test_fully_masked_rows_and_explicit_mask():
    q, k, v = inputs(T=29, H=4, KV=4, seed=4)
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(1, 1, 29, 29, generator=g) > 0.4
    mask[..., 3, :] = False
    mask[..., 17, :] = False
    plan = plan_of(SinkCalibration(heads=["L0H1"], beta=0.4, tau=0.1, min_queries=2))
    out, st, _ = compare(q, k, v, plan, mask=mask)
    assert (out[:, 3] == 0).all() and (st["entropy"][..., 3] == 0).all() and (st["max_prob"][..., 17] == 0).all()


def test_batch_of_two_padding_mask_and_sixteen_groups():
    """Per-sequence masks (left padding) and sinks; the full 16 key groups, overlapping."""
    q, k, v = inputs(T=24, H=2, KV=1, B=2, seed=11)
    mask = torch.tril(torch.ones(24, 24, dtype=torch.bool)).repeat(2, 1, 1, 1)
    mask[1, :, :, :5] = False  # sequence 1 is left-padded by 5 (its first 5 rows see nothing)
    groups = [(i, i + 3) for i in range(0, 15)] + [(2, None)]
    plan = plan_of(SinkCalibration(heads=["L0H1"], beta=0.4, tau=0.1, keep_first=False))
    out, st, _ = compare(q, k, v, plan, mask=mask, groups=groups)
    assert st["group_mass"].shape == (2, 2, 24, 16) and (out[1, :5] == 0).all()


def test_decode_row_against_cache_and_received_from():
    q, k, v = inputs(T=40, Tq=1, H=4, KV=2, seed=5)
    compare(q, k, v, plan_of(SinkCalibration(heads=["L0H3"], beta=0.4, tau=0.1)))
    q, k, v = inputs(T=50, Tq=19, H=4, KV=1, seed=6)
    compare(q, k, v, received_from=7)


def test_fp16_inputs_fp32_accumulation():
    q, k, v = inputs(T=35, H=4, KV=2, seed=7, dtype=torch.float16)
    plan = plan_of(SinkCalibration(heads=["L0H0"], beta=0.4, tau=0.1), Temperature(heads=["L0H2"], temperature=2.0))
    compare(q, k, v, plan, atol=3e-3)


def test_mean_ablation_is_applied_after():
    q, k, v = inputs(T=20, H=4, KV=2, seed=8)
    value = torch.arange(16.0)
    out, _, _ = compare(q, k, v, plan_of(MeanAblate(heads=["L0H2"], values=[value])))
    assert torch.equal(out[0, :, 2], value.expand(20, 16))


def test_unsupported_plans_are_named_and_refused():
    plan = plan_of(SpanKnockout(heads=["L0H0"], spans=[(0, 2)]))
    assert "SpanKnockout" in plan_supported(plan)
    assert plan_supported(plan_of(SpanBoost(heads=["L0H0"], spans=[(0, 1)]), SpanBoost(heads=["L0H0"], spans=[(2, 3)])))
    q, k, v = inputs(T=8)
    with pytest.raises(InputError, match="eager"):
        fused_attend(q, k, v, scale=1.0, plan=plan)
    with pytest.raises(InputError, match="query heads"):
        fused_attend(q, k, v, scale=1.0, plan=plan_of(Temperature(heads=["L0H7"], temperature=2.0)))
    with pytest.raises(InputError, match="key groups"):
        fused_attend(q, k, v, scale=1.0, groups=[(0, 1)] * 17)
    assert kernel_backend(q) is None  # CPU tensors take the eager engine


def count_kernel_calls(monkeypatch) -> list:
    """Route probe.kernels.fused_attend through a counter (proves the Runtime took the kernel path)."""
    import probe.kernels as pk

    calls, real = [], pk.fused_attend
    monkeypatch.setattr(pk, "fused_attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_runtime_kernel_path_matches_eager_stats(tiny_llama, monkeypatch):
    """stream_stats through the Runtime: the kernel path (forced under the interpreter) == eager."""
    from probe import InterventionSpec, KeyGroup, stream_stats

    ids = tiny_llama.encode("kernels!")
    spec = InterventionSpec([SinkCalibration(heads=["L1H0"], beta=0.4, tau=0.1),
                             Temperature(heads=["L0H1"], temperature=2.0)])
    groups = [KeyGroup("first", 0, 1), KeyGroup("rest", 1)]
    monkeypatch.setenv("HEADWISE_KERNELS", "0")
    ref = stream_stats(tiny_llama, ids, groups=groups, spec=spec, verbose=False)
    monkeypatch.setenv("HEADWISE_KERNELS", "interpret")
    assert kernel_backend(ids.float()) == "triton"
    calls = count_kernel_calls(monkeypatch)
    got = stream_stats(tiny_llama, ids, groups=groups, spec=spec, verbose=False)
    assert len(calls) == 2  # one per layer
    for name in ("entropy", "max_prob", "group_mass", "received_sum", "received_count"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-4, rtol=1e-4, msg=name)
    assert torch.equal(got.argmax, ref.argmax) and torch.equal(got.query_pos, ref.query_pos)


def test_runtime_kernel_path_in_generation(tiny_llama, monkeypatch):
    """Decode steps (one row against the KV cache) and from_pos ("last") through the kernel path == eager."""
    from probe import InterventionSpec, KeyGroup, generate_with_stats

    ids = tiny_llama.encode("abc")
    spec = InterventionSpec([SinkCalibration(heads=["L0H2"], beta=0.5, tau=0.1)])
    kw = dict(max_new_tokens=3, groups=[KeyGroup("prompt", 0, 3)], prefill_spec=spec, decode_spec=spec,
              stats_in_prefill="last")
    monkeypatch.setenv("HEADWISE_KERNELS", "0")
    ref = generate_with_stats(tiny_llama, ids, **kw)
    monkeypatch.setenv("HEADWISE_KERNELS", "interpret")
    calls = count_kernel_calls(monkeypatch)
    got = generate_with_stats(tiny_llama, ids, **kw)
    assert len(calls) >= 2 * 3  # prefill and decode steps, both layers
    assert torch.equal(got.new_ids, ref.new_ids) and torch.equal(got.stats.query_pos, ref.stats.query_pos)
    for name in ("entropy", "group_mass", "received_sum", "received_count"):
        torch.testing.assert_close(getattr(got.stats, name), getattr(ref.stats, name), atol=1e-4, rtol=1e-4,
                                   msg=name)


def test_runtime_falls_back_to_eager_when_the_kernel_fails(tiny_llama, monkeypatch):
    import probe.kernels as pk
    from probe import stream_stats

    def broken(*a, **kw):
        raise RuntimeError("no such GPU feature")

    ids = tiny_llama.encode("hi")
    ref = stream_stats(tiny_llama, ids, verbose=False)  # the eager engine (CPU, kernels not asked for)
    monkeypatch.setenv("HEADWISE_KERNELS", "interpret")
    monkeypatch.setattr(pk, "fused_attend", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = contextvars.Context().run(stream_stats, tiny_llama, ids, verbose=False)  # a fresh context
    failed = [w for w in caught if issubclass(w.category, RuntimeWarning) and "eager engine" in str(w.message)]
    assert len(failed) == 1 and got.entropy.shape == (2, 4, ids.shape[1])  # warned once for the context's calls
    torch.testing.assert_close(got.entropy, ref.entropy)  # each call fell back to the exact eager engine


# ----------------------------------------------------------------------------- GPU only
# This module runs Triton in the interpreter, so GPU checks run bench/kernels.py in a fresh process.

def _bench(*args):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HEADWISE_KERNELS")}
    return subprocess.run([sys.executable, "bench/kernels.py", *args], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_fp16_against_reference():
    done = _bench("--check")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_speed_runs():
    import json

    done = _bench("--quick")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["results"]
    assert any(r["method"] == "fused" and r.get("ms") for r in rows)
