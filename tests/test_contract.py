"""The analysis contract: a throwaway analysis registered here appears in the CLI, the dashboard and the
atlas with no other file edited; the runner, the unit store and the config options; every registered
analysis' saved result keeps the Result protocol."""
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses import registry, run
from analyses.config import Config, build, opt, options, parse
from analyses.contract import Analysis, Result, Stage, Stat, Unit, head_frame
from analyses.layout import Figure, Section, Table, figures
from analyses.plots import head_map
from analyses.runner import Progress
from analyses.units import UnitStore
from probe import HeadId, InputError, stream_stats

APP = str(Path(__file__).resolve().parent.parent / "dashboards" / "app.py")


# ----------------------------------------------------------------------------- a throwaway analysis

@dataclass(frozen=True)
class ToyConfig(Config):
    texts: tuple[str, ...] = opt(("the cat sat", "a dog ran"), "texts to stream")
    scale: float = opt(1.0, "multiplies every score", min=0)


@dataclass(frozen=True, eq=False)
class ToyResult(Result):
    FORMAT = "test.toy"

    model_id: str
    scores: np.ndarray
    n: int = 0
    meta: dict = field(default_factory=dict)

    def head_scores(self):
        return {"max attention": self.scores}

    def to_frame(self):
        return head_frame(self.head_scores())

    def roles(self):
        return {HeadId(0, 0): ["toy head"]}

    def n_samples(self):
        return self.n

    def summary(self):
        return {"mean": Stat("toy mean score", float(self.scores.mean()), n=self.n)}

    def plots(self):
        return {"heads": lambda: head_map(self.scores, "toy scores", "score")}

    def sections(self):
        return [Section("Toy heads", (Figure("heads", selects_head=True), Table("toy table", self.to_frame())))]

    def save(self, folder):
        return self.write_summary(folder, {"scores": self.scores.tolist(), "n": self.n})

    @classmethod
    def load(cls, folder):
        d = cls.read_summary(folder)
        return cls(d["model_id"], np.asarray(d["scores"]), d["n"])


def _plan(model, cfg, _):
    return [Unit(f"text-{i}", {"text": t}) for i, t in enumerate(cfg.texts)]


def _compute(model, cfg, unit, _):
    return {"max": stream_stats(model, unit.spec["text"], verbose=False).max_prob.mean(-1).numpy()}


def _reduce(model, cfg, payloads, _):
    return ToyResult(model.model_id, cfg.scale * np.mean([p["max"] for p in payloads.values()], axis=0),
                     len(payloads))


TOY = Analysis(name="toy", title="Toy analysis", description="Mean max attention per head.", paper="nobody 2024",
               url="https://example.org", methods="methods.md §0", config=ToyConfig, result=ToyResult,
               stages=(Stage("texts", _plan, _compute, _reduce),), min_samples=2)


def test_a_registered_analysis_appears_in_the_cli_the_dashboard_and_the_atlas(tmp_path, capsys, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from streamlit.util import calc_hash

    from analyses.cli import main

    out = tmp_path / "toy-tiny-llama"
    with registry.registered(TOY):
        assert "toy" in registry.names() and registry.by_format("test.toy") is TOY
        with pytest.raises(SystemExit):
            main(["scan", "toy", "--help"])
        assert "--texts" in (h := capsys.readouterr().out) and "--scale" in h and "--model" in h and "nobody" in h
        assert main(["scan", "toy", "--model", "tiny-llama", "--texts", "one two,three four", "--scale", "2",
                     "--out", str(out)]) == 0
        assert "toy mean score" in capsys.readouterr().out
        saved = registry.find_results(tmp_path)
        assert [s.analysis.name for s in saved] == ["toy"] and saved[0].load().n == 2
        assert main(["scan", "toy", "--model", "tiny-llama", "--scale", "-1", "--out", str(out)]) == 2

        monkeypatch.setenv("HEADWISE_DASHBOARD_MODEL", "tiny-llama")
        monkeypatch.setenv("HEADWISE_RESULTS", str(tmp_path))
        app = AppTest.from_file(APP, default_timeout=60).run()
        assert not app.exception, app.exception
        assert "toy: max attention" in app.selectbox(key="grid_metric").options        # the atlas
        app._page_hash = calc_hash("toy")                                            # the page
        app.run()
        assert not app.exception and [t.value for t in app.title] == ["Toy analysis"]
        assert len(app.get("plotly_chart")) == 1 and any(m.label == "toy mean score" for m in app.metric)
        assert app.number_input(key="toy:config:scale").value == 1.0                # the run form
    assert "toy" not in registry.names()


@pytest.mark.parametrize("name", registry.names())
def test_every_scan_prints_its_help(name, capsys):
    """argparse %-formats help texts: an option help with a bare % (e.g. "top 2%") crashed ``--help``."""
    from analyses.cli import main

    with pytest.raises(SystemExit) as done:
        main(["scan", name, "--help"])
    assert done.value.code == 0
    h = capsys.readouterr().out
    assert all(o.flag in h for o in options(registry.get(name).config))


def test_registry_refuses_a_second_entry_of_a_name_or_format():
    with pytest.raises(InputError, match="already registered"):
        registry.register(registry.get("retrieval"))
    with pytest.raises(InputError, match="format"):
        registry.register(replace(TOY, name="toy2", result=registry.get("retrieval").result))
    with pytest.raises(InputError, match="lower-case"):
        replace(TOY, name="Toy")


# ----------------------------------------------------------------------------- runner and store

def test_runner_resumes_reports_progress_and_recomputes_stale_units(tiny_llama, tmp_path, capsys):
    seen = []
    first = run(TOY, tiny_llama, ToyConfig(), store=tmp_path, progress=seen.append)
    assert seen[0] == Progress("toy", "texts", 0, 2) and seen[-1] == Progress("toy", "texts", 2, 2)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "units" / "texts").iterdir()}
    again = run(TOY, tiny_llama, ToyConfig(scale=3.0), store=tmp_path, progress=False, force=True)
    assert {p: p.stat().st_mtime_ns for p in files} == files              # scale does not determine the units
    np.testing.assert_allclose(again.scores, 3 * first.scores)
    assert "resumed 2 of 2" in capsys.readouterr().err
    run(TOY, tiny_llama, ToyConfig(texts=("the cat sat", "something else")), store=tmp_path, progress=False,
        force=True)
    err = capsys.readouterr().err
    assert "recomputing 1 unit" in err and "text-1 (stale: spec)" in err and "resumed 1 of 2" in err
    (tmp_path / "units" / "texts" / "text-0.safetensors").write_bytes(b"damaged")
    run(TOY, tiny_llama, ToyConfig(texts=("the cat sat", "something else")), store=tmp_path, progress=False)
    assert "unreadable" in capsys.readouterr().err                         # a damaged unit is recomputed
    assert ToyResult.load(tmp_path).n == 2 and (tmp_path / "figures" / "heads.html").exists()


