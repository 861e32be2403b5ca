"""headwise dashboard: pick a model in the sidebar, then a page (``headwise dashboard`` serves it).

Routing is ``st.navigation``; the model is loaded once per server (``dashboards.common.get_model``).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run dashboards/app.py` from a checkout
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboards.common import default_model, get_model  # noqa: E402
from probe import HeadwiseError, list_models  # noqa: E402

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
except HeadwiseError as exc:
    st.sidebar.error(str(exc))
    name = default_model()
    model = get_model(name)
st.session_state["model_name"] = name
st.sidebar.caption(f"{model.model_id} · {model.n_layers} layers · {model.n_heads} heads · "
                   f"{model.n_kv_heads} KV heads · context {model.n_ctx}")

page = st.navigation([
    st.Page(ROOT / "dashboards" / "views" / "head_grid.py", title="Head grid", icon=":material/grid_on:", default=True),
    st.Page(ROOT / "dashboards" / "views" / "pattern_explorer.py", title="Pattern explorer", icon=":material/zoom_in:"),
])
page.run()
