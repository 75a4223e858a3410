// A job's charts per round, drawn with plotly.js (served by the aggregator, loaded on first use).

import { h } from "./dom.js";
import { byId, globalScores, latestAttempts, roundBytes, roundSeconds, siteName } from "./model.js";

const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"];
const FONT = { family: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size: 12, color: "#1f2937" };
const CONFIG = { displayModeBar: false, responsive: true };

let plotly = null;

/** plotly.js, added to the page once (same origin, as the Content-Security-Policy requires). */
function loadPlotly() {
  if (!plotly) {
    plotly = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = "/dashboard/assets/plotly.min.js";
      script.addEventListener("load", () => resolve(window.Plotly));
      script.addEventListener("error", () => {
        plotly = null;
        reject(new Error("could not load plotly.js"));
      });
      document.head.append(script);
    });
  }
  return plotly;
}

function baseLayout(extra) {
  return {
    font: FONT,
    height: 300,
    margin: { l: 56, r: 60, t: 16, b: 44 },
    paper_bgcolor: "#ffffff",
    plot_bgcolor: "#ffffff",
    showlegend: true,
    legend: { orientation: "h", x: 0, y: 1.02, xanchor: "left", yanchor: "bottom", font: { size: 11 } },
    xaxis: { title: { text: "round" }, dtick: 1, tickformat: "d", gridcolor: "#eef0f3", zeroline: false },
    hovermode: "x unified",
    ...extra,
  };
}

/** Only the lines that have a point to draw, so the legend names nothing that is not there. */
function drawn(traces) {
  return traces.filter((trace) => trace.y.some((value) => typeof value === "number" && Number.isFinite(value)));
}

function noData(layout, text) {
  return {
    ...layout,
    xaxis: { ...layout.xaxis, visible: false },
    yaxis: { visible: false },
    yaxis2: { visible: false, overlaying: "y" },
    annotations: [{ text, showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5, font: { color: "#6b7280" } }],
  };
}

/** Global accuracy and loss of each published round's model, weighted by the sites' validation rows. */
function scoresChart(rounds) {
  const published = latestAttempts(rounds).filter((r) => r.state === "published" && r.evaluations.length);
  const x = published.map((r) => r.number);
  const scores = published.map(globalScores);
  const layout = baseLayout({
    yaxis: { title: { text: "accuracy" }, range: [0, 1.02], tickformat: ".0%", gridcolor: "#eef0f3" },
    yaxis2: {
      title: { text: "loss" },
      overlaying: "y",
      side: "right",
      rangemode: "tozero",
      tickmode: "auto",
      tickformat: ".2f",
      showgrid: false,
    },
  });
  if (!x.length) return [[], noData(layout, "no evaluated round yet")];
  return [
    drawn([
      {
        x,
        y: scores.map((s) => s.accuracy),
        name: "accuracy (sample-weighted)",
        type: "scatter",
        mode: "lines+markers",
        line: { color: PALETTE[0], width: 2.5 },
        hovertemplate: "%{y:.1%}",
      },
      {
        x,
        y: scores.map((s) => s.loss),
        name: "loss",
        type: "scatter",
        mode: "lines+markers",
        yaxis: "y2",
        line: { color: PALETTE[1], width: 2, dash: "dot" },
        hovertemplate: "%{y:.3f}",
      },
    ]),
    layout,
  ];
}

/** ε each site reported with its upload, per round, against the budget its agent reports. */
function epsilonChart(rounds, sites) {
  const sitesById = byId(sites);
  const bySite = new Map();
  for (const round of latestAttempts(rounds)) {
    for (const submission of round.submissions) {
      if (typeof submission.metrics.epsilon !== "number") continue;
      if (!bySite.has(submission.site_id)) bySite.set(submission.site_id, { x: [], y: [] });
      bySite.get(submission.site_id).x.push(round.number);
      bySite.get(submission.site_id).y.push(submission.metrics.epsilon);
    }
  }
  const layout = baseLayout({
    yaxis: { title: { text: "ε spent (cumulative)" }, rangemode: "tozero", gridcolor: "#eef0f3" },
  });
  if (!bySite.size) return [[], noData(layout, "no upload yet")];
  const allX = [...bySite.values()].flatMap((series) => series.x);
  const span = [Math.min(...allX) - 0.25, Math.max(...allX) + 0.25];
  const traces = [];
  [...bySite.keys()]
    .sort((a, b) => siteName(sitesById, a).localeCompare(siteName(sitesById, b)))
    .forEach((siteId, index) => {
      const color = PALETTE[index % PALETTE.length];
      const name = siteName(sitesById, siteId);
      traces.push({
        ...bySite.get(siteId),
        name,
        legendgroup: siteId,
        type: "scatter",
        mode: "lines+markers",
        line: { color, width: 2.5 },
        hovertemplate: `${name}: ε %{y:.2f}<extra></extra>`,
      });
      const budget = sitesById.get(siteId)?.agent?.privacy?.max_epsilon;
      if (typeof budget === "number") {
        traces.push({
          x: span,
          y: [budget, budget],
          name: `${name} budget`,
          legendgroup: siteId,
          showlegend: false,
          type: "scatter",
          mode: "lines",
          line: { color, width: 1.5, dash: "dash" },
          hovertemplate: `${name} budget: ε %{y:.2f}<extra></extra>`,
        });
      }
    });
  return [traces, { ...layout, xaxis: { ...layout.xaxis, range: span } }];
}

