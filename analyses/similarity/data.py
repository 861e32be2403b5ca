"""The shipped text sets (data/similarity/): prompts for similarity, held-out text for the echo loss.

Methods: docs/methods.md §4.
"""
from __future__ import annotations

from pathlib import Path

from probe.errors import InputError

from ..data import data_path, read_utf8



def load_texts(name_or_path: str) -> list[str]:
    """Paragraphs (separated by blank lines) of ``data/similarity/<name>.txt`` or of a file path."""
    path = Path(name_or_path)
    if not path.exists():
        path = data_path("similarity", f"{name_or_path}.txt")
    if not path.exists():
        raise InputError(f"no text set {name_or_path!r}: give a file path or one of "
                         f"{sorted(p.stem for p in data_path('similarity').glob('*.txt'))}")
    texts = [p.strip() for p in read_utf8(path, "text file").split("\n\n") if p.strip()]
    if not texts:
        raise InputError(f"{path} holds no text: write paragraphs separated by blank lines")
    return texts
