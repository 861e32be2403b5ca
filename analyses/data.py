"""Where the shipped task data and validation runs live: one function, for a checkout and a wheel alike.

The repository's ``data/`` folder is installed as the package ``headwise_data`` (``setup.py``
maps it; every file under it is package data), so ``pip install .`` ships it. In a source
checkout (the folder above ``analyses/`` holds ``pyproject.toml`` and ``data/``) the checkout's own
``data/`` is used, so the data you edit is the data you run.

>>> (data_dir() / "retrieval" / "needles.jsonl").is_file()
True
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from probe.errors import HeadwiseError, InputError

PACKAGE = "headwise_data"


def data_dir() -> Path:
    """The folder of the shipped data (``data/`` of a checkout, or the installed ``headwise_data``)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "data").is_dir():
        return root / "data"
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HeadwiseError(f"headwise's data package {PACKAGE!r} is not installed: reinstall headwise (pip install .)")
    return Path(list(spec.submodule_search_locations)[0])


def data_path(*parts: str) -> Path:
    """A file or folder of the shipped data, e.g. ``data_path("retrieval", "needles.jsonl")``."""
    return data_dir().joinpath(*parts)


def read_utf8(path: str | Path, what: str) -> str:
    """A user's UTF-8 text file; ``what`` names it in errors (a flag, or "text file"), which say what
    is wrong: no such file, a folder, or where the encoding breaks and how to convert it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{what} {str(path)!r}: {'is a folder, not a file' if p.is_dir() else 'no such file'}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start}: {exc.reason}): convert it, e.g. iconv -f latin1 -t utf-8") from None
