"""Every notebook runs top to bottom on the embedded model; a failing cell fails the suite."""
import importlib.util
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # One torch thread unless told otherwise: the suite runs on small shared CPUs, where two
    # threads contending with other work are several times slower than one.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_notebooks_define_no_functions():
    """Notebooks consume the packages; any function they need lives in probe/ or analyses/."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "def " not in src and "class " not in src, path.name


def _builder():
    spec = importlib.util.spec_from_file_location("make_notebook", ROOT / "scripts" / "make_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


@pytest.mark.parametrize("src", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_matches_its_source(src):
    """The committed notebook is the one scripts/make_notebook.py builds from notebooks/src/<name>.py."""
    path = ROOT / "notebooks" / f"{src.stem}.ipynb"
    assert path.exists(), f"run: python scripts/make_notebook.py {src.relative_to(ROOT)} {path.relative_to(ROOT)}"
    built = [(c.cell_type, c.source) for c in _builder()(src.read_text()).cells]
    committed = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]
    assert committed == built, f"{path.name} is stale: rebuild it with scripts/make_notebook.py"


def test_every_analysis_has_a_notebook():
    analyses = sorted(p.name for p in (ROOT / "analyses").iterdir() if (p / "__init__.py").exists())
    missing = [a for a in analyses if not (ROOT / "notebooks" / f"{a}.ipynb").exists()]
    assert not missing, f"no notebook for {missing}: add notebooks/src/<name>.py and build it"