/** How long each attempt took and how many encrypted bytes the sites uploaded to it. */
function costChart(rounds) {
  const attempts = [...rounds].sort((a, b) => a.number - b.number || a.attempt - b.attempt);
  const finished = attempts.filter((r) => roundSeconds(r) !== null);
  const label = (r) => (r.attempt > 1 ? `${r.number} (try ${r.attempt})` : String(r.number));
  const bytes = attempts.map(roundBytes);
  const [unit, scale] = Math.max(0, ...bytes) >= 1e6 ? ["MB", 1e6] : ["kB", 1e3];
  const layout = baseLayout({
    xaxis: { title: { text: "round" }, type: "category", gridcolor: "#eef0f3" },
    yaxis: { title: { text: `${unit} received` }, rangemode: "tozero", gridcolor: "#eef0f3" },
    yaxis2: {
      title: { text: "seconds" },
      overlaying: "y",
      side: "right",
      rangemode: "tozero",
      tickmode: "auto",
      showgrid: false,
    },
    bargap: 0.45,
  });
  return [
    drawn([
      {
        x: attempts.map(label),
        y: bytes.map((value) => value / scale),
        name: `${unit} received`,
        type: "bar",
        marker: { color: "#93c5fd" },
        hovertemplate: `%{y:.1f} ${unit}`,
      },
      {
        x: finished.map(label),
        y: finished.map(roundSeconds),
        name: "duration (s)",
        type: "scatter",
        mode: "lines+markers",
        yaxis: "y2",
        line: { color: PALETTE[4], width: 2 },
        hovertemplate: "%{y:.1f} s",
      },
    ]),
    layout,
  ];
}

function panel(id, title, note) {
  const plot = h("div", { class: "chart", id: `chart-${id}` });
  const caption = h("span", { class: "muted", id: `chart-${id}-note` }, note);
  const element = h("figure", { class: "chart-box" }, h("figcaption", null, h("h3", null, title), caption), plot);
  return { element, plot, caption };
}

export function createJobCharts() {
  const panels = {
    scores: panel(
      "scores",
      "Global model: accuracy and loss",
      "each site's evaluation, weighted by its validation rows",
    ),
    epsilon: panel("epsilon", "Privacy: ε per site against its budget", "ε reported with each upload"),
    cost: panel(
      "cost",
      "Round duration and bytes received",
      "encrypted bytes uploaded; seconds from opening to publication",
    ),
  };
  const grid = h("div", { class: "charts" }, Object.values(panels).map((p) => p.element));
  const empty = h("p", { class: "muted", id: "charts-empty" }, "No uploads yet: the charts appear once sites upload.");
  const element = h("div", null, empty, grid);
  const shown = new Map();
  let failed = false;

  async function draw(name, [traces, layout]) {
    const key = JSON.stringify([traces, layout]);
    if (shown.get(name) === key) return;
    shown.set(name, key);
    try {
      const Plotly = await loadPlotly();
      await Plotly.react(panels[name].plot, traces, layout, CONFIG);
      panels[name].plot.dataset.traces = String(traces.length);
    } catch (exc) {
      shown.delete(name);
      if (!failed) panels[name].plot.replaceChildren(h("p", { class: "failure" }, exc.message));
      failed = true;
    }
  }

  function update(rounds, sites) {
    const uploads = rounds.some((round) => round.submissions.length);
    empty.hidden = uploads;
    grid.hidden = !uploads;
    if (!uploads) return;
    const epsilon = epsilonChart(rounds, sites);
    const limits = epsilon[0].some((trace) => trace.line.dash === "dash");
    panels.epsilon.caption.textContent = limits
      ? "solid: ε reported with each upload; dashed: the site's limit"
      : "ε reported with each upload (no site reported a limit)";
    draw("scores", scoresChart(rounds));
    draw("epsilon", epsilon);
    draw("cost", costChart(rounds));
  }

  return { element, update };
}
