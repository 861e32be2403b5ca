"""Errors on the dashboard: a short message naming the problem and what to do, never a traceback.

:func:`run_page` runs a page and turns what escapes it into one ``st.error``: a typed headwise
error as it is (it names the file and the fix), an ``OSError`` with its file, anything else as
"unexpected" with the traceback written to the server's console only (the browser never sees an
internal path). Streamlit's own control flow (``st.stop``, ``st.rerun``) passes through: it is a
``BaseException``, not an ``Exception``. ``headwise dashboard`` also runs the server with
``client.showErrorDetails = none``, so nothing else reaches the browser either.
"""
from __future__ import annotations

import sys
import traceback

import streamlit as st

from probe.errors import HeadwiseError


def message(exc: BaseException) -> str:
    """The one line shown for ``exc`` (typed and OS errors as the CLI words them)."""
    from analyses.cli import describe

    if isinstance(exc, (HeadwiseError, OSError)):
        return describe(exc)
    return (f"Unexpected {type(exc).__name__} on this page. The details are in the terminal that runs "
            "`headwise dashboard`; please report them. Other pages still work.")


def run_page(page) -> None:
    """``page.run()`` with every failure shown as :func:`message`."""
    try:
        page.run()
    except Exception as exc:
        if not isinstance(exc, (HeadwiseError, OSError)):
            traceback.print_exc(file=sys.stderr)
        st.error(message(exc))
