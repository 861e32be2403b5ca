"""What an analysis page shows, as data: results describe their page, the dashboard only draws it.

A result's :meth:`~analyses.contract.Result.sections` is a list of :class:`Section` s, each holding
items drawn top to bottom, side by side, in tabs or in an expander:

* :class:`Figure`: ``result.plot(kind, **options)``, with a picker per option that has choices;
  ``selects_head``: clicking a cell selects that head on every page (the figure's cells carry
  ``[layer, head]`` as customdata);
* :class:`Table`: a data frame (with a CSV download);
* :class:`Note`: a line of markdown;
* :class:`Download`: a file the result offers (e.g. the calibration of the ACT search);
* :class:`Tool`: an interactive run on a prompt (inputs: a small config dataclass; output: a
  :class:`ToolOutput` of texts, HTML and figures), e.g. generation with and without a calibration;
* a nested :class:`Section` (e.g. one per tab).

Nothing here imports Streamlit; the same description writes the figures of a CLI run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

ARRANGEMENTS = ("stack", "columns", "tabs", "expander")


@dataclass(frozen=True, eq=False)
class Figure:
    kind: str
    choices: dict[str, tuple] = field(default_factory=dict)   # option -> allowed values (first: default)
    fixed: dict[str, Any] = field(default_factory=dict)       # options passed as they are
    selects_head: bool = False

    def defaults(self) -> dict[str, Any]:
        return {**self.fixed, **{k: v[0] for k, v in self.choices.items()}}

    def file_name(self) -> str:
        """Name of this figure's HTML file in a results folder (kind and fixed options)."""
        return "_".join([self.kind] + [str(v) for v in self.fixed.values()])


@dataclass(frozen=True, eq=False)
class Table:
    title: str
    frame: pd.DataFrame
    name: str = ""


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True, eq=False)
class Download:
    label: str
    file_name: str
    data: str | bytes
    mime: str = "application/json"


@dataclass(frozen=True, eq=False)
class ToolOutput:
    texts: dict[str, str] = field(default_factory=dict)
    html: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    downloads: tuple[Download, ...] = ()


@dataclass(frozen=True, eq=False)
class Tool:
    """An interactive run: a form for ``inputs`` (a frozen dataclass of defaults) and a button."""

    key: str
    label: str
    inputs: Any
    run: Callable[[Any, Any], ToolOutput]
    forwards: Callable[[Any], int] | None = None    # forward passes a run of these inputs makes (an ETA); None: unknown


@dataclass(frozen=True, eq=False)
class Section:
    title: str
    items: tuple = ()
    arrange: str = "stack"

    def __post_init__(self):
        if self.arrange not in ARRANGEMENTS:
            raise ValueError(f"arrange must be one of {ARRANGEMENTS}, not {self.arrange!r}")


def figures(sections) -> list[Figure]:
    """Every :class:`Figure` of a layout, depth first."""
    out = []
    for item in sections:
        if isinstance(item, Section):
            out += figures(item.items)
        elif isinstance(item, Figure):
            out.append(item)
    return out
