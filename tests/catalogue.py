r"""The bad-input catalogue's parts (issue 21): a case per item, its id prefixed with its verdict.

Verdicts: ``typed-error`` (refused before any work with a typed error naming the problem and the
fix), ``recomputed`` (a stale or damaged thing rebuilt, never used), ``handled`` (the fault does no
harm). Count the catalogue with
``python -m pytest tests/test_bad_inputs.py tests/test_bad_inputs_runs.py --collect-only -q | grep -o '\[[a-z-]*:' | sort | uniq -c``.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from probe.atomic import read_tensors, write_tensors


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


def resave(path: Path, fmt: str, tensors: Callable | None = None, meta: Callable | None = None,
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
