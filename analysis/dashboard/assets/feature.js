// One feature's page, rendered from the JSON in #saewb-data and the shared vocab (assets/vocab.js).
"use strict";

(() => {
  const { el, fmt, pct, int, chip, vocab, tokenText, tokenLabel, heat, plot } = SAEWB;
  const D = SAEWB.data();
  const app = document.getElementById("app");
  const section = (title, ...children) => el("section", {}, el("h2", {}, title), ...children);
  const note = (...text) => el("p", { class: "muted" }, ...text);

  // -------------------------------------------------------------- navigation and header
  const jump = el("input", { type: "number", min: 0, max: D.n_features - 1, placeholder: "feature #", class: "jump" });
  jump.addEventListener("keydown", (e) => { if (e.key === "Enter" && jump.value !== "") location.href = `${Number(jump.value)}.html`; });
  app.append(el("nav", {},
    el("a", { href: "../index.html" }, "← all features"),
    D.prev !== null ? el("a", { href: `${D.prev}.html` }, `‹ ${D.prev}`) : "",
    D.next !== null ? el("a", { href: `${D.next}.html` }, `${D.next} ›`) : "",
    jump));

  const L = D.label;
  app.append(el("header", {},
    el("h1", {}, `Feature ${D.id}`, L ? el("span", { class: "headline-label" }, L.name ? `${L.name}: ${L.label}` : L.label) : ""),
    el("p", { class: "muted" }, [D.meta.model_name, D.meta.hook_name].filter(Boolean).join(" · "))));

  if (D.dead) {
    app.append(el("div", { class: "dead-note" },
      `Dead: feature ${D.id} never fired on the ${int(D.n_tokens)} held-out tokens of the atlas. `,
      "Its decoder direction still exists; what it would write is below."));
    app.append(el("div", { class: "columns" }, el("div", {}, logitEffects()), el("div", {}, neighbours("decoder", "Nearest by decoder cosine", "cosine"))));
    return;
  }

  app.append(el("div", { class: "stats" },
    stat("density", `${pct(D.density)}`, `log10 ${fmt(Math.log10(D.density))}`),
    stat("fires on", int(D.fire_count), `of ${int(D.n_tokens)} tokens`),
    stat("max activation", fmt(D.max, 4), "highlight scale"),
    stat("mean activation", fmt(D.mean, 4), "when firing")));

  // -------------------------------------------------------------- contexts
  /** One context window: tokens highlighted by activation / max activation; hover for values. */
  function example(ex) {
    const ctx = el("span", { class: "ctx" });
    ex.tokens.forEach((id, k) => {
      const act = ex.acts[k], text = vocab(id);
      ctx.append(el("span", {
        class: `tok${act > 0 ? " hot" : ""}${k === ex.max_index ? " peak" : ""}`,
        style: act > 0 ? { background: heat(act / D.max) } : null,
        title: `${tokenLabel(text)}  activation ${fmt(act, 4)}`,
        dataset: { act },
      }, tokenText(text, false)));
    });
    return el("div", { class: "ex" }, el("span", { class: "ex-val", title: `context ${ex.context}` }, fmt(ex.value)), ctx);
  }
  const examples = (list) => (list.length ? el("div", { class: "examples" }, ...list.map(example)) : note("none"));

  const left = el("div", { class: "main-col" });
  const right = el("div", { class: "side-col" });
  app.append(el("div", { class: "columns" }, left, right));

  left.append(section(`Top activations (${D.top.length})`,
    note(`The contexts with the largest maxima, a window around each maximum (boxed). Highlight ∝ activation / max activation (${fmt(D.max)}); hover a token for its value.`),
    examples(D.top)));

  const n = D.quantiles.length;
  left.append(section("Activation quantiles",
    note(`A uniform random sample of ${D.quantiles.length ? int(D.quantiles[0].n_sample) : 0} activating contexts, sorted by their maximum and split into ${n} quantile groups, strongest first.`),
    ...D.quantiles.map((q, k) => {
      const values = q.examples.map((e) => e.value);
      return el("div", { class: "quantile" },
        el("h3", {}, `Quantile ${k + 1} of ${n}`, el("span", { class: "muted" },
          ` · sample ranks ${q.rank_from + 1}–${q.rank_to + 1} · max ${fmt(Math.min(...values))}–${fmt(Math.max(...values))}`)),
        examples(q.examples));
    })));
  left.append(section("Random activating contexts", note("Other contexts of the same sample: typical rather than extreme behaviour."), examples(D.random)));

  // -------------------------------------------------------------- side column
  right.append(labelCard());

  const histDiv = el("div", { class: "plot", id: "activation-histogram" });
  right.append(section("Activation histogram", histDiv));
  const h = D.hist;
  plot(histDiv, [{
    type: "scatter", mode: "lines", x: h.edges, y: [...h.counts, h.counts[h.counts.length - 1]],
    line: { shape: "hv", color: "#e67e22" }, fill: "tozeroy", fillcolor: "rgba(230,126,34,0.35)",
    hovertemplate: "from %{x:.3g}: %{y} tokens<extra></extra>",
  }], { height: 220, xaxis: { type: "log", dtick: "D2", title: { text: "activation (log axis)" } }, yaxis: { title: { text: "tokens" } } });

  right.append(section("Tokens it fires on",
    table(["token", "fires", "of its occurrences", "mean act"], D.tokens.map(([id, count, mean, freq]) => [
      chip(vocab(id)), int(count), freq ? pct(count / freq) : "–", fmt(mean)]))));
  right.append(logitEffects());
  right.append(neighbours("decoder", "Nearest by decoder cosine", "cosine"));
  right.append(neighbours("coact", "Nearest by co-activation", "Jaccard"));

  // -------------------------------------------------------------- helpers
  function stat(title, value, detail) {
    return el("div", { class: "stat" }, el("div", { class: "card-title" }, title), el("div", { class: "stat-value" }, value), el("div", { class: "muted" }, detail));
  }

  function table(headers, rows, props) {
    return el("table", Object.assign({ class: "small" }, props || {}),
      el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))));
  }

  function labelCard() {
    if (!L) return section("Label", note(D.label === null ? "No label: none loaded for this feature (pass labels.json to the dashboard)." : ""));
    const score = (name, value, digits) => el("div", { class: "score" }, el("div", { class: "card-title" }, name), el("div", { class: "stat-value" }, value === null || value === undefined ? "–" : fmt(value, digits || 3)));
    const quartiles = L.recall_by_quartile || L.recall_by_quantile || [];
    const names = ["< ¼ max", "¼–½", "½–¾", "≥ ¾ max"];
    const S = L.selection || {};
    const card = el("div", { class: "label-card" },
      L.name ? el("div", { class: "name" }, L.name) : "",
      el("div", { class: "label-text" }, L.label, el("span", { class: "kind" }, L.kind), L.compact === false ? el("span", { class: "kind" }, "lookup table") : ""),
      el("div", { class: "card-title" }, "strong firings (activation > ¼ max; weaker firings left out)"),
      el("div", { class: "scores" }, score("F1", L.strong_f1), score("precision", L.strong_precision), score("recall", L.strong_recall)),
      el("div", { class: "card-title" }, "all firings (activation > 0)"),
      el("div", { class: "scores" }, score("F1", L.f1), score("precision", L.precision), score("recall", L.recall),
        score("FPR random", L.fpr_random), score("FPR hard", L.fpr_hard)),
      quartiles.length ? el("div", { class: "quartiles" }, el("div", { class: "card-title" }, "recall by activation (share of max)"),
        ...quartiles.map((r, k) => el("div", { class: "bar-row" }, el("span", { class: "bar-name" }, names[k] || `q${k + 1}`),
          el("span", { class: "bar" }, el("span", { class: "bar-fill", style: { width: `${r === null ? 0 : 100 * r}%` } })),
          el("span", { class: "bar-value" }, r === null ? "no fires" : fmt(r))))) : "",
      L.selection ? note(`Chosen on the selection part of the held-out text (strong F1 ${fmt(S.strong_f1)}, F1 ${fmt(S.f1)}); ` +
        `the scores above are from the report part, which the choice never saw${L.held_out_fires !== undefined ? ` (${int(L.held_out_fires)} firing positions)` : ""}.`)
        : L.held_out_fires !== undefined ? note(`Scored on held-out text the label was not made from (${int(L.held_out_fires)} firing positions).`) : "");
    const candidates = (L.candidates || []).map((c) => [el("span", { class: "kind" }, c.kind), el("span", { class: "cand" }, c.label),
      c.compact === false ? "table" : "", fmt(c.strong_f1), fmt(c.f1), fmt(c.precision), fmt(c.recall), fmt((c.selection || {}).strong_f1)]);
    return section("Label", card, candidates.length > 1 ? el("details", {}, el("summary", {}, `all ${candidates.length} candidate labels`),
      table(["kind", "label", "", "strong F1", "F1", "P", "R", "strong F1 (selection)"], candidates)) : "");
  }

  function logitEffects() {
    const side = (title, rows, cls) => el("div", {}, el("h3", {}, title),
      table(["token", "logit"], rows.map(([id, v]) => [chip(vocab(id)), el("span", { class: cls }, (v > 0 ? "+" : "") + fmt(v))])));
    return section("Logit effects", note("W_dec through the final norm's scale and the unembedding."),
      el("div", { class: "two" }, side("promotes", D.logits.top, "pos"), side("suppresses", D.logits.bottom, "neg")));
  }

  function neighbours(kind, title, scoreName) {
    const list = D.neighbours[kind];
    if (!list.length) return section(title, note("not computed for this atlas"));
    return section(title, table(["feature", scoreName, "label"], list.map((nb) => [
      nb.page ? el("a", { href: `${nb.id}.html` }, String(nb.id)) : String(nb.id),
      fmt(nb.score),
      nb.label === null || nb.label === undefined ? el("span", { class: "muted" }, "–") : el("span", {}, nb.label, nb.f1 !== null && nb.f1 !== undefined ? el("span", { class: "muted" }, ` F1 ${fmt(nb.f1, 2)}`) : ""),
    ])));
  }
})();
