// headwise token view: hover or click a token to colour what it attends to (its row) and what
// attends to it (its column), for up to four heads side by side or the difference of two.
// Self-contained (no network): the page that embeds it sets window.HEADWISE_TOKENS before this runs.
(function () {
  const D = window.HEADWISE_TOKENS;
  const root = document.getElementById("hw-root");
  const W = D.tokens.length, n = D.heads.length;
  const weights = D.weights.map(b64 => {              // uint16 quantised rows: [W][W] per head
    const bin = atob(b64), u = new Uint16Array(bin.length / 2);
    for (let i = 0; i < u.length; i++) u[i] = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    return u;
  });
  const w = (h, q, k) => weights[h][q * W + k] / 65535;
  let mode = D.mode || "side";            // "side": one column per head; "diff": head 0 minus head 1
  let dir = "to";                          // "to": the token's row; "from": the tokens attending to it
  let locked = null, current = null;

  const bar = document.createElement("div");
  bar.className = "hw-bar";
  bar.innerHTML = `<label><input type="radio" name="dir" value="to" checked> attends to</label>
    <label><input type="radio" name="dir" value="from"> attended by</label>` +
    (n === 2 ? `<span class="hw-sep"></span><label><input type="radio" name="mode" value="side" ${mode === "side" ? "checked" : ""}> side by side</label>
    <label><input type="radio" name="mode" value="diff" ${mode === "diff" ? "checked" : ""}> difference ${D.heads[0]} − ${D.heads[1]}</label>` : "") +
    `<span class="hw-status" id="hw-status">hover a token; click to keep it</span>`;
  root.appendChild(bar);
  const grid = document.createElement("div");
  grid.className = "hw-grid";
  root.appendChild(grid);
  const status = () => document.getElementById("hw-status");

  function show(tok) {
    return tok.replace(/\n/g, "↵\n").replace(/\t/g, "→").replace(/ /g, "\u00a0") || "∅";
  }
  function build() {
    grid.innerHTML = "";
    const cols = mode === "diff" ? [["diff", `${D.heads[0]} − ${D.heads[1]}`]] : D.heads.map((h, i) => [i, h]);
    grid.style.gridTemplateColumns = `repeat(${cols.length}, minmax(0, 1fr))`;
    for (const [c, title] of cols) {
      const col = document.createElement("div");
      col.className = "hw-col";
      col.innerHTML = `<div class="hw-title">${title}</div>`;
      const text = document.createElement("div");
      text.className = "hw-text";
      D.tokens.forEach((t, i) => {
        const s = document.createElement("span");
        s.className = "hw-tok"; s.textContent = show(t); s.dataset.i = i; s.dataset.c = c;
        s.title = `${D.start + i}: ${JSON.stringify(t)}`;
        s.addEventListener("mouseenter", () => { if (locked === null) paint(i); });
        s.addEventListener("click", () => { locked = locked === i ? null : i; paint(i); });
        text.appendChild(s);
      });
      col.appendChild(text);
      col.appendChild(Object.assign(document.createElement("div"), {className: "hw-top"}));
      grid.appendChild(col);
    }
  }
  function value(c, i, j) {               // the weight shown on token j while token i is chosen
    const [q, k] = dir === "to" ? [i, j] : [j, i];
    if (k > q) return null;                // causal: a query never sees later keys
    return c === "diff" ? w(0, q, k) - w(1, q, k) : w(+c, q, k);
  }
  function colour(v, c) {
    if (v === null) return "transparent";
    if (c === "diff") {
      const a = Math.min(1, Math.abs(v) * 2);
      return v >= 0 ? `rgba(33,102,172,${a})` : `rgba(178,24,43,${a})`;
    }
    return dir === "to" ? `rgba(33,102,172,${Math.min(1, v * 1.5)})` : `rgba(230,120,20,${Math.min(1, v * 1.5)})`;
  }
  function paint(i) {
    current = i;
    for (const col of grid.children) {
      const spans = col.querySelectorAll(".hw-tok");
      const c = spans.length ? spans[0].dataset.c : null;
      const vals = [];
      spans.forEach((s, j) => {
        const v = value(c, i, j);
        s.style.background = colour(v, c);
        s.classList.toggle("hw-chosen", j === i);
        s.dataset.v = v === null ? "" : v.toFixed(4);
        if (v !== null) vals.push([j, v]);
      });
      vals.sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
      const where = dir === "to" ? "attends to" : "is attended by";
      let html = `<b>${D.start + i}:${esc(show(D.tokens[i]))}</b> ${where}: ` +
        vals.slice(0, 5).map(([j, v]) => `${D.start + j}:${esc(show(D.tokens[j]))} <code>${v.toFixed(3)}</code>`).join(", ");
      if (dir === "to" && c !== "diff" && D.outside) html += ` · before the window: <code>${D.outside[+c][i].toFixed(3)}</code>`;
      col.querySelector(".hw-top").innerHTML = html;
    }
    status().textContent = locked === null ? "hover a token; click to keep it" : `kept ${D.start + locked} (click it again to release)`;
  }
  function esc(t) { return t.replace(/[&<>]/g, ch => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"}[ch])); }
  bar.addEventListener("change", e => {
    if (e.target.name === "dir") dir = e.target.value;
    if (e.target.name === "mode") { mode = e.target.value; build(); }
    if (current !== null) paint(locked === null ? current : locked);
  });
  build();
  if (D.focus !== null && D.focus !== undefined) { locked = D.focus; paint(D.focus); }
})();
