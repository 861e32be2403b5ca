"""Models split by accelerate (issue 17 item 1): layers on the CPU and on disk give the single-device numbers.

The offloaded ``tiny-llama`` keeps layer 1 and the unembedding on disk (accelerate pages them in for each
forward); capture, streaming statistics, interventions, ACT calibration at inference, ``families.record``
reruns and every analysis must equal the plain model's, bit for bit where the same kernels run.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from probe.errors import InputError, UnsupportedModelError

DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}
TEXT = "The cat sat on the mat; the dog, by the door."


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    from probe import load_model

    return load_model("tiny-llama", device_map=DISK_MAP, offload_folder=str(tmp_path_factory.mktemp("offload")))


def test_the_split_is_real_and_the_weights_hash_is_the_plain_one(offloaded, tiny_llama):
    assert offloaded.device_map == DISK_MAP and offloaded.device == torch.device("cpu")
    from probe import families

    on_disk = list(families.block(offloaded, 1).parameters())
    assert {p.device.type for p in on_disk} == {"meta"}   # not in memory: accelerate's hook pages them in per forward
    assert {p.device.type for p in families.block(offloaded, 0).parameters()} == {"cpu"}
    assert offloaded.weights_hash == tiny_llama.weights_hash
    assert tiny_llama.device_map is None


def test_capture_equals_single_device(offloaded, tiny_llama):
    from probe import capture

    rec = capture(offloaded, TEXT)
    assert rec.meta["source"] == "observer.on_probs" and "device map" in rec.meta["bridge_refused"]
    assert torch.equal(rec.patterns, capture(tiny_llama, TEXT, source="observer").patterns)
    assert torch.allclose(rec.patterns, capture(tiny_llama, TEXT).patterns, atol=1e-6)   # the bridge, same weights
    with pytest.raises(UnsupportedModelError, match="one device"):
        capture(offloaded, TEXT, source="bridge")


def test_streaming_statistics_equal_single_device(offloaded, tiny_llama):
    from probe import KeyGroup, generate_with_stats, stream_stats

    groups = [KeyGroup("first", 0, 1), KeyGroup("cat", 4, 7)]
    a, b = stream_stats(tiny_llama, TEXT, groups=groups), stream_stats(offloaded, TEXT, groups=groups)
    for name in ("entropy", "max_prob", "argmax", "group_mass", "received_sum", "received_count", "sink_mass"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    ga = generate_with_stats(tiny_llama, TEXT, max_new_tokens=4, groups=groups, stats_in_prefill="last")
    gb = generate_with_stats(offloaded, TEXT, max_new_tokens=4, groups=groups, stats_in_prefill="last")
    assert torch.equal(ga.new_ids, gb.new_ids) and torch.equal(ga.stats.entropy, gb.stats.entropy)
    assert gb.stats.entropy.device.type == "cpu"


def test_interventions_and_calibration_equal_single_device(offloaded, tiny_llama):
    from probe import InterventionSpec, MeanAblate, PatternEcho, SinkCalibration, ZeroAblate, apply, intervene

    spec = InterventionSpec([ZeroAblate(heads=["L1H1"]), SinkCalibration(heads=["L1H2"], beta=0.4),
                             PatternEcho(heads=["L1H0"], source="L0H3"), MeanAblate(heads=["L0H2"], values=[torch.full((16,), 0.1)])])
    ids = tiny_llama.encode(TEXT)
    with torch.no_grad():
        plain = offloaded.hf(ids).logits
        with intervene(tiny_llama, spec):
            want = tiny_llama.hf(ids).logits
        with intervene(offloaded, spec):
            got = offloaded.hf(ids).logits
    assert torch.equal(want, got) and not torch.equal(got, plain)
    handles = [apply(m, InterventionSpec([SinkCalibration(heads=["L0H0", "L1H3"], beta=0.3)]))
               for m in (tiny_llama, offloaded)]
    try:
        outs = [m.hf.generate(ids, max_new_tokens=5, do_sample=False) for m in (tiny_llama, offloaded)]
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(*outs)


def test_run_from_a_layer_across_devices(offloaded, tiny_llama):
    from probe import families

    ids = tiny_llama.encode(TEXT)
    a, b = families.record(tiny_llama, ids, start=1), families.record(offloaded, ids, start=1)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.run(1), b.run(1))
    assert torch.equal(a.run(1, a.inputs[1] * 0.5), b.run(1, b.inputs[1] * 0.5))


def _configs(tmp_path):
    from analyses.circuits import CircuitsConfig
    from analyses.grounding import GroundingConfig
    from analyses.retrieval import RetrievalConfig
    from analyses.similarity import SimilarityConfig
    from analyses.sinks import SinksConfig
    from probe import SinkCalibration

    for i, t in enumerate(["The cat sat on the mat, and then it slept.", "A dog ran in the park."]):
        (tmp_path / f"texts{i}.txt").write_text(t)
    return {
        "retrieval": RetrievalConfig(cells=(("code", 200, 50.0),), mask_cells=(("code", 200, 50.0),), k=2, seeds=(0,),
                                     max_new_tokens=3),
        "sinks": SinksConfig(limit=4, first_layer=1, last_layer=1, n_random=0, n_profile=1,
                             act=SinkCalibration(rule="alpha", alpha=2.0)),
        "circuits": CircuitsConfig(tasks=("induction",), n=2, ig_steps=1, frac=0.25, n_boot=5),
        "similarity": SimilarityConfig(prompts=str(tmp_path / "texts0.txt"), heldout=str(tmp_path / "texts1.txt"),
                                       variants=("same",), max_trials=1, max_tokens=24, window=8),
        "grounding": GroundingConfig(limit=1, max_new_tokens=3),
    }


@pytest.mark.parametrize("name", ["retrieval", "sinks", "circuits", "similarity", "grounding"])
def test_every_analysis_equals_single_device(offloaded, tiny_llama, name, tmp_path):
    from analyses import registry
    from analyses.runner import run_stage

    analysis, cfg = registry.get(name), _configs(tmp_path)[name]
    stages = analysis.stages if name != "grounding" else analysis.stages[:1]   # grounding: its items (no detector on 1)
    states = []
    for m in (tiny_llama, offloaded):
        state = None
        for stage in stages:
            state = run_stage(analysis, stage, m, cfg, state)
        states.append(state)
    a, b = states
    if hasattr(a, "to_frame"):
        pd.testing.assert_frame_equal(a.to_frame(), b.to_frame(), check_exact=False, rtol=0, atol=1e-6)
    else:
        pd.testing.assert_frame_equal(a["df"], b["df"], check_exact=False, rtol=0, atol=1e-6)
        assert len(a["df"]) == 1 and np.isfinite(np.asarray(a["df"].iloc[0].row_lr)).all()


def test_auto_map_with_a_memory_cap_offloads_and_matches(tmp_path, tiny_llama):
    from probe import load_model, stream_stats

    m = load_model("tiny-llama", device_map="auto", max_memory={"cpu": "300KB"}, offload_folder=str(tmp_path))
    assert "disk" in m.device_map.values() and "cpu" in m.device_map.values()
    assert m.weights_hash == tiny_llama.weights_hash
    assert torch.equal(stream_stats(m, TEXT).entropy, stream_stats(tiny_llama, TEXT).entropy)


def test_each_load_offloads_into_its_own_folder_and_cleans_up(tmp_path):
    import gc

    from probe import load_model

    a = load_model("tiny-llama", device_map=DISK_MAP, offload_folder=str(tmp_path))
    b = load_model("tiny-gpt2", device_map={"transformer": "cpu", "lm_head": "disk"}, offload_folder=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2          # accelerate would reuse another model's index.json
    ids = a.encode("abc")
    assert a.hf(ids).logits.shape[-1] == b.hf(ids).logits.shape[-1] == 259
    del a, b
    gc.collect()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="all on disk"):
        load_model("tiny-llama", device_map="auto", max_memory={"cpu": "10KB"}, offload_folder=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(device_map={"model.layers.1": "disk"}), "offload_folder"),
    (dict(device_map="everywhere"), "unknown device_map"),
    (dict(device_map={"model.nothing": "cpu", "": "cpu"}), "does not have"),
    (dict(device_map={"model.layers": "cpu"}), "without a device"),
    (dict(device_map={"lm_head": "gpu7", "": "cpu"}), "unknown device"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), "not a size"),
    (dict(max_memory={"cpu": "1GiB"}), "give device_map"),
    (dict(device="cpu", device_map="auto"), "not both"),
])
def test_bad_placements_are_refused_before_loading(kwargs, match):
    from probe import load_model

    with pytest.raises(InputError, match=match):
        load_model("tiny-llama", **kwargs)


def test_cli_parses_device_options(tmp_path):
    from probe.models.placement import parse_device_map, parse_max_memory

    assert parse_max_memory("0=20GiB, cpu=64GiB") == {"0": "20GiB", "cpu": "64GiB"}
    with pytest.raises(InputError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")
    f = tmp_path / "map.json"
    f.write_text('{"model.layers.1": "disk", "": "cpu"}')
    assert parse_device_map(str(f)) == {"model.layers.1": "disk", "": "cpu"}
    assert parse_device_map("auto") == "auto" and parse_device_map('{"": 0}') == {"": 0}
    with pytest.raises(InputError, match="JSON"):
        parse_device_map("{nope")


def test_the_memory_plan_counts_each_device_of_the_split(offloaded, tiny_llama):
    from probe.memory import stream_estimate
    from probe.models.placement import execution_device, memory_plan, paged_bytes
    from probe.streaming import _split_note

    from probe import families

    blocks = families.blocks(offloaded)
    layer1 = sum(p.numel() * p.element_size() for p in families.block(tiny_llama, 1).parameters())
    assert [execution_device(b) for b in blocks] == ["cpu", "cpu"]          # no GPU: disk layers run on the CPU
    assert (paged_bytes(blocks[0]), paged_bytes(blocks[1])) == (0, layer1)  # layer 1 is paged in from disk
    est = stream_estimate(2, 4, 4096, 512)
    assert memory_plan(offloaded.hf, est.work, est.bytes - est.work) == {"cpu": est.bytes + layer1}
    assert memory_plan(tiny_llama.hf, est.work, est.bytes - est.work) == {"cpu": est.bytes}
    assert _split_note(tiny_llama, est) == "" and _split_note(offloaded, est).startswith("; split: cpu ~")


def test_every_command_takes_the_device_options(tmp_path, capsys):
    import json

    from analyses.cli import main
    from probe import HeadStats

    base = ["stats", "--model", "tiny-llama", "--text", TEXT, "--threads", "1"]
    assert main(base + ["--out", str(tmp_path / "plain.safetensors")]) == 0
    assert main(base + ["--device-map", json.dumps(DISK_MAP), "--offload-folder", str(tmp_path / "off"),
                        "--out", str(tmp_path / "split.safetensors")]) == 0
    a, b = (HeadStats.load(tmp_path / f"{n}.safetensors") for n in ("plain", "split"))
    assert torch.equal(a.entropy, b.entropy) and torch.equal(a.received_sum, b.received_sum)
    capsys.readouterr()
    assert main(base + ["--max-memory", "cpu=1GiB", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "give device_map" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert main(["scan", "retrieval", "--model", "tiny-llama", "--device-map", "{nope", "--out", str(tmp_path / "r")]) == 2
    assert "--device-map" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_embedded_model_loads_split_through_from_pretrained(smol, tmp_path):
    """A folder model is placed by ``from_pretrained(device_map=...)``: weights stream to their devices."""
    from probe import load_model

    m = load_model("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"}, offload_folder=str(tmp_path))
    on_disk = [k for k, v in m.device_map.items() if v == "disk"]
    assert len(on_disk) >= 10 and "cpu" in m.device_map.values() and m.weights_hash == smol.weights_hash
    ids = smol.encode("The quick brown fox jumps over the lazy dog.")
    with torch.no_grad():
        assert torch.equal(smol.hf(ids).logits, m.hf(ids).logits)
