"""The catalogue, continued (issue 21): the command line, results folders, saved units, detectors
and calibrations, the dashboard, and a SIGKILL in the middle of each analysis' scan.

Case ids start with their verdict (see tests/catalogue.py for the command that counts them).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from analyses import run
from analyses.cli import main
from analyses.retrieval import RETRIEVAL, RetrievalConfig
from analyses.store import LOCK, FolderInUseError, FolderLockedError, writer
from analyses.units import UnitStore
from probe.atomic import read_tensors
from probe.errors import InputError, ModelMismatchError

from catalogue import Case, cases, resave, tag, umask

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_model(monkeypatch):
    """Refusals must come before the model loads: loading one fails the test."""
    import analyses.cli as cli

    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model was loaded before the input was checked"))


def _err(capsys) -> str:
    return capsys.readouterr().err


# ============================================================================= 3. the command line, before any work

S = ["--model", "tiny-llama"]
CLI_CASES = cases(
    Case("typed-error", "cli-out-empty", ["scan", "retrieval", *S, "--out", ""], None, "--out is empty: name a results folder"),
    Case("typed-error", "cli-out-is-a-file", ["scan", "retrieval", *S, "--out", "{tmp}/file"], None,
         "is a file, not a folder"),
    Case("typed-error", "cli-out-unwritable", ["scan", "retrieval", *S, "--out", "/proc/headwise/x"], None,
         "cannot write in /proc.*choose a folder you can write"),
    Case("typed-error", "cli-limit-negative", ["scan", "grounding", *S, "--out", "{tmp}/o", "--limit", "-1"], None,
         "limit must be >= 1, got -1 \\(flag --limit\\): use 1 or more"),
    Case("typed-error", "cli-n-prompts-negative", ["scan", "similarity", *S, "--out", "{tmp}/o", "--n-prompts", "-1"],
         None, "n_prompts must be >= 1, got -1 \\(flag --n-prompts\\)"),
    Case("typed-error", "cli-lengths-empty", ["scan", "retrieval", *S, "--out", "{tmp}/o", "--lengths", ""], None,
         "--lengths: cannot read '' \\(an empty list\\)"),
    Case("typed-error", "cli-int-not-truncated", ["scan", "retrieval", *S, "--out", "{tmp}/o", "--k", "200.9"], None,
         "--k: cannot read '200.9' \\(not a whole number; integers are never rounded\\)"),
    Case("typed-error", "cli-k-zero", ["scan", "retrieval", *S, "--out", "{tmp}/o", "--k", "0"], None,
         "k must be >= 1, got 0 \\(flag --k\\)"),
    Case("typed-error", "cli-float-nan", ["scan", "grounding", *S, "--out", "{tmp}/o", "--alpha", "nan"], None,
         "alpha must be a finite number, got nan \\(flag --alpha\\)"),
    Case("typed-error", "cli-float-inf", ["scan", "similarity", *S, "--out", "{tmp}/o", "--budget", "inf"], None,
         "budget must be a finite number"),
    Case("typed-error", "cli-probability-above-1", ["scan", "retrieval", *S, "--out", "{tmp}/o", "--threshold", "1.5"],
         None, "threshold must be <= 1, got 1.5 \\(flag --threshold\\): use at most 1"),
    Case("typed-error", "cli-seed-negative", ["scan", "circuits", *S, "--out", "{tmp}/o", "--seed", "-1"], None,
         "seed must be >= 0"),
    Case("typed-error", "cli-seeds-list-negative", ["scan", "retrieval", *S, "--out", "{tmp}/o", "--seeds", "0,-2"],
         None, "seeds must be >= 0, got -2"),
    Case("typed-error", "cli-unknown-choice", ["scan", "grounding", *S, "--out", "{tmp}/o", "--reading", "both"], None,
         "--reading: cannot read 'both' \\(not one of \\['code', 'paper'\\]\\)"),
    Case("typed-error", "cli-cells-missing-part", ["scan", "retrieval", *S, "--out", "{tmp}/o", "--cells", "code:200"],
         None, "--cells: cannot read 'code:200' \\('code:200' has 2 parts, not 3\\)"),
    Case("typed-error", "cli-unknown-variant", ["scan", "similarity", *S, "--out", "{tmp}/o", "--variants", "same,odd"],
         None, "unknown variants \\['odd'\\] \\(flag --variants\\)"),
    Case("typed-error", "cli-act-beta-zero", ["scan", "sinks", *S, "--out", "{tmp}/o", "--beta", "0"], None,
         "beta must be greater than 0.*\\(flag --beta\\)"),
    Case("typed-error", "cli-stats-file-not-utf8", ["stats", "--file", "{tmp}/latin1.txt", *S, "--out", "{tmp}/s.safetensors"],
         None, "--file '.*latin1.txt' is not UTF-8 text \\(byte 0xe9 at offset 3.*iconv"),
    Case("typed-error", "cli-stats-file-missing", ["stats", "--file", "{tmp}/none.txt", *S, "--out", "{tmp}/s.safetensors"],
         None, "--file '.*none.txt': no such file"),
    Case("typed-error", "cli-stats-out-suffix", ["stats", "--text", "hi", *S, "--out", "{tmp}/s.json"], None,
         "--out '.*s.json' must end in .safetensors"),
    Case("typed-error", "cli-capture-out-is-a-folder", ["capture", "--text", "hi", *S, "--out", "{tmp}"], None,
         "is a folder: name a file ending in .safetensors"),
    Case("typed-error", "cli-generate-empty-prompt", ["generate", "  ", *S], None, "the prompt is empty"),
    Case("typed-error", "cli-generate-html-without-detector", ["generate", "hi", *S, "--html", "{tmp}/v.html"], None,
         "--html colours tokens by a detector"),
    Case("typed-error", "cli-generate-out-is-a-folder", ["generate", "hi", *S, "--out", "{tmp}"], None, "is a folder"),
    Case("typed-error", "cli-generate-detector-missing", ["generate", "hi", *S, "--guided", "{tmp}/none.json"], None,
         "not found: .*none.json"),
    Case("typed-error", "cli-dashboard-results-is-a-file", ["dashboard", "--results", "{tmp}/file"], None,
         "--results '.*file' is a file"),
)


@CLI_CASES
def test_cli_refuses_bad_values_before_any_work(case, tmp_path, no_model, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.arg]
    assert main(argv) == 2
    err = _err(capsys)
    assert err.startswith("headwise: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    import re

    assert re.search(case.match, err), err
    assert not (tmp_path / "o").exists()                  # nothing written


ARGPARSE_CASES = cases(
    Case("typed-error", "cli-threads-zero", ["scan", "retrieval", *S, "--out", "o", "--threads", "0"], None,
         "--threads: expected a whole number >= 1, got 0"),
    Case("typed-error", "cli-max-new-tokens-negative", ["generate", "hi", "--max-new-tokens", "-3"], None,
         "--max-new-tokens: expected a whole number >= 1, got -3"),
    Case("typed-error", "cli-candidates-fraction", ["generate", "hi", "--candidates", "2.5"], None,
         "--candidates: expected a whole number >= 1, got '2.5'"),
    Case("typed-error", "cli-port-out-of-range", ["dashboard", "--port", "70000"], None, "at most 65535"),
    Case("typed-error", "cli-capture-budget-nan", ["capture", "--text", "x", "--out", "r.safetensors", "--budget-gb", "nan"],
         None, "--budget-gb: expected a finite number of GiB > 0"),
    Case("typed-error", "cli-capture-layers-negative", ["capture", "--text", "x", "--out", "r.safetensors",
                                                         "--layers", "-1"], None, "integers >= 0"),
)


@ARGPARSE_CASES
def test_cli_flag_types_refuse_bad_numbers(case, no_model, capsys):
    assert main(case.arg) == 2 and case.match in _err(capsys)


@tag("typed-error", "cli-capture-over-budget-names-real-commands")
def test_capture_refusal_names_headwise_stats_and_a_real_flag(case, tmp_path, capsys):
    out = str(tmp_path / "r.safetensors")
    assert main(["capture", "--text", "a b c d e f", *S, "--out", out, "--budget-gb", "1e-9"]) == 2
    err = _err(capsys)
    assert "`headwise stats`" in err and "--budget-gb" in err and "probe.stream_stats:" in err
    assert main(["capture", "--text", "a b c d e f", *S, "--out", out, "--budget-gb", "1"]) == 0   # the flag works
    assert Path(out).exists()


@tag("handled", "cli-oserror-is-one-line")
def test_late_oserror_is_one_line_and_debug_shows_the_traceback(case, tmp_path, monkeypatch, capsys):
    import analyses.runner

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "o" / "summary.json"))

    monkeypatch.setattr(analyses.runner, "run", denied)
    argv = ["scan", "retrieval", *S, "--out", str(tmp_path / "o"), "--cells", "code:200:50", "--no-mask"]
    assert main(argv) == 2
    lines = [line for line in _err(capsys).splitlines() if line.startswith("headwise: error")]
    assert lines == [f"headwise: error: Permission denied: {tmp_path / 'o' / 'summary.json'}: check the path and its "
                     "permissions"]
    with pytest.raises(PermissionError):
        main(argv + ["--debug"])


@tag("handled", "cli-unexpected-error-is-one-line")
def test_unexpected_error_is_one_line_naming_debug(case, tmp_path, monkeypatch, capsys):
    import analyses.runner

    monkeypatch.setattr(analyses.runner, "run", lambda *a, **k: {}["missing"])
    argv = ["scan", "retrieval", *S, "--out", str(tmp_path / "o"), "--cells", "code:200:50"]
    assert main(argv) == 1
    err = _err(capsys)
    assert "unexpected KeyError" in err and "--debug" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("headwise: error")]) == 1
    with pytest.raises(KeyError):
        main(["--debug", *argv])


# ============================================================================= 1. results folders: one writer, one run

CFG = RetrievalConfig(cells=(("code", 200, 50.0), ("code", 200, 0.0)), k=2, seeds=(0,), max_new_tokens=2, mask=False)


@tag("typed-error", "two-writers-second-refused")
def test_second_writer_is_refused_with_the_holders_pid_and_command(case, tmp_path, capsys):
    """A real second process holds the folder; a scan into it is refused at once, before any work."""
    code = ("import sys, time; from analyses.store import writer\n"
            "with writer(sys.argv[1], 'headwise scan retrieval --out busy'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["scan", "retrieval", *S, "--out", str(tmp_path), "--cells", "code:200:50"]) == 2
        err = _err(capsys)
        assert f"is being written by process {holder.pid} (headwise scan retrieval --out busy" in err
        assert "use another --out" in err and not (tmp_path / "units").exists()
    finally:
        holder.kill()
        holder.wait()
    with writer(tmp_path):                               # its death released the lock (flock): taken over
        with pytest.raises(FolderLockedError, match=f"process {os.getpid()}"):
            with writer(tmp_path):
                pass
    assert "taking over the lock of process" in _err(capsys)


@tag("handled", "stale-lock-of-dead-process-taken-over")
def test_stale_lock_file_is_taken_over_with_a_notice(case, tmp_path, tiny_llama, capsys):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 999999, "command": "headwise scan retrieval", "since": "then"}))
    run(RETRIEVAL, tiny_llama, CFG, store=tmp_path, progress=False)
    assert "taking over the lock of process 999999 (headwise scan retrieval)" in _err(capsys)
    assert (tmp_path / LOCK).read_text() == ""                # released cleanly


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("first")
    res = run(RETRIEVAL, tiny_llama, CFG, store=folder, progress=False)
    return folder, res


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


FOLDER_CASES = cases(
    Case("typed-error", "folder-other-settings-refused", dict(k=1), FolderInUseError,
         "holds a retrieval result made with other settings \\(k: 2 there, 1 now\\): use another --out, or --force"),
    Case("typed-error", "folder-other-model-refused", dict(model="tiny-gpt2"), FolderInUseError,
         "another model \\(tiny-llama weights .* there, tiny-gpt2 weights .* now\\)"),
    Case("typed-error", "folder-other-analysis-refused", dict(analysis="similarity"), FolderInUseError,
         "another analysis \\('retrieval' there, 'similarity' now\\)"),
)


@FOLDER_CASES
def test_another_run_never_overwrites_a_folder(case, first_run, tmp_path, tiny_llama, tiny_gpt2):
    from analyses import registry

    folder = _copy(first_run[0], tmp_path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK}
    model = tiny_gpt2 if case.arg.get("model") else tiny_llama
    analysis = registry.get(case.arg.get("analysis", "retrieval"))
    cfg = replace(CFG, k=case.arg["k"]) if "k" in case.arg else \
        (CFG if analysis is RETRIEVAL else analysis.config.small(model))
    with pytest.raises(case.error, match=case.match):
        run(analysis, model, cfg, store=folder, progress=False)
    assert {p: p.read_bytes() for p in before} == before           # nothing of the first run changed


@tag("handled", "folder-force-replaces-reusing-units")
def test_force_replaces_the_result_and_reuses_matching_units(case, first_run, tmp_path, tiny_llama, capsys):
    folder = _copy(first_run[0], tmp_path)
    units = {p: p.stat().st_mtime_ns for p in (folder / "units" / "samples").iterdir()}
    run(RETRIEVAL, tiny_llama, replace(CFG, k=1), store=folder, progress=False, force=True)
    assert {p: p.stat().st_mtime_ns for p in units} == units and "resumed 2 of 2" in _err(capsys)
    assert json.loads((folder / "run.json").read_text())["settings"]["k"] == 1


@tag("typed-error", "folder-of-other-files-refused")
def test_a_folder_of_other_files_is_never_written(case, tmp_path, tiny_llama):
    (tmp_path / "thesis.tex").write_text("my work")
    with pytest.raises(FolderInUseError, match="is not a headwise results folder \\(it holds \\['thesis.tex'\\]\\)"):
        run(RETRIEVAL, tiny_llama, CFG, store=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


@tag("typed-error", "folder-garbled-run-stamp")
def test_a_garbled_run_stamp_is_refused(case, first_run, tmp_path, tiny_llama):
    folder = _copy(first_run[0], tmp_path)
    (folder / "run.json").write_text("{oops")
    with pytest.raises(FolderInUseError, match="run stamp .* is corrupt.*--force"):
        run(RETRIEVAL, tiny_llama, CFG, store=folder, progress=False)
    run(RETRIEVAL, tiny_llama, CFG, store=folder, progress=False, force=True)


@tag("typed-error", "api-store-empty-path")
def test_python_api_refuses_an_empty_store_path(case, tiny_llama):
    with pytest.raises(InputError, match="--out is empty"):
        run(RETRIEVAL, tiny_llama, CFG, store="", progress=False)


@tag("handled", "scan-files-group-readable")
def test_scan_outputs_follow_the_umask(case, tmp_path, tiny_llama):
    with umask(0o002):
        run(RETRIEVAL, tiny_llama, CFG, store=tmp_path / "o", progress=False)
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file() and p.name != LOCK]
    assert files and all(p.stat().st_mode & 0o777 == 0o664 for p in files), [oct(p.stat().st_mode) for p in files]
    assert not [p for p in (tmp_path / "o").rglob("*") if p.name.endswith(".tmp")]


# ============================================================================= 1-2. damaged units are recomputed

def _unit(folder: Path, stage: str = "samples") -> Path:
    return sorted((folder / "units" / stage).iterdir())[0]


def _events(index, value):
    def edit(t):
        t["events"] = t["events"].clone()
        t["events"][index] = value
    return edit


def _unit_edit(sign: bool = True, **edits):
    """Rewrite a unit file: re-signed (only the edit is wrong) or not (its stored sha256 kept)."""
    return lambda p: resave(p, "headwise.unit", sign=sign, **edits)


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-40])


_bitflip = _unit_edit(sign=False, tensors=_events((0, 0), 0.75))
_response = _unit_edit(sign=False, meta=lambda m: m["payload"].__setitem__("response", "4817"))
_events_big = _unit_edit(tensors=_events((1, 2), 333334.0))
_events_nan = _unit_edit(tensors=_events((0, 1), math.nan))
_events_shape = _unit_edit(tensors=lambda t: t.__setitem__("events", t["events"][:1].clone()))
_recall = _unit_edit(meta=lambda m: m["payload"].__setitem__("recall", 7.0))
_version = _unit_edit(meta=lambda m: m.__setitem__("version", 1))
_not_unit = _unit_edit(meta=lambda m: m.__setitem__("format", "headwise.other"))


UNIT_CASES = cases(
    Case("recomputed", "unit-truncated", _truncate, None, "not a readable headwise.unit file"),
    Case("recomputed", "unit-tensor-bitflip", _bitflip, None, "changed after it was written"),
    Case("recomputed", "unit-edited-payload", _response, None, "changed after it was written"),
    Case("recomputed", "unit-value-out-of-range", _events_big, None, "events holds 333334, above 2"),
    Case("recomputed", "unit-value-nan", _events_nan, None, "events holds 1 non-finite"),
    Case("recomputed", "unit-shape-vs-model", _events_shape, None, "events has shape \\(1, 4\\), expected \\(2, 4\\)"),
    Case("recomputed", "unit-recall-above-1", _recall, None, "recall holds 7, above 1"),
    Case("recomputed", "unit-old-format-version", _version, None, "format version 1"),
    Case("recomputed", "unit-foreign-format", _not_unit, None, "not a headwise.unit file"),
)


@UNIT_CASES
def test_damaged_unit_is_recomputed_with_a_warning_naming_it(case, first_run, tmp_path, tiny_llama, capsys):
    import re

    folder = _copy(first_run[0], tmp_path)
    unit = _unit(folder)
    case.arg(unit)
    res = run(RETRIEVAL, tiny_llama, CFG, store=folder, progress=False)
    err = _err(capsys)
    assert re.search(f"warning: the unit samples/{unit.stem} is unreadable or damaged, recomputing it: .*{unit.name}",
                     err), err
    assert re.search(case.match, err), err
    assert np.array_equal(np.asarray(res.scores), np.asarray(first_run[1].scores))          # never used
    assert "resumed 1 of 2" in err
    assert UnitStore(folder).status("samples", unit.stem, json.loads(json.dumps(
        _stamp_of(folder, unit)))) == "ok"                                                     # rewritten whole


def _stamp_of(folder, unit):
    return read_tensors(unit, "headwise.unit")[1]["stamp"]


@tag("recomputed", "unit-json-edited")
def test_edited_json_unit_is_recomputed(case, tmp_path, tiny_llama, capsys):
    from analyses.sinks import SINKS, SinksConfig

    cfg = SinksConfig(limit=4, first_layer=0, last_layer=0, n_random=1, n_profile=1)
    first = run(SINKS, tiny_llama, cfg, store=tmp_path, progress=False)
    unit = tmp_path / "units" / "search" / "layer-000.json"
    unit.write_text(unit.read_text().replace('"accuracy": ', '"accuracy": 1', 1))
    again = run(SINKS, tiny_llama, cfg, store=tmp_path, progress=False)
    err = _err(capsys)
    assert "search/layer-000 is unreadable or damaged" in err and "layer-000.json was changed after it was written" in err
    assert again.search.candidates == first.search.candidates


SIMILARITY = dict(n_prompts=2, n_heldout=1, max_tokens=16, variants=("same",), max_trials=1)


def _similarity_edit(stage: str, key: str, value):
    def edit(folder: Path):
        store = UnitStore(folder)
        unit = sorted(store.folder(stage).iterdir())[0]
        payload = store.get(stage, unit.stem)
        if isinstance(payload[key], np.ndarray):
            payload[key] = payload[key].copy()
            payload[key].flat[0] = value
        else:
            payload[key] = value
        stamp = (read_tensors(unit, "headwise.unit")[1] if unit.suffix == ".safetensors"
                 else json.loads(unit.read_text()))["stamp"]
        store.put(stage, unit.stem, stamp, payload)               # re-signed: only the value is wrong
        return unit.name
    return edit


SIM_CASES = cases(
    Case("recomputed", "similarity-cosine-333334", _similarity_edit("prompts", "head_cos_sum", 333334.0), None,
         "head_cos_sum \\(cosines\\) holds 333334, above 1"),
    Case("recomputed", "similarity-loss-nan", _similarity_edit("echo", "loss", math.nan), None,
         "loss holds 1 non-finite"),
    Case("recomputed", "similarity-loss-negative", _similarity_edit("echo", "loss", -2.0), None, "loss holds -2, below 0"),
)


@SIM_CASES
def test_damaged_similarity_units_never_reach_the_sharing_plan(case, tmp_path, tiny_llama, capsys):
    from analyses.similarity import SIMILARITY as ANALYSIS, SimilarityConfig

    import re

    cfg = SimilarityConfig(**SIMILARITY)
    first = run(ANALYSIS, tiny_llama, cfg, store=tmp_path, progress=False)
    name = case.arg(tmp_path)
    again = run(ANALYSIS, tiny_llama, cfg, store=tmp_path, progress=False)
    err = _err(capsys)
    assert re.search(case.match, err) and name in err, err
    assert again.to_frame().equals(first.to_frame())


@tag("recomputed", "grounding-lookback-ratio-above-1")
def test_damaged_grounding_shard_is_recomputed(case, tmp_path, tiny_llama, capsys):
    from analyses.runner import run_stage
    from analyses.grounding import GROUNDING, GroundingConfig

    cfg = GroundingConfig(limit=4, shard=2)
    items = GROUNDING.stage("items")
    df = run_stage(GROUNDING, items, tiny_llama, cfg, None, UnitStore(tmp_path))["df"]
    store = UnitStore(tmp_path)
    stamp = json.loads((store.folder("items") / "shard-0000.json").read_text())["stamp"]
    payload = store.get("items", "shard-0000")
    i = next(i for i, r in enumerate(payload["rows"]) if r["row_lr"])
    payload["rows"][i]["row_lr"] = [1.5] * len(payload["rows"][i]["row_lr"])
    store.put("items", "shard-0000", stamp, payload)
    again = run_stage(GROUNDING, items, tiny_llama, cfg, None, UnitStore(tmp_path))["df"]
    assert f"rows[{i}].row_lr (lookback ratios) holds 1.5, above 1" in _err(capsys)
    assert again.equals(df)


# ============================================================================= 2. detectors and calibrations of other weights

def _detector(tmp_path, model, **meta) -> Path:
    from analyses.grounding.detector import Detector

    n = model.n_layers * model.n_heads
    det = Detector(np.ones(n), 0.0, np.zeros(n), np.ones(n), model.n_layers, model.n_heads, meta)
    return det.save(tmp_path / "detector.json")


@tag("typed-error", "generate-detector-of-other-weights")
def test_generate_refuses_a_detector_of_other_weights(case, tmp_path, tiny_llama, capsys):
    path = _detector(tmp_path, tiny_llama, model_id="someorg/other", weights_hash="0123456789abcdef")
    assert main(["generate", "The key is 5. The key is", *S, "--guided", str(path)]) == 2
    err = _err(capsys)
    assert "fitted on someorg/other (weights 0123456789abcdef) but the model is tiny-llama (weights " \
           f"{tiny_llama.weights_hash})" in err and "headwise scan grounding --model tiny-llama" in err


@tag("typed-error", "generate-detector-without-model-record")
def test_generate_refuses_a_detector_that_does_not_record_its_model(case, tmp_path, tiny_llama, capsys):
    path = _detector(tmp_path, tiny_llama)
    assert main(["generate", "The key is 5. The key is", *S, "--guided", str(path)]) == 2
    assert "does not record the model it was fitted on" in _err(capsys)


@tag("typed-error", "guided-api-detector-of-other-weights")
def test_guided_decoding_refuses_other_weights_in_python_and_the_dashboard_tool(case, tmp_path, tiny_llama):
    from analyses.grounding import Detector
    from analyses.grounding.mitigate import guided_view

    det = Detector.load(_detector(tmp_path, tiny_llama, model_id="other", weights_hash="feedface"))
    with pytest.raises(ModelMismatchError, match="fitted on other \\(weights feedface\\) but the model is tiny-llama"):
        guided_view(tiny_llama, det, "context\nquestion", max_new_tokens=2)


@tag("typed-error", "detector-nan-coefficients")
def test_detector_with_non_finite_numbers_is_refused(case, tmp_path, tiny_llama):
    from analyses.grounding import Detector
    from probe.errors import CorruptFileError

    path = _detector(tmp_path, tiny_llama, weights_hash=tiny_llama.weights_hash)
    d = json.loads(path.read_text())
    d["coef"][3] = math.nan
    path.write_text(json.dumps(d))
    with pytest.raises(CorruptFileError, match="coef holds invalid values.*headwise scan grounding"):
        Detector.load(path)


@tag("typed-error", "generate-calibration-of-other-weights")
def test_generate_refuses_a_calibration_of_other_weights(case, tmp_path, tiny_llama, tiny_gpt2, capsys):
    from analyses.sinks import Calibration

    calib = Calibration.from_heads(tiny_gpt2, ["L1H0"], beta=0.4)
    path = calib.save(tmp_path / "calib.json")
    assert main(["generate", "hello", *S, "--calibration", str(path)]) == 2
    err = _err(capsys)
    assert f"made for tiny-gpt2 (weights {tiny_gpt2.weights_hash}) but the model is tiny-llama" in err


# ============================================================================= 4. the dashboard

@tag("handled", "dashboard-error-details-off")
def test_dashboard_hides_error_details(case, monkeypatch):
    import tomllib

    import analyses.cli as cli

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"
    seen = {}
    monkeypatch.setattr(cli, "serve", lambda cmd, env: seen.setdefault("cmd", cmd) and 0)
    main(["dashboard", "--port", "8600"])
    i = seen["cmd"].index("--client.showErrorDetails")
    assert seen["cmd"][i + 1] == "none"


PAGE_APP = """
from dashboards.errors import run_page
from probe.errors import CorruptFileError


