// The rollout viewer's page script (megatron_hapo/viewer/page.py embeds it; no network, no library).
// DATA: {title, quantities: {name: [label, scale]}, centres: {name: value}, summaries: [row], panels: [panel]}.
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const state = { quantity: "entropy", group: "all", outcome: "all", minLen: 0, maxLen: Infinity, prompt: "" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "-";
  return typeof value === "number" ? value.toFixed(digits) : String(value);
}

function summaryTable() {
  const columns = ["run", "step", "responses", "groups", "reward", "accuracy", "length", "entropy",
    "temperature", "abs_advantage", "eps_high", "ratio", "skipped_lines"];
  const head = el("tr", {}, ...columns.map((c) => el("th", {}, c)));
  const rows = DATA.summaries.map((row) => el("tr", {},
    ...columns.map((c) => el("td", {}, typeof row[c] === "number" && !Number.isInteger(row[c]) ? fmt(row[c]) : row[c] ?? "-"))));
  return el("table", { class: "summary" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

function shown(response) {
  const length = response.tokens.length;
  if (state.group !== "all" && String(response.group) !== state.group) return false;
  if (state.outcome === "correct" && !response.correct) return false;
  if (state.outcome === "wrong" && response.correct) return false;
  if (state.prompt && !response.prompt.includes(state.prompt)) return false;
  return length >= state.minLen && length <= state.maxLen;
}

function colourScale() {
  const name = state.quantity;
  const values = [];
  for (const panel of DATA.panels)
    for (const response of panel.responses.filter(shown))
      for (const v of response.values[name] || []) if (v !== null) values.push(v);
  values.sort((a, b) => a - b);
  const pick = (q) => (values.length ? values[Math.min(values.length - 1, Math.floor(q * values.length))] : 0);
  const low = pick(0.02), high = pick(0.98);
  const diverging = DATA.quantities[name][1] === "diverging";
  const centre = DATA.centres[name] ?? 0;
  const span = diverging ? Math.max(Math.abs(low - centre), Math.abs(high - centre)) || 1 : high - low || 1;
  return (v) => {
    if (v === null || v === undefined) return "transparent";
    if (diverging) {
      const t = Math.max(-1, Math.min(1, (v - centre) / span));
      return t >= 0 ? `rgba(214, 39, 40, ${0.85 * t})` : `rgba(31, 119, 180, ${-0.85 * t})`;
    }
    const t = Math.max(0, Math.min(1, (v - low) / span));
    return `rgba(255, 127, 14, ${0.05 + 0.85 * t})`;
  };
}

// A token as drawn: a newline or tab keeps the layout and gets a visible mark (its exact text is in the hover).
function shownText(text) {
  return text.replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u2192\t");
}

function tokenTitle(response, i) {
  const lines = [`token ${i}: ${JSON.stringify(response.tokens[i])}`];
  for (const [name, values] of Object.entries(response.values)) lines.push(`${name}=${values[i]}`);
  return lines.join("\n");
}

function responseBox(response, colour) {
  const mark = response.correct ? "correct" : "wrong";
  const head = el("div", { class: "rhead" },
    `group ${response.group} \u00b7 sample ${response.sample} \u00b7 reward ${fmt(response.reward)} \u00b7 `,
    el("span", { class: mark }, mark),
    ` \u00b7 ${response.tokens.length} token${response.tokens.length === 1 ? "" : "s"} \u00b7 ${response.finish_reason}`);
  const values = response.values[state.quantity] || [];
  const mask = response.values.loss_mask || [];
  const tokens = response.tokens.map((text, i) => el("span", {
    class: mask[i] === 0 ? "tok unmasked" : "tok",
    style: `background:${colour(values[i])}`,
    title: tokenTitle(response, i),
    "data-i": i,
  }, shownText(text)));
  return el("div", { class: "response", "data-group": response.group },
    head, el("div", { class: "prompt" }, response.prompt), el("div", { class: "tokens" }, ...tokens));
}

function histogramSvg(name, hist) {
  const width = 260, height = 70;
  if (!hist.counts.length) return el("div", { class: "hist" }, `${name}: no values`);
  const top = Math.max(...hist.counts);
  const bar = width / hist.counts.length;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  hist.counts.forEach((count, i) => {
    const rect = document.createElementNS(ns, "rect");
    const h = (height - 4) * count / top;
    rect.setAttribute("x", i * bar); rect.setAttribute("y", height - h);
    rect.setAttribute("width", bar - 1); rect.setAttribute("height", h);
    rect.setAttribute("class", "bar");
    svg.append(rect);
  });
  const range = `${fmt(hist.edges[0])} .. ${fmt(hist.edges[hist.edges.length - 1])}`;
  return el("div", { class: "hist" }, el("div", {}, `${name} (${range})`), svg);
}

function panelNode(panel, colour) {
  const forking = el("table", { class: "forking" },
    el("tr", {}, el("th", {}, "forking token"), el("th", {}, "count"), el("th", {}, "share"), el("th", {}, "mean H")),
    ...panel.forking.map((f) => el("tr", {}, el("td", {}, el("code", {}, f.token)), el("td", {}, f.count),
      el("td", {}, fmt(f.share, 2)), el("td", {}, fmt(f.mean_entropy)))));
  const responses = panel.responses.filter(shown);
  return el("section", { class: "panel" },
    el("h2", {}, `${panel.run} \u00b7 step ${panel.step}`),
    el("div", { class: "stats" },
      `${responses.length} of ${panel.responses.length} responses \u00b7 reward ${fmt(panel.summary.reward)} \u00b7 ` +
      `accuracy ${fmt(panel.summary.accuracy)}`),
    el("div", { class: "side" }, forking,
      el("div", {}, histogramSvg("entropy", panel.histograms.entropy),
        histogramSvg("temperature", panel.histograms.temperature))),
    ...responses.map((r) => responseBox(r, colour)));
}

function renderPanels() {
  const colour = colourScale();
  const root = document.getElementById("panels");
  root.replaceChildren(...DATA.panels.map((p) => panelNode(p, colour)));
  root.style.gridTemplateColumns = `repeat(${DATA.panels.length}, minmax(0, 1fr))`;
  const [label] = DATA.quantities[state.quantity];
  document.getElementById("legend").textContent = `colour: ${label}; hover a token for its exact values`;
}

function controls() {
  const quantity = el("select", { id: "quantity" }, ...Object.entries(DATA.quantities)
    .filter(([name]) => DATA.panels.some((p) => p.responses.some((r) => name in r.values)))
    .map(([name, [label]]) => el("option", { value: name }, label)));
  const groups = [...new Set(DATA.panels.flatMap((p) => p.responses.map((r) => r.group)))].sort((a, b) => a - b);
  const group = el("select", { id: "group" }, el("option", { value: "all" }, "all groups"),
    ...groups.map((g) => el("option", { value: String(g) }, `group ${g}`)));
  const outcome = el("select", { id: "outcome" }, ...["all", "correct", "wrong"].map((o) => el("option", { value: o }, o)));
  const minLen = el("input", { id: "min-len", type: "number", min: 0, placeholder: "min length" });
  const maxLen = el("input", { id: "max-len", type: "number", min: 0, placeholder: "max length" });
  const prompt = el("input", { id: "prompt", type: "search", placeholder: "prompt contains" });
  quantity.onchange = () => { state.quantity = quantity.value; renderPanels(); };
  group.onchange = () => { state.group = group.value; renderPanels(); };
  outcome.onchange = () => { state.outcome = outcome.value; renderPanels(); };
  minLen.oninput = () => { state.minLen = Number(minLen.value) || 0; renderPanels(); };
  maxLen.oninput = () => { state.maxLen = maxLen.value === "" ? Infinity : Number(maxLen.value); renderPanels(); };
  prompt.oninput = () => { state.prompt = prompt.value; renderPanels(); };
  return el("div", { class: "controls" }, "colour by ", quantity, group, outcome, minLen, maxLen, prompt,
    el("span", { id: "legend" }));
}

document.getElementById("summary").append(summaryTable());
document.getElementById("controls").append(controls());
renderPanels();
document.body.setAttribute("data-rendered", "1");