def test_a_fresh_payload_reduces_exactly_like_a_stored_one(tiny_llama, tmp_path):
    fresh = run(TOY, tiny_llama, ToyConfig(), progress=False)
    run(TOY, tiny_llama, ToyConfig(), store=tmp_path, progress=False)
    stored = run(TOY, tiny_llama, ToyConfig(), store=tmp_path, progress=False)
    assert np.array_equal(fresh.scores, stored.scores)


def test_unit_store_stamps():
    import tempfile

    store = UnitStore(tempfile.mkdtemp())
    assert store.status("s", "u", {"a": 1}) == "missing"
    store.put("s", "u", {"a": 1, "b": [1, 2]}, {"x": 1, "y": np.arange(3)})
    assert store.status("s", "u", {"a": 1, "b": (1, 2)}) == "ok"              # JSON-equal stamps match
    assert store.status("s", "u", {"a": 2, "b": [1, 2]}) == "stale: a"
    store.put("s", "u", {"a": 2}, {"x": 2})                                 # no arrays: JSON replaces safetensors
    assert store.get("s", "u") == {"x": 2} and len(list(store.folder("s").iterdir())) == 1
    with pytest.raises(InputError, match="file-name-safe"):
        Unit("../escape", {})


# ----------------------------------------------------------------------------- config options

@dataclass(frozen=True)
class _Opts(Config):
    k: int = opt(3, "k", min=1)
    cells: tuple[tuple[str, int, float], ...] | None = opt(None, "cells")
    mask: bool = opt(True, "mask")
    mode: str = opt("a", "mode")


def test_options_parse_typed_values_and_name_the_flag():
    o = {x.name: x for x in options(_Opts)}
    assert parse(o["cells"], "code:200:0,cat:300:50") == (("code", 200, 0.0), ("cat", 300, 50.0))
    assert parse(o["cells"], "none") is None and parse(o["mask"], "no") is False
    with pytest.raises(InputError, match="--k"):
        parse(o["k"], "200.9")
    with pytest.raises(InputError, match="--cells"):
        parse(o["cells"], "code:200")
    with pytest.raises(InputError, match="k must be >= 1"):
        build(_Opts, {"k": "0"})
    assert build(_Opts, {"k": 5}).k == 5 and _Opts(cells=[["x", 1, 2]]).cells == (("x", 1, 2.0),)
    lengths = next(x for x in options(registry.get("retrieval").config) if x.name == "lengths")
    with pytest.raises(InputError, match="--lengths: cannot read '' \\(an empty list\\)"):
        parse(lengths, "")


def test_nested_act_settings_are_options_of_the_sinks_config():
    from analyses.sinks import SinksConfig

    names = [o.name for o in options(SinksConfig)]
    assert {"beta", "tau", "rule", "alpha", "min_queries", "keep_first", "selection"} <= set(names)
    assert "heads" not in names and build(SinksConfig, {"beta": "0.3"}).act.beta == 0.3


# ----------------------------------------------------------------------------- every analysis keeps the protocol

def test_every_saved_result_keeps_the_result_protocol(results, tiny_llama):
    saved = registry.find_results(results)
    assert sorted(s.analysis.name for s in saved) == sorted(registry.names())
    for s in saved:
        res = s.load()
        assert isinstance(res, s.analysis.result) and res.model_id == "tiny-llama"
        frame = res.to_frame()
        assert {"layer", "head", "metric", "value"} <= set(frame.columns), s.analysis.name
        assert frame["layer"].min() >= -1 and pd.api.types.is_numeric_dtype(frame["value"])
        for name, m in res.head_scores().items():
            assert m.shape == (tiny_llama.n_layers, tiny_llama.n_heads), (s.analysis.name, name)
        assert all(isinstance(h, HeadId) for h in res.roles()) and res.summary()
        assert all(isinstance(v, Stat) for v in res.summary().values()) and res.n_samples() >= 0
        for fig in figures(res.sections()):
            assert res.plot(fig.kind, **fig.defaults()).data, (s.analysis.name, fig.kind)
        again = type(res).load(s.path)
        pd.testing.assert_frame_equal(again.to_frame(), frame, check_dtype=False)
