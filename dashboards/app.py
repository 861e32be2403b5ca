"""headwise dashboard: pick a model in the sidebar, then a page (``headwise dashboard`` serves it).

Routing is ``st.navigation``: the head atlas and the pattern explorer, then one page per analysis
of the registry (:mod:`dashboards.page` draws any of them). The model is loaded once per server
(``dashboards.common.get_model``).
"""
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run dashboards/app.py` from a checkout
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from analyses import registry  # noqa: E402
from dashboards.common import default_model, default_results, get_model  # noqa: E402
from dashboards.errors import message, run_page  # noqa: E402
from dashboards.page import analysis_page  # noqa: E402
from probe import HeadwiseError, HeadId, list_models  # noqa: E402

st.set_page_config(page_title="headwise", layout="wide")

LOCAL = "local folder…"


def pick_model() -> str:
    names = [m.name for m in list_models()]
    default = default_model()
    if default not in names:
        names.insert(0, default)
    choice = st.sidebar.selectbox("Model", names + [LOCAL], index=names.index(default), key="model_choice")
    if choice == LOCAL:
        choice = st.sidebar.text_input("Hugging Face model folder", key="model_path").strip() or default
    return choice


name = pick_model()
try:
    model = get_model(name)
except (HeadwiseError, OSError) as exc:
    st.sidebar.error(message(exc))
    name = default_model()
    model = get_model(name)
st.session_state["model_name"] = name
st.sidebar.caption(f"{model.model_id} · {model.n_layers} layers · {model.n_heads} heads · "
                   f"{model.n_kv_heads} KV heads · context {model.n_ctx}")

st.sidebar.text_input("Results folder", default_results(), key="results_root",
                      help="saved results of `headwise scan …` (searched recursively)")
heads = [HeadId(l, h) for l in range(model.n_layers) for h in model.layout.grouped_order()]
if "head_pending" in st.session_state:                     # a click on some page selected a head
    st.session_state["head"] = st.session_state.pop("head_pending")
if st.session_state.get("head") not in heads:
    st.session_state["head"] = heads[0]
st.sidebar.selectbox("Selected head (every page)", heads, key="head", format_func=str)

VIEWS = ROOT / "dashboards" / "views"
analyses = [st.Page(partial(analysis_page, a.name), title=a.title, url_path=a.name, icon=a.icon or None)
            for a in registry.analyses()]
page = st.navigation({
    "Heads": [st.Page(VIEWS / "head_grid.py", title="Head atlas", icon=":material/grid_on:", default=True),
              st.Page(VIEWS / "pattern_explorer.py", title="Pattern explorer", icon=":material/zoom_in:")],
    "Analyses": analyses,
})
run_page(page)
