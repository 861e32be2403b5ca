"""Terminal output of long commands: one line per finished step in a log, a layer bar on `stats`, no
library warnings, a line when units are resumed, and `generate` saying when a calibration keeps no heads."""
import io
import re


from analyses.terminal import LineBar, bar, layer_bar


def test_a_log_gets_one_line_per_finished_step_with_the_resumed_count():
    out = io.StringIO()
    b = bar(5, "retrieval: scan", initial=2, file=out)               # a StringIO is not a terminal
    assert isinstance(b, LineBar)
    for _ in range(3):
        b.update(1)
    b.close()
    b.close()                                                         # closing twice prints once
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()
    assert re.fullmatch(r"retrieval: scan: 5/5 units \(2 resumed\) in 0:0\d\n", out.getvalue())


def test_layer_bar_counts_every_layer_of_one_pass_and_leaves_no_hook(tiny_llama):
    from probe import stream_stats
    from probe.families import blocks

    out = io.StringIO()
    with layer_bar(tiny_llama, "stats", file=out) as b:
        st = stream_stats(tiny_llama, "the cat sat on the mat", verbose=False)
        assert b.n == tiny_llama.n_layers - 1          # the last layer counts once the pass has returned
    assert out.getvalue() == f"stats: {tiny_llama.n_layers}/{tiny_llama.n_layers} layers in 0:00\n"
    assert all(not m._forward_pre_hooks for m in blocks(tiny_llama.hf))
    assert st.entropy.shape[0] == tiny_llama.n_layers


def test_stats_and_a_rerun_scan_report_in_the_terminal(tmp_path, capsys):
    from analyses.cli import main

    assert main(["stats", "--model", "tiny-llama", "--text", "a b c d e f", "--out", str(tmp_path / "s.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "stats: 2/2 layers" in err
    args = ["scan", "similarity", "--model", "tiny-llama", "--n-prompts", "2", "--n-heldout", "1", "--max-tokens", "16",
            "--variants", "same", "--max-trials", "1", "--out", str(tmp_path / "sim")]
    assert main(args) == 0
    first = capsys.readouterr().err
    assert "similarity: prompts: 2/2 units in" in first and "\r" not in first
    assert "Token indices sequence length" not in first and "Warning" not in first     # no library warnings
    assert main(args) == 0
    again = capsys.readouterr().err
    assert "similarity/prompts: resumed 2 of 2 unit(s)" in again and "2/2 units (2 resumed)" in again


def test_generate_warns_when_a_calibration_keeps_no_heads(tiny_llama, tmp_path, capsys):
    from analyses.cli import main
    from analyses.sinks import Calibration

    empty = Calibration.from_heads(tiny_llama, [], task="sentiment").save(tmp_path / "calib.json")
    assert main(["generate", "--model", "tiny-llama", "--calibration", str(empty), "--max-new-tokens", "2", "ab"]) == 0
    err = capsys.readouterr().err
    assert "keeps no heads" in err and "--selection gold_logprob" in err
    full = Calibration.from_heads(tiny_llama, ["L1H0"], task="sentiment").save(tmp_path / "full.json")
    assert main(["generate", "--model", "tiny-llama", "--calibration", str(full), "--max-new-tokens", "2", "ab"]) == 0
    assert "keeps no heads" not in capsys.readouterr().err
