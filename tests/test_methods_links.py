"""Every analysis module points to the section of docs/methods.md it is held to (issue 18, Deliver 6)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from analyses import registry

ROOT = Path(__file__).resolve().parents[1]
HEADINGS = re.findall(r"^## (\d+)\.", (ROOT / "docs" / "methods.md").read_text(encoding="utf-8"), re.M)


def _modules():
    for name in registry.names():
        section = re.search(r"§(\d+)", registry.get(name).methods)
        pkg = ROOT / "analyses" / name
        if section and pkg.is_dir():
            for f in sorted(pkg.glob("*.py")):
                yield pytest.param(f, section.group(1), id=str(f.relative_to(ROOT)))


@pytest.mark.parametrize(("path", "section"), list(_modules()))
def test_each_analysis_module_links_its_methods_section(path, section):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    linked = re.findall(r"docs/methods\.md\s*§(\d+)", doc)
    assert linked, f"{path.name}: its docstring does not point to docs/methods.md §{section}"
    assert section in linked and all(s in HEADINGS for s in linked), (linked, section, HEADINGS)
