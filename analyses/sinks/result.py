"""The ACT result: the sink profile, the head search with its control, and the calibration file.

Files: ``summary.json`` (format ``headwise.sinks``), ``profile.json`` (+ parquet tables),
``search.json`` (+ the tidy table as parquet), ``power.json`` (the held-out judgement of both
selection rules, :class:`~analyses.sinks.power.ActPower`) and ``calib.json``, the calibration
``headwise generate --calibration`` and :func:`~analyses.sinks.apply_calibration` apply.
Frame: the profile's per-head metrics (``mass:<type>``, ``sinks:<type>``, ``first_sink:<type>``)
and the search's per-candidate ones (``task`` column: the searched task; ``profile`` for the rest).

Methods: docs/methods.md §2.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from probe.heads import HeadId
from probe.shapes import HeadScores

from ..config import Config, opt
from ..contract import Result, Stat
from ..layout import Download, Figure, Note, Section, Table, Tool, ToolOutput
from .calibration import Calibration, apply_calibration, load_calibration
from .power import ActPower
from .profile import SinkProfile
from .search import METRICS, SearchResult

METHODS = "Method, formulas and controls: docs/methods.md §2 (ACT, Yu et al. 2024)."


@dataclass(frozen=True)
class ComparePrompt(Config):
    """The inputs of the before/after comparison."""

    prompt: str = opt("Review: The plot was dull and the acting wooden.\nSentiment:", "prompt to continue")
    max_new_tokens: int = opt(12, "tokens to generate", min=1)


@dataclass(frozen=True, eq=False)
class SinksResult(Result):
    FORMAT = "headwise.sinks"

    model_id: str
    profile: SinkProfile
    search: SearchResult
    calibration: Calibration
    power: ActPower | None = None           # held-out verdicts of both rules (None: saved before issue 18)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.profile.mass["layer"].max()) + 1, int(self.profile.mass["head"].max()) + 1

    def head_scores(self) -> dict[str, HeadScores]:
        L, H = self.shape
        task = self.search.task
        return self.profile.score_maps(L, H) | {f"{task} search: {k}": v
                                                  for k, v in self.search.score_maps(L, H).items()}

    def item_scores(self) -> dict[str, np.ndarray]:
        """The profile's ``mass:<type>`` per profiled prompt."""
        return self.profile.item_maps(*self.shape)

    def to_frame(self) -> pd.DataFrame:
        return pd.concat([self.profile.to_frame().assign(task="profile"), self.search.to_frame().drop(columns="shots")],
                         ignore_index=True)

    def roles(self) -> dict[HeadId, list[str]]:
        out: dict[HeadId, list[str]] = {h: [f"ACT-calibrated ({self.search.task})"] for h in self.search.selected}
        cal = self.profile.sinks[~self.profile.sinks["first"].astype(bool)]
        per = cal.groupby(["layer", "head"]).size().div(max(1, self.profile.n_texts))
        for (l, h), v in per[per >= 1].items():
            out.setdefault(HeadId(int(l), int(h)), []).append(f"sinks {v:.1f}/prompt")
        return out

    def n_samples(self) -> int:
        return int(self.search.heldout.get("n_items", 0))

    def summary(self) -> dict[str, Stat]:
        f, n = self.search.figures(), self.n_samples()
        first = self.profile.summary()["token_types"]["first"]["mean_mass"]
        out = {"first_mass": Stat("attention on the first token (mean over heads)", first, n=self.profile.n_texts,
                                  fmt=".2f"),
               "kept": Stat("heads kept by the search", len(self.search.selected), fmt="d")}
        if self.power is None:                     # a result saved before the held-out judgement
            rnd = f["heldout_random_accuracy"]
            return out | {
                "plain": Stat("held-out accuracy, plain", f["heldout_plain"]["accuracy"], n=n),
                "calibrated": Stat(f"held-out accuracy, {f['n_selected']} heads calibrated",
                                   f["heldout_calibrated"]["accuracy"], n=n),
                "random": Stat(f"held-out accuracy, random heads ({rnd['n']} seeds; std {rnd['std'] or 0:.3f})",
                               rnd["mean"], n=n)}
        return out | power_stats(self.power)

    def plots(self) -> dict:
        from .plots import heldout_bars

        return {"profile": lambda metric="mass": self.profile.plot(metric),
                "search": lambda metric="delta_accuracy": self.search.plot(metric),
                "heldout": lambda: heldout_bars(self.search),
                **({"power": lambda metric="accuracy": self.power.plot(metric)} if self.power else {})}

    def sections(self) -> list[Section]:
        types = pd.DataFrame(self.profile.summary()["token_types"]).T.reset_index(names="type")
        kept = ", ".join(map(str, self.search.selected)) or "none (no head helped on the calibration split)"
        calib = json.dumps(self.calibration.to_dict(), indent=2)
        return [Section("", (Note(METHODS),)),
                Section("Sink map", (Figure("profile", choices={"metric": ("mass", "sinks")}, selects_head=True),
                                     Section("Sinks by token type; every sink found",
                                             (Table("sink types", types), Table("sinks", self.profile.sinks)),
                                             "expander"))),
                Section("Head search and calibration", (
                    Figure("search", choices={"metric": ("delta_accuracy", "delta_gold_logprob")}, selects_head=True),
                    Figure("heldout"), Note(f"Kept heads ({self.search.config['selection']} rule): {kept}"),
                    *((Figure("power", choices={"metric": METRICS}),
                       Table("held-out verdicts (both rules)", self.power.to_frame())) if self.power else ()),
                    Download("Download the calibration file (calib.json)", "calib.json", calib),
                    Note("Apply it at inference: `headwise generate --calibration calib.json \"prompt\"` or "
                         "`apply_calibration(model, \"calib.json\")` on a plain Hugging Face model."))),
                Section("Before/after on your prompt", (Tool("compare", "Generate with and without calibration",
                                                             ComparePrompt(), self.compare,
                                                             lambda i: 2 * i.max_new_tokens),)),   # plain + calibrated
                Section("Per-candidate table", (Table("act search", self.search.to_frame()),), "expander")]

    def compare(self, model, inputs: ComparePrompt) -> ToolOutput:
        """Greedy continuations of the prompt without and with this calibration."""
        from ..generate import generate_text

        plain = generate_text(model, inputs.prompt, max_new_tokens=inputs.max_new_tokens)
        handle = apply_calibration(model, self.calibration)
        try:
            calibrated = generate_text(model, inputs.prompt, max_new_tokens=inputs.max_new_tokens)
        finally:
            handle.remove()
        return ToolOutput(texts={"plain": plain, "calibrated": calibrated})

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.profile.save(folder / "profile.json")
        self.search.save(folder / "search.json")
        self.calibration.save(folder / "calib.json")
        if self.power is not None:
            self.power.save(folder / "power.json")
        extra = {"power": self.power.to_dict()} if self.power is not None else {}
        return self.write_summary(folder, {"task": self.search.task, "figures": self.search.figures(),
                                           "profile": self.profile.summary()} | extra)

    @classmethod
    def load(cls, folder: str | Path) -> "SinksResult":
        folder = Path(folder)
        d = cls.read_summary(folder)
        power = ActPower.load(folder / "power.json") if (folder / "power.json").exists() else None
        return cls(d["model_id"], SinkProfile.load(folder / "profile.json"), SearchResult.load(folder / "search.json"),
                   load_calibration(folder / "calib.json"), power)


