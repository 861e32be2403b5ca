"""The planner: a time model calibrated on the machine, and the estimate stream_stats announces."""
from pytest import approx

from probe import planner
from probe.memory import activation_bytes, stream_estimate
from probe.streaming import plan_stream


def test_the_time_model_is_linear_plus_quadratic_per_layer():
    tm = planner.TimeModel(linear=1e-3, attention=1e-7, stats=2e-7, n_layers=4)
    assert tm.plain(1000) == approx(1e-3 * 1000 + 4 * 1e-7 * 1000 ** 2)
    assert tm.stream(2000) - tm.plain(2000) == approx(4 * 2e-7 * 2000 ** 2)


def test_per_row_costs_add_linearly_per_layer():
    tm = planner.TimeModel(linear=1e-3, attention=1e-7, stats=2e-7, n_layers=4, attention_rows=1e-5, stats_rows=3e-5)
    assert tm.plain(1000) == approx(1e-3 * 1000 + 4 * (1e-5 * 1000 + 1e-7 * 1000 ** 2))
    assert tm.stream(2000) - tm.plain(2000) == approx(4 * (3e-5 * 2000 + 2e-7 * 2000 ** 2))


def test_the_pass_output_mode_has_its_own_statistics_cost():
    tm = planner.TimeModel(linear=1e-3, attention=1e-7, stats=2e-7, n_layers=4, pass_stats=5e-8, pass_stats_rows=1e-6)
    assert tm.stream(2000, "pass") - tm.plain(2000) == approx(4 * (1e-6 * 2000 + 5e-8 * 2000 ** 2))
    assert tm.stream(2000, "model") == tm.stream(2000)
    old = planner.TimeModel(linear=1e-3, attention=1e-7, stats=2e-7, n_layers=4)   # not calibrated: the default's
    assert old.stream(2000, "pass") == old.stream(2000)


def test_the_fit_through_two_sizes_recovers_both_costs_and_never_goes_negative():
    rows, square = 4e-6, 3e-9
    t = lambda n: rows * n + square * n ** 2  # noqa: E731
    assert planner.fit_rows_and_squares(t(512), t(2048), 512, 2048) == (approx(rows), approx(square))
    # extrapolating t/T^2 from the small size over-predicts a long input by the per-row share; the fit does not
    one_size = t(512) / 512 ** 2 * 8192 ** 2
    assert one_size > 1.5 * t(8192)
    assert planner.fit_rows_and_squares(1.0, 0.5, 512, 2048) == (0.0, 0.5 / 2048 ** 2)   # noise: slope < 0
    assert planner.fit_rows_and_squares(0.001, 4.0, 512, 2048) == (0.0, 4.0 / 2048 ** 2)  # intercept < 0


def test_calibration_measures_this_machine_once_per_process(tiny_llama):
    tm = planner.calibrate(tiny_llama)
    assert tm.linear > 0 and tm.attention > 0 and tm.stats > 0 and tm.n_layers == tiny_llama.n_layers
    assert planner.calibrate(tiny_llama) is tm                     # cached: no second measurement
    assert tm.stream(4096) > tm.plain(4096) > tm.plain(2048)
    assert tm.pass_stats is None                                   # the pass mode is timed only when asked
    tp = planner.calibrate_pass(tiny_llama)
    assert tp.pass_stats is not None and tp.stream(4096, "pass") >= tp.plain(4096) and tp.linear == tm.linear
    assert planner.calibrate_pass(tiny_llama) is tp
    assert plan_stream(tiny_llama, 4096, 2, output="pass").seconds == tp.stream(4096, "pass")


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