class Page:
    def run(self):
        raise {error}


run_page(Page())
"""


@tag("handled", "dashboard-page-error-is-a-short-message")
def test_a_failing_page_shows_a_message_not_a_traceback(case, capsys):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_string(PAGE_APP.format(error='RuntimeError("boom in /work/internal/secret.py")')).run()
    assert not at.exception and len(at.error) == 1
    assert "Unexpected RuntimeError" in at.error[0].value and "/work/internal" not in at.error[0].value
    assert "secret.py" in capsys.readouterr().err                     # the details go to the server's console
    at = AppTest.from_string(PAGE_APP.format(
        error='CorruptFileError("results/x/summary.json is corrupt; delete it and run again to regenerate it")')).run()
    assert not at.exception and at.error[0].value.startswith("results/x/summary.json is corrupt; delete it")


@tag("handled", "dashboard-damaged-results-skipped-good-ones-open")
def test_damaged_result_folders_are_skipped_and_named(case, first_run, tmp_path, monkeypatch):
    import shutil

    from analyses import registry

    root = tmp_path / "results"
    for name in ("good", "garbled", "unknown"):
        shutil.copytree(first_run[0], root / name)
    (root / "garbled" / "summary.json").write_text("{not json")
    (root / "unknown" / "summary.json").write_text('{"format": "headwise.nothing"}')
    skipped = []
    found = registry.find_results(root, skipped=skipped)
    assert [s.path.name for s in found] == ["good"] and found[0].load().model_id == "tiny-llama"
    assert sorted(p.name for p, _ in skipped) == ["garbled", "unknown"]
    assert any("corrupt" in why for _, why in skipped) and any("headwise.nothing" in why for _, why in skipped)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["handled:dashboard-sigterm-stops-server",
                                                                          "handled:dashboard-sigint-stops-server"])
def test_headwise_dashboard_forwards_signals_to_its_server(signum, tmp_path):
    """A real `headwise dashboard`: once its server answers, a signal to the launcher stops both."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HEADWISE_DASHBOARD_MODEL": "tiny-llama"}
    launcher = subprocess.Popen([sys.executable, "-m", "analyses.cli", "dashboard", "--port", str(port),
                                 "--results", str(tmp_path)], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300              # a busy 2-core machine starts streamlit slowly
        while time.time() < deadline:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                assert launcher.poll() is None, "the launcher exited before its server answered"
                time.sleep(0.3)
        else:
            pytest.fail("the dashboard never answered")
        servers = _children(launcher.pid)
        assert servers, "the launcher has no server child"
        launcher.send_signal(signum)
        code = launcher.wait(timeout=60)        # it exits with its server (whose own status it returns)
        assert code in (0, 1, 128 + signum, -signum)
        deadline = time.time() + 10
        while any(_alive(s) for s in servers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(s) for s in servers), "the server outlived its launcher"
    finally:
        for pid in [launcher.pid] + _children(launcher.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        launcher.wait()


# ============================================================================= 1. SIGKILL in the middle of a unit, then resume

KILLED = {   # analysis: (flags of a small scan on tiny-llama, the stage whose first unit triggers the kill)
    "retrieval": (["--cells", "code:200:50,code:200:0,code:220:50,code:220:0", "--k", "2", "--seeds", "0",
                   "--max-new-tokens", "2", "--no-mask"], "samples"),
    "sinks": (["--limit", "10", "--first-layer", "0", "--last-layer", "1", "--n-random", "1", "--n-profile", "4"],
              "profile"),
    "circuits": (["--tasks", "induction,greater_than", "--n", "4", "--ig-steps", "2", "--frac", "0.25",
                  "--n-boot", "10"], "tasks"),
    "similarity": (["--n-prompts", "4", "--n-heldout", "1", "--max-tokens", "24", "--variants", "same",
                    "--max-trials", "1"], "prompts"),
    "grounding": (["--limit", "24", "--shard", "4", "--n-mitigate", "0", "--n-perm", "5"], "items"),
}


def _kill_at_first_unit(proc: subprocess.Popen, folder: Path, stage: str, timeout: float = 400) -> int:
    """SIGKILL ``proc`` as soon as its first ``stage`` unit is on disk (it is then inside the next unit)."""
    units = folder / "units" / stage
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if units.is_dir() and any(not p.name.startswith(".") for p in units.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait()


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every analysis' scan started as a real `python -m analyses.cli scan` at once, each SIGKILLed mid-unit."""
    root = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "analyses.cli", "scan", name, "--model", "tiny-llama",
                                     "--out", str(root / name), *flags], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for name, (flags, _) in KILLED.items()}
    import threading

    codes: dict[str, int] = {}
    threads = [threading.Thread(target=lambda n=n, p=p: codes.__setitem__(n, _kill_at_first_unit(
        p, root / n, KILLED[n][1]))) for n, p in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return root, codes


def _config(name: str):
    from analyses import registry
    from analyses.cli import build_parser
    from analyses.config import from_args

    args = build_parser().parse_args(["scan", name, "--out", "x", *KILLED[name][0]])
    return from_args(registry.get(name).config, args)


@pytest.mark.parametrize("name", list(KILLED), ids=[f"handled:sigkill-mid-unit-{n}" for n in KILLED])
def test_sigkill_mid_unit_then_resume_equals_an_uninterrupted_run(name, killed, tiny_llama, tmp_path, capsys):
    from analyses import registry
    from analyses.runner import run_stage

    root, codes = killed
    folder, stage = root / name, KILLED[name][1]
    assert codes[name] == -signal.SIGKILL, f"{name} ended with {codes[name]} before it was killed"
    assert not (folder / "summary.json").exists()
    assert json.loads((folder / LOCK).read_text())["pid"]               # the dead writer's lock is left behind
    done = sorted(p.name for p in (folder / "units" / stage).iterdir() if not p.name.startswith("."))
    assert done                                                          # finished units are whole files
    analysis, cfg = registry.get(name), _config(name)
    if name == "grounding":   # a random tiny model never answers, so its detector cannot be fit: the items stage
        items = analysis.stage("items")
        with writer(folder):
            resumed = run_stage(analysis, items, tiny_llama, cfg, None, UnitStore(folder))["df"]
        full = run_stage(analysis, items, tiny_llama, cfg, None, None)["df"]
        assert resumed.equals(full)
    else:
        resumed = run(analysis, tiny_llama, cfg, store=folder, progress=False)
        full = run(analysis, tiny_llama, cfg, progress=False)
        import pandas as pd

        pd.testing.assert_frame_equal(resumed.to_frame(), full.to_frame())
        assert resumed.summary().keys() == full.summary().keys()
        assert [s.text() for s in resumed.summary().values()] == [s.text() for s in full.summary().values()]
    err = _err(capsys)
    assert "taking over the lock of process" in err and f"resumed {len(done)} of" in err, err
    assert not [p for p in folder.rglob(".*.tmp")]                      # an interrupted write's temp file is swept


@tag("handled", "killed-write-temp-files-swept-under-the-lock")
def test_temp_files_of_a_killed_write_are_removed_under_the_lock(case, tmp_path, capsys):
    left = tmp_path / "units" / "samples" / ".cell-0.safetensors.abc123.tmp"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"\0" * 4096)
    with writer(tmp_path):
        assert not left.exists()
    assert "removed 1 temporary file(s) of an interrupted write" in _err(capsys)


@tag("typed-error", "cli-similarity-prompts-file-not-utf8")
def test_a_prompt_file_that_is_not_utf8_is_named(case, tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("Un caf\xe9 noir.\n\nEncore un.".encode("latin-1"))
    assert main(["scan", "similarity", *S, "--out", str(tmp_path / "o"), "--prompts", str(bad)]) == 2
    assert f"text file '{bad}' is not UTF-8 text (byte 0xe9 at offset 6" in _err(capsys)


@tag("recomputed", "units-of-another-model-with-force")
def test_units_of_another_model_are_recomputed_never_reused(case, first_run, tmp_path, tiny_gpt2, capsys):
    folder = _copy(first_run[0], tmp_path)
    run(RETRIEVAL, tiny_gpt2, CFG, store=folder, progress=False, force=True)
    err = _err(capsys)
    assert "samples: recomputing 2 unit(s) made with other weights or settings" in err and "stale: model" in err
    assert "resumed" not in err and json.loads((folder / "run.json").read_text())["model_id"] == "tiny-gpt2"
