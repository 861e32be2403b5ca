"""Data flows one way: probe never imports analyses or dashboards; analyses never import dashboards."""
import ast
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"probe": {"analyses", "dashboards"}, "analyses": {"dashboards"}}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    bad = {str(p.relative_to(ROOT)): sorted(imports(p) & FORBIDDEN[package])
           for p in (ROOT / package).rglob("*.py") if imports(p) & FORBIDDEN[package]}
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_no_cdn_assets():
    """Offline first: figures and pages never point the browser at a CDN."""
    bad = [str(p.relative_to(ROOT)) for pkg in ("probe", "analyses", "dashboards") for p in (ROOT / pkg).rglob("*.py")
           if '"cdn"' in p.read_text() or "cdn.plot.ly" in p.read_text() or "cdn.jsdelivr" in p.read_text()]
    assert not bad, f"CDN assets in {bad}: embed plotly.js (include_plotlyjs=True or 'directory')"


def test_no_pickle_loading():
    offenders = []
    for p in ROOT.glob("*/**/*.py"):
        if ".venv" in p.parts or "tests" in p.parts:
            continue
        text = p.read_text()
        if "pickle.load" in text or "joblib.load" in text or ("torch.load(" in text and "weights_only=True" not in text):
            offenders.append(str(p.relative_to(ROOT)))
    assert not offenders, offenders


# Module names the family mapping owns (probe/families.py): nowhere else, tests included.
FAMILY_NAMES = {"lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "ln_f", "final_layer_norm",
                "self_attn", "o_proj", "c_proj", "c_attn", "gpt_neox"}
FAMILY_CHAINS = {("model", "layers"), ("model", "norm"), ("model", "decoder"), ("model", "rotary_emb"),
                 ("transformer", "h"), ("decoder", "layers")}


def family_names(path: Path) -> list[str]:
    """``file:line name`` for every attribute access that names a family's module outside the mapping."""
    hits, where = [], path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        chain = (node.value.attr, node.attr) if isinstance(node.value, ast.Attribute) else None
        if node.attr in FAMILY_NAMES or chain in FAMILY_CHAINS:
            hits.append(f"{where}:{node.lineno} .{'.'.join(chain) if chain in FAMILY_CHAINS else node.attr}")
    return hits


def test_family_module_names_only_in_the_mapping():
    """Style rule 13: blocks, attention, norms and (un)embeddings are reached through probe.families."""
    files = [p for d in ("probe", "analyses", "dashboards", "bench", "tests", "scripts", "notebooks")
             for p in (ROOT / d).rglob("*.py") if p != ROOT / "probe" / "families.py"]
    hits = [h for p in files for h in family_names(p)]
    assert not hits, f"use probe.families instead of naming a family's modules: {hits}"


def test_the_family_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("h = m.hf.model.layers[0].self_attn\nw = m.hf.lm_head.weight\nok = st.layers\n")
    assert sorted(h.split()[1] for h in family_names(bad)) == [".lm_head", ".model.layers", ".self_attn"]


# Tensor constructors: in analyses/ each names its device (the model's, or "cpu" for a host-side result).
CONSTRUCTORS = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "linspace", "rand", "randn",
                "randint", "randperm", "eye"}


def deviceless_tensors(path: Path) -> list[str]:
    """``file:line torch.f`` for constructor calls without ``device=`` that are not moved at once (``.to(...)``)."""
    tree = ast.parse(path.read_text())
    moved = {id(n.func.value) for n in ast.walk(tree) if isinstance(n, ast.Call) and
             isinstance(n.func, ast.Attribute) and n.func.attr == "to"}
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [f"{where}:{n.lineno} torch.{n.func.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in CONSTRUCTORS
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"
            and not any(k.arg == "device" for k in n.keywords) and id(n) not in moved]


def test_analyses_build_tensors_on_a_named_device(tmp_path):
    """Issue 15.5: a tensor built without a device lands on the CPU while the model is on CUDA."""
    hits = [h for p in (ROOT / "analyses").rglob("*.py") for h in deviceless_tensors(p)]
    assert not hits, f"give these a device= (the model's, or 'cpu' for host-side results): {hits}"
    bad = tmp_path / "bad.py"
    bad.write_text("a = torch.zeros(3)\nb = torch.tensor([1]).to(d)\nc = torch.arange(4, device=d)\n")
    assert [h.split()[1] for h in deviceless_tensors(bad)] == ["torch.zeros"]


def package_modules(package: str, skip: tuple[str, ...] = ()) -> list[str]:
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, f"{package}.")
                  if not m.name.startswith(skip))


def run_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("name", package_modules("probe", skip=("probe.kernels",)))
def test_probe_doctests(name):
    run_doctests(name)


@pytest.mark.parametrize("name", package_modules("analyses"))
def test_analyses_doctests(name):
    """The examples in the analyses' docstrings run (on tiny-llama: the whole set stays well under a minute)."""
    run_doctests(name)


def _sources(*packages):
    return [p for pkg in packages for p in (ROOT / pkg).rglob("*.py")]


def test_heads_are_never_spelt_or_parsed_by_hand():
    """HeadId everywhere: no f"L{l}H{h}" built and no "L3H1" split apart outside probe.heads."""
    import re

    spelt = re.compile(r"""f["'][^"']*L\{[^}]*\}H\{""")
    parsed = re.compile(r"""\.split\(["']H["']\)""")
    bad = [str(p.relative_to(ROOT)) for p in _sources("probe", "analyses", "dashboards", "notebooks")
           if p.name != "heads.py" and (spelt.search(p.read_text()) or parsed.search(p.read_text()))]
    assert not bad, bad


def test_no_duck_typing_or_name_lookups_in_the_analyses_and_dashboards():
    bad = [str(p.relative_to(ROOT)) for p in _sources("analyses", "dashboards")
           if "hasattr(" in p.read_text() or "globals()[" in p.read_text() or "importlib.import_module(\"analyses." in
           p.read_text()]
    assert not bad, bad


def test_every_analysis_package_has_the_same_rooms():
    from analyses import registry

    for a in registry.analyses():
        pkg = ROOT / "analyses" / a.name
        assert {"__init__.py", "run.py", "result.py", "plots.py"} <= {p.name for p in pkg.iterdir()}, a.name
        assert importlib.import_module(f"analyses.{a.name}").ANALYSIS is a


def test_data_is_found_in_one_place():
    bad = [str(p.relative_to(ROOT)) for p in _sources("probe", "analyses", "dashboards")
           if "parents[" in p.read_text() and p.name != "data.py"]
    assert not bad, bad
