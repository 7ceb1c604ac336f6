// Shared by the index and feature pages of a saewb dashboard bundle.
// Every string from the model or the corpus reaches the DOM as a text node (el() never
// parses HTML), so token strings like "</script>" stay text.
"use strict";

window.SAEWB = (() => {
  const data = () => JSON.parse(document.getElementById("saewb-data").textContent);

  /** el("a", {href, class, title, style: {...}}, child, ...): strings become text nodes. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "style") Object.assign(node.style, value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // Whitespace is shown with grey markers: newlines as ↵ (a context stays on its lines),
  // tabs as ⇥, and (in token chips, where a leading space matters) spaces as ·.
  const MARKS = { "\n": "↵", "\r": "␍", "\t": "⇥", " ": "·" };
  function tokenText(text, showSpaces) {
    const frag = document.createDocumentFragment();
    let plain = "";
    for (const ch of text) {
      if (MARKS[ch] && (ch !== " " || showSpaces)) {
        if (plain) frag.append(plain);
        plain = "";
        frag.append(el("span", { class: "ws" }, MARKS[ch]));
      } else plain += ch;
    }
    if (plain) frag.append(plain);
    return frag;
  }
  /** The visible form of a token (for title attributes). */
  const tokenLabel = (text) => JSON.stringify(text);
  const chip = (text, props) => el("span", Object.assign({ class: "chip", title: tokenLabel(text) }, props || {}), tokenText(text, true));
  const vocab = (id) => (window.SAEWB_VOCAB && id in SAEWB_VOCAB ? SAEWB_VOCAB[id] : `<id ${id}>`);

  function fmt(x, digits = 3) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(digits - 1);
    return Number(x.toPrecision(digits)).toString();
  }
  const pct = (x) => (x === null || x === undefined ? "–" : `${fmt(100 * x, 3)}%`);
  const int = (x) => Number(x).toLocaleString("en-US");

  /** Highlight colour for an activation as a share of the feature's max (0..1). */
  const heat = (share) => (share > 0 ? `rgba(255, 120, 20, ${Math.min(1, 0.12 + 0.88 * share).toFixed(3)})` : "");

  const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };
  const PLOT_LAYOUT = {
    margin: { l: 50, r: 12, t: 30, b: 42 }, font: { family: "system-ui, sans-serif", size: 12 },
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fafafa", bargap: 0.04,
  };
  function plot(div, traces, layout) {
    if (!window.Plotly) {
      div.append(el("p", { class: "muted" }, "plotly.min.js did not load: no chart."));
      return;
    }
    Plotly.newPlot(div, traces, Object.assign({}, PLOT_LAYOUT, layout), PLOT_CONFIG);
  }

  function showErrors() {
    const errors = window.SAEWB_ERRORS || [];
    if (!errors.length || !document.body) return;
    let banner = document.getElementById("saewb-errors");
    if (!banner) {
      banner = el("div", { id: "saewb-errors", class: "errors" });
      document.body.prepend(banner);
    }
    banner.replaceChildren(el("b", {}, "This page hit errors: "), errors.join(" | "));
  }
  document.addEventListener("DOMContentLoaded", showErrors);

  return { data, el, tokenText, tokenLabel, chip, vocab, fmt, pct, int, heat, plot, showErrors };
})();
