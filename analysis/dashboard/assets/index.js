// The bundle's index: summary, log-density histogram, and a searchable, sortable feature table.
// State lives in the URL (?q=...&sort=f1&desc=1), so a filtered view is a link.
"use strict";

(() => {
  const { el, fmt, pct, int, chip, plot } = SAEWB;
  const D = SAEWB.data();
  const S = D.summary;
  const app = document.getElementById("app");
  const ROW_LIMIT = 1000; // rows drawn before "show all" (keeps very wide SAEs responsive)

  const at = Object.fromEntries(D.columns.map((name, i) => [name, i]));
  const rows = D.rows.map((r) => {
    const row = Object.fromEntries(D.columns.map((name) => [name, r[at[name]]]));
    row.text = [row.label || "", row.name || "", row.kind || "", ...row.top_tokens].join("\n").toLowerCase();
    return row;
  });
  const COLUMNS = [
    { key: "id", title: "feature", num: true },
    { key: "log10_density", title: "log10 density", num: true },
    { key: "max", title: "max act", num: true },
    { key: "mean", title: "mean act", num: true },
    { key: "label", title: "label", labels: true },
    { key: "strong_f1", title: "strong F1", labels: true, num: true },
    { key: "f1", title: "F1 (all)", labels: true, num: true },
    { key: "top_tokens", title: "top tokens", sortable: false },
  ].filter((c) => D.labelled || !c.labels); // no empty label columns in a bundle built without labels

  const params = new URLSearchParams(location.search);
  const state = {
    q: params.get("q") || "",
    sort: COLUMNS.some((c) => c.key === params.get("sort")) ? params.get("sort") : "id",
    desc: params.get("desc") === "1",
    all: false,
  };

  // -------------------------------------------------------------- header and summary
  const meta = D.meta;
  app.append(
    el("header", {},
      el("h1", {}, "Feature atlas"),
      el("p", { class: "muted" },
        [meta.model_name, meta.hook_name].filter(Boolean).join(" · "),
        ` · ${int(meta.d_sae)} features · ${int(meta.n_tokens)} held-out tokens`,
        meta.sae_path ? ` · SAE ${meta.sae_path}` : "")));

  const link = (id) => (rows.some((r) => r.id === id) ? el("a", { href: `features/${id}.html` }, String(id)) : String(id));
  const links = (ids, max = 30) => [
    ...ids.slice(0, max).flatMap((id, k) => (k ? [", ", link(id)] : [link(id)])),
    ids.length > max ? ` … (${ids.length - max} more)` : "",
  ];
  const card = (title, value, ...detail) => el("div", { class: "card" }, el("div", { class: "card-title" }, title), el("div", { class: "card-value" }, value), el("div", { class: "card-detail" }, ...detail));
  const cards = [
    card("live features", int(S.n_features - S.dead), `of ${int(S.n_features)}; ${int(rows.length)} in this bundle`),
    card("dead", int(S.dead), `no activation on ${int(S.n_tokens)} tokens`),
    card("dense", int(S.dense), `fire on > ${fmt(100 * S.dense_threshold)}% of tokens`, S.dense ? el("div", {}, ...links(S.dense_features)) : ""),
  ];
  const U = S.ultralow;
  cards.push(U
    ? card("ultralow-density cluster", int(U.n_features), "density below 10", el("sup", {}, fmt(U.log10_density_below)),
      U.mean_decoder_cosine !== undefined ? el("div", {}, `mean decoder cosine ${fmt(U.mean_decoder_cosine)} (random live features: ${fmt(U.mean_decoder_cosine_random_live)})`) : "",
      el("div", {}, ...links(U.features)))
    : card("ultralow-density cluster", "none", "no second mode a decade below the main one"));
  const C = D.label_card;
  if (C) { // the labels' summary (report part of the held-out text): headline, a table by kind, examples
    const known = (v) => v !== null && v !== undefined;
    const kinds = C.kinds.length
      ? el("table", { class: "card-table" },
        el("thead", {}, el("tr", {}, el("th", {}, "label kind"), el("th", { class: "num" }, "strong F1 ≥ 0.5"), el("th", { class: "num" }, "all F1 ≥ 0.5"))),
        el("tbody", {}, ...C.kinds.map(([kind, strong, all]) => el("tr", {}, el("td", {}, kind), el("td", { class: "num" }, int(strong)), el("td", { class: "num" }, int(all))))))
      : "";
    const labelCard = card("live features with a compact label", pct(C.strong_share),
      `strong-firing F1 ≥ 0.5 on held-out text (${pct(C.all_share)} all-firing), of ${known(C.live_features) ? int(C.live_features) : "–"} live features`,
      kinds,
      C.unexplained_examples.length
        ? el("div", {}, `unexplained${known(C.unexplained) ? ` (${int(C.unexplained)})` : ""}, e.g. `, ...links(C.unexplained_examples, 12))
        : "");
    labelCard.classList.add("wide");
    cards.push(labelCard);
  }
  app.append(el("section", { class: "cards" }, ...cards));

  // -------------------------------------------------------------- density histogram
  const histDiv = el("div", { class: "plot", id: "density-plot" });
  app.append(el("section", {}, el("h2", {}, "Feature density"), el("p", { class: "muted" },
    `log10 of the share of held-out tokens each live feature fires on (${int(D.log10_density.length)} live features; dead ones are left out).`), histDiv));
  const vline = (x, text, color) => ({
    shape: { type: "line", x0: x, x1: x, yref: "paper", y0: 0, y1: 1, line: { color, dash: "dot", width: 1.5 } },
    note: { x, yref: "paper", y: 1, text, showarrow: false, xanchor: "left", yanchor: "top", font: { color, size: 11 } },
  });
  const lines = [vline(Math.log10(S.dense_threshold), " dense", "#c0392b"), vline(-Math.log10(S.n_tokens), " fired once", "#7f8c8d")];
  if (U) lines.push(vline(U.log10_density_below, " ultralow cluster", "#8e44ad"));
  plot(histDiv, [{ type: "histogram", x: D.log10_density, xbins: { size: 0.1 }, marker: { color: "#e67e22" }, hovertemplate: "log10 density %{x}<br>%{y} features<extra></extra>" }], {
    height: 270, xaxis: { title: { text: "log10 density" } }, yaxis: { title: { text: "features" } },
    shapes: lines.map((l) => l.shape), annotations: lines.map((l) => l.note),
  });

  // -------------------------------------------------------------- the table
  const search = el("input", { id: "search", type: "search", placeholder: "search labels, top tokens or feature ids (all words must match)", value: state.q, autocomplete: "off" });
  const count = el("span", { id: "count", class: "muted" });
  const tbody = el("tbody");
  const headRow = el("tr");
  const table = el("table", { id: "features", class: "features" }, el("thead", {}, headRow), tbody);
  const more = el("p");
  app.append(el("section", {}, el("h2", {}, "Features"), el("div", { class: "toolbar" }, search, count), table, more));

  for (const c of COLUMNS) {
    const th = el("th", { dataset: { key: c.key }, class: `${c.sortable === false ? "" : "sortable"}${c.num ? " num" : ""}` }, c.title);
    if (c.sortable !== false) th.addEventListener("click", () => {
      state.desc = state.sort === c.key ? !state.desc : c.key !== "id" && c.key !== "label";
      state.sort = c.key;
      update();
    });
    headRow.append(th);
  }

  function matches(row, terms) {
    return terms.every((term) => row.text.includes(term) || (/^#?\d+$/.test(term) && row.id === Number(term.replace("#", ""))));
  }
  function compare(a, b) {
    const x = a[state.sort], y = b[state.sort];
    if (x === y) return a.id - b.id;
    if (x === null || x === undefined) return 1; // missing values last, whatever the direction
    if (y === null || y === undefined) return -1;
    const order = typeof x === "string" ? x.localeCompare(y) : x - y;
    return state.desc ? -order : order;
  }
  function f1Cell(v) {
    if (v === null || v === undefined) return el("td", { class: "num" }, "");
    return el("td", { class: "num" }, el("span", { class: "f1", style: { background: `rgba(39, 174, 96, ${(0.1 + 0.6 * v).toFixed(2)})` } }, v.toFixed(2)));
  }
  function renderRow(r) {
    const missing = (x) => x === null || x === undefined;
    const cells = {
      id: el("td", { class: "num" }, el("a", { href: `features/${r.id}.html` }, String(r.id))),
      log10_density: el("td", { class: "num" }, missing(r.log10_density) ? "dead" : r.log10_density.toFixed(2)),
      max: el("td", { class: "num" }, fmt(r.max)),
      mean: el("td", { class: "num" }, fmt(r.mean)),
      label: el("td", { class: "label" }, missing(r.name) ? "" : el("div", { class: "name" }, r.name),
        missing(r.label) ? el("span", { class: "muted" }, "–") : r.label, r.kind ? el("span", { class: "kind" }, r.kind) : ""),
      strong_f1: f1Cell(r.strong_f1),
      f1: f1Cell(r.f1),
      top_tokens: el("td", { class: "tokens" }, ...r.top_tokens.map((t) => chip(t))),
    };
    return el("tr", { dataset: { feature: r.id }, class: missing(r.log10_density) ? "dead" : "" }, ...COLUMNS.map((c) => cells[c.key]));
  }

  function update() {
    const terms = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = rows.filter((r) => matches(r, terms)).sort(compare);
    const drawn = state.all ? shown : shown.slice(0, ROW_LIMIT);
    tbody.replaceChildren(...drawn.map(renderRow));
    count.textContent = `${int(shown.length)} of ${int(rows.length)} features`;
    more.replaceChildren(drawn.length < shown.length
      ? el("button", { onclick: () => { state.all = true; update(); } }, `show all ${int(shown.length)} rows (${int(drawn.length)} drawn)`)
      : "");
    for (const th of headRow.children) {
      th.classList.toggle("sorted", th.dataset.key === state.sort);
      th.dataset.dir = th.dataset.key === state.sort ? (state.desc ? "▼" : "▲") : "";
    }
    const url = new URLSearchParams();
    if (state.q) url.set("q", state.q);
    if (state.sort !== "id") url.set("sort", state.sort);
    if (state.desc) url.set("desc", "1");
    try { history.replaceState(null, "", `${location.pathname}${url.toString() ? "?" + url : ""}`); } catch (e) { /* some browsers refuse on file:// */ }
  }
  search.addEventListener("input", () => { state.q = search.value; state.all = false; update(); });
  update();
})();