def power_stats(power: ActPower) -> dict[str, Stat]:
    """Headlines of the held-out judgement: plain accuracy, then per rule the calibrated accuracy, its
    paired change (McNemar p), the random control's change and the verdict."""
    pa = power.plain["accuracy"]
    out = {"plain": Stat("held-out accuracy, plain", pa["estimate"], n=power.n_heldout, ci=(pa["lo"], pa["hi"]))}
    for rule, r in power.rules.items():
        tag = "paper's accuracy rule" if rule == "accuracy" else "gold log-prob rule"
        if not r["heads"]:
            out[f"{rule}_kept"] = Stat(f"{tag}: heads kept", 0, fmt="d")
            continue
        c = r["calibrated"]["accuracy"]
        out[f"{rule}_calibrated"] = Stat(f"{tag}: held-out accuracy, {len(r['heads'])} heads calibrated",
                                         c["estimate"], n=c["n"], ci=(c["lo"], c["hi"]))
        for m, v in r["verdicts"].items():
            g, k = v["gain"], v["control"]
            out[f"{rule}_{m}_gain"] = Stat(f"{tag}: change in {m} (paired; p = {v['p_value']:.3g}, "
                                           f"{v['test']})", g["estimate"], n=g["n"], ci=(g["lo"], g["hi"]), fmt=".4f")
            where = "outside" if r.get("outside", True) else "of all candidates (too few outside)"
            out[f"{rule}_{m}_random"] = Stat(f"{tag}: change in {m}, {v['n_draws']} random sets {where}",
                                             k["estimate"], n=k["n"], ci=(k["lo"], k["hi"]), fmt=".4f")
            out[f"{rule}_{m}_verdict"] = Stat(f"{tag}: {m} gain?", "gain" if v["is_gain"] else "no gain: "
                                              + v["reason"])
    return out

