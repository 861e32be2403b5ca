"""Token view: the text with every token; hover or click a token to colour what it attends to and what
attends to it, for up to four heads side by side or the difference of two; short texts whole, long
ones through a window you move or jump (find a token). Rows are computed once per band and cached."""
import streamlit as st

from analyses.patterns import MAX_CELLS
from dashboards.common import DEFAULT_PROMPT, explorer_rows, get_model, model_name, open_explorer, reproduce
from dashboards.components import token_view_html
from dashboards.grids import heads_picker
from probe import HeadwiseError

model = get_model(model_name())
name = model_name()
st.title("Token view")
text = st.text_area("Text", DEFAULT_PROMPT, key="tv_text", height=90, bind="query-params")
heads = heads_picker("Heads (up to four)", "tv_heads", max_heads=4)
if not heads:
    st.info("Pick at least one head (the selected head is one click away: the + button).")
    st.stop()
try:
    ex = open_explorer(name, text)
except HeadwiseError as exc:
    st.error(str(exc))
    st.stop()
T = ex.n_tokens


def _jump(pos: int, size: int) -> None:
    st.session_state["tv_start"] = max(0, min(T - size, pos - size // 2))
    st.session_state["tv_focus"] = pos


c = st.columns([2, 2, 1])
find = c[0].text_input("Find a token (then jump to it)", "", key="tv_find", bind="query-params")
hits = ex.find(find) if find else []
if find and not hits:
    c[1].warning(f"{find!r} does not occur in the text.")
c = st.columns([1, 1, 2])
size = c[0].select_slider("Window (tokens)", [16, 32, 64, 128, MAX_CELLS], 64, key="tv_size", bind="query-params")
size = min(int(size), T)
if hits:
    cc = st.columns([2, 2, 1])
    pick = cc[0].selectbox(f"{len(hits)} match(es) of {find!r}: token position", hits, key="tv_hit")
    cc[1].button(f"Jump to {pick}", key="tv_jump", on_click=_jump, args=(int(pick), size))
if st.session_state.get("tv_start", 0) > max(0, T - size):
    st.session_state["tv_start"] = max(0, T - size)
start = c[1].number_input("Window start", 0, max(0, T - size), 0, key="tv_start", bind="query-params")
mode = c[2].radio("Show", ["side", "diff"], horizontal=True, key="tv_mode", bind="query-params",
                  format_func=lambda m: "side by side" if m == "side" else "difference of two heads",
                  disabled=len(heads) != 2)
start = int(start)
stop = min(T, start + size)
focus = st.session_state.get("tv_focus")
focus = focus - start if focus is not None and start <= focus < stop else None
st.caption(f"{T} tokens · window {start}..{stop - 1} · exact attention among the window's tokens "
           "(the mass a row puts before the window is shown with its top keys)")
rows = {l: explorer_rows(name, text, l, (start, stop), page="tv") for l in sorted({h.layer for h in heads})}
win = ex.token_window(heads, start, stop, rows=rows)
st.iframe(token_view_html(win, mode if len(heads) == 2 else "side", focus), height=560)
st.download_button("Token view as HTML (works offline)", token_view_html(win, mode, focus),
                   file_name=f"token_view_{'_'.join(map(str, heads))}.html", mime="text/html", on_click="ignore")
reproduce(f'''
from probe import load_model
from analyses.explorer import Explorer
from dashboards.components import token_view_html
from IPython.display import HTML
model = load_model({name!r})
ex = Explorer.open(model, {text!r})
win = ex.token_window({[str(h) for h in heads]!r}, {start}, {stop})
HTML(token_view_html(win))
''')
