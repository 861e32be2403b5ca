r"""The bad-input catalogue's parts (issue 21): a case per item, its id prefixed with its verdict.

Verdicts: ``typed-error`` (refused before any work with a typed error naming the problem and the
fix), ``recomputed`` (a stale or damaged thing rebuilt, never used), ``handled`` (the fault does no
harm). Count the catalogue with
``python -m pytest tests/test_bad_inputs.py tests/test_bad_inputs_runs.py --collect-only -q | grep -o '\[[a-z-]*:' | sort | uniq -c``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import NamedTuple

import pytest


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
