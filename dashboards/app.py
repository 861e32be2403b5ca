"""headwise dashboard: pick a model in the sidebar, then a page (``headwise dashboard`` serves it).

Routing is ``st.navigation``: the head pages (atlas, top heads, head card, token view, pattern
explorer, interventions), then one page per analysis of the registry (:mod:`dashboards.page` draws
any of them). The model is loaded once per server (``dashboards.common.get_model``). The selected
head and each page's inputs are widgets bound to the URL (``bind="query-params"``: a view is a
link that reopens it) or kept for the session (``persist_state="session"``: leaving a page and
coming back finds it as it was). With the sidebar's toggle on, a click on a head of any grid or
head table also opens its card (:func:`open_page`).
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
from dashboards.grids import OPENS_CARD  # noqa: E402
from dashboards.page import analysis_page  # noqa: E402
from probe import HeadwiseError, list_models  # noqa: E402

HERE = Path(__file__).resolve().parent
# A local favicon: Streamlit fetches a Material icon's SVG from a font CDN when a page icon is the favicon.
st.set_page_config(page_title="headwise", layout="wide", page_icon=str(HERE / "components" / "headwise.png"))

LOCAL = "local folder…"
SIDEBAR = ("model_choice", "model_path", "head")      # the sidebar's inputs in the URL (every page shares them)
OPENED = "opened_with"                                 # the sidebar params open_page carried to the page it opened


def restore_opened_params() -> None:
    """After :func:`open_page`: the rerun drops the params its widgets bound on the page before (and so unbound
    them), and the browser's URL with them; give them back before the sidebar binds them again (``?head=``)."""
    keep = st.session_state.pop(OPENED, None) or {}
    missing = {k: v for k, v in keep.items() if k not in st.query_params}
    if missing:
        st.query_params.update(missing)


def pick_model() -> str:
    names = [m.name for m in list_models()]
    default = default_model()
    if default not in names:
        names.insert(0, default)
    choice = st.sidebar.selectbox("Model", names + [LOCAL], index=names.index(default), key="model_choice",
                                  bind="query-params")
    if choice == LOCAL:
        choice = st.sidebar.text_input("Hugging Face model folder", key="model_path", bind="query-params").strip() \
            or default
    return choice


def open_page(target) -> None:
    """``st.switch_page(target)`` with the session's sidebar inputs: ``st.switch_page`` resets the query string,
    which Streamlit refuses while widgets are bound to it; this is the rerun it requests, minus that reset."""
    from urllib.parse import urlencode

    from streamlit.runtime.scriptrunner import RerunData, get_script_run_ctx

    ctx = get_script_run_ctx()
    keep = {k: v for k, v in st.query_params.to_dict().items() if k in SIDEBAR} | {"head": str(st.session_state["head"])}
    st.session_state[OPENED] = keep
    ctx.script_requests.request_rerun(RerunData(query_string=urlencode(keep), page_script_hash=target._script_hash,
                                                context_info=ctx.context_info))
    st.empty()                                    # the next element: the runner acts on the rerun here


restore_opened_params()
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

st.sidebar.text_input("Results folder", default_results(), key="results_root", persist_state="session",
                      help="saved results of `headwise scan …` (searched recursively)")
heads = model.layout.all_heads()
if st.session_state.get("head") not in heads:
    st.session_state.pop("head", None)
st.sidebar.selectbox("Selected head (every page)", heads, key="head", format_func=str, bind="query-params",
                     help="click a cell of any head grid, or a row of a head table, to select it")

st.sidebar.toggle("A click on a head opens its card", key=OPENS_CARD, persist_state="session",
                  help="on: clicking a cell of any head grid (or a row of a head table) selects the head and opens "
                       "the Head card page; off: it selects the head and you stay on the page")

VIEWS = HERE / "views"
analyses = [st.Page(partial(analysis_page, a.name), title=a.title, url_path=a.name, icon=a.icon or None)
            for a in registry.analyses()]
card = st.Page(VIEWS / "head_card.py", title="Head card", icon=":material/badge:")
page = st.navigation({
    "Heads": [st.Page(VIEWS / "head_grid.py", title="Head atlas", icon=":material/grid_on:", default=True),
              st.Page(VIEWS / "top_heads.py", title="Top heads", icon=":material/leaderboard:"),
              card,
              st.Page(VIEWS / "token_view.py", title="Token view", icon=":material/text_fields:"),
              st.Page(VIEWS / "pattern_explorer.py", title="Pattern explorer", icon=":material/zoom_in:"),
              st.Page(VIEWS / "interventions.py", title="Interventions", icon=":material/science:")],
    "Analyses": analyses,
})
if st.session_state.pop("open_card", False) and page.url_path != card.url_path:
    open_page(card)                               # a click on a head (grids.OPENS_CARD): its card
run_page(page)
