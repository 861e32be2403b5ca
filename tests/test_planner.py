"""The planner: a time model calibrated on the machine, and the estimate stream_stats announces."""
from pytest import approx

from probe import planner
from probe.memory import activation_bytes, stream_estimate
from probe.streaming import plan_stream


def test_the_time_model_is_linear_plus_quadratic_per_layer():
    tm = planner.TimeModel(linear=1e-3, attention=1e-7, stats=2e-7, n_layers=4)
    assert tm.plain(1000) == approx(1e-3 * 1000 + 4 * 1e-7 * 1000 ** 2)
    assert tm.stream(2000) - tm.plain(2000) == approx(4 * 2e-7 * 2000 ** 2)


def test_calibration_measures_this_machine_once_per_process(tiny_llama):
    tm = planner.calibrate(tiny_llama)
    assert tm.linear > 0 and tm.attention > 0 and tm.stats > 0 and tm.n_layers == tiny_llama.n_layers
    assert planner.calibrate(tiny_llama) is tm                     # cached: no second measurement
    assert tm.stream(4096) > tm.plain(4096) > tm.plain(2048)


def test_the_announced_plan_holds_the_forward_and_the_results(tiny_llama, capsys):
    plan = plan_stream(tiny_llama, 4096, 2)
    cfg = tiny_llama.hf.config
    mlp, attention = activation_bytes(cfg, 4096)
    assert plan.memory.work >= attention > 0 and mlp > 0            # the model's own activations are counted
    assert plan.memory.bytes >= max(plan.memory.work, mlp)
    bare = stream_estimate(tiny_llama.n_layers, tiny_llama.n_heads, 4096, 1, 2).bytes
    assert plan.memory.bytes > bare
    assert plan.seconds == planner.calibrate(tiny_llama).stream(4096)
    assert "time calibrated on this machine" in plan.line
    assert plan_stream(tiny_llama, 4096, 2, timed=False).seconds is None
