"""Option forms generated from a config class (:mod:`analyses.config`): one widget per option.

Booleans are checkboxes, choices select boxes, plain numbers number inputs, the rest text inputs
written as the CLI flags are (lists comma-separated, ``none`` for an unset optional value); the
values go through :func:`analyses.config.build`, so a form and a flag are checked the same way.
Every widget keeps its value for the session (``persist_state``): leaving the page and coming back
finds the form as it was left.
"""
from __future__ import annotations

import streamlit as st

from analyses.config import build, format_value, options

KEEP = {"persist_state": "session"}


def config_form(cls, base, key: str):
    """Widgets for every option of ``cls`` (defaults from ``base``); returns the config they describe.

    Raises the config's typed error (``InputError``) when a value is refused.
    """
    values = {}
    opts = options(cls)
    cols = st.columns(min(3, max(1, len(opts))))
    for i, o in enumerate(opts):
        current = base
        for p in o.path:
            current = getattr(current, p)
        with cols[i % len(cols)]:
            values[o.name] = _widget(o, current, f"{key}:{o.name}")
    return build(cls, values)


def _widget(o, value, key: str):
    label = o.name.replace("_", " ")
    if o.kind == "bool":
        return st.checkbox(label, value=bool(value), key=key, help=o.help, **KEEP)
    if o.kind == "choice":
        return st.selectbox(label, list(o.choices), index=list(o.choices).index(value), key=key, help=o.help, **KEEP)
    if o.kind in ("int", "float") and not o.optional:
        cast = int if o.kind == "int" else float                  # streamlit wants one numeric type
        lo, hi = (None if v is None else cast(v) for v in (o.min, o.max))
        return st.number_input(label, value=cast(value), min_value=lo, max_value=hi, step=cast(1) if cast is int
                               else None, key=key, help=o.help, format="%d" if cast is int else "%g",
                               **KEEP)
    if o.kind == "list" and o.choices:
        return st.multiselect(label, list(o.choices), default=list(value), key=key, help=o.help, **KEEP)
    if o.kind == "str":
        field = st.text_area if "\n" in value else st.text_input      # prompts keep their line breaks
        return field(label, value=value, key=key, help=o.help, **KEEP)
    return st.text_input(label, value=format_value(o, value), key=key, help=o.help, **KEEP)
