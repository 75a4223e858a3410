// A job's charts per round, drawn with uPlot (vendored under vendor/uplot-1.6.32/, MIT; loaded on
// first use, from this origin as the Content-Security-Policy requires). Each chart lists its values
// in a table below it too, for screen readers and for anyone who wants the numbers.

import { h, table } from "./dom.js";
import { byId, globalScores, latestAttempts, siteName } from "./model.js";

const UPLOT = "./vendor/uplot-1.6.32/uPlot.esm.js";
const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"];
const FONT = "12px system-ui, -apple-system, Segoe UI, Roboto, sans-serif";
const HEIGHT = 300;
const GRID = { stroke: "#eef0f3", width: 1 };
const TICKS = { stroke: "#e5e7eb", width: 1, size: 4 };
const DOTTED = [2, 4];
const DASHED = [7, 5];

let library = null;

/** uPlot's constructor, imported once. */
function loadUplot() {
  if (!library) {
    library = import(UPLOT).then(
      (module) => module.default,
      (exc) => {
        library = null;
        throw new Error(`could not load the chart library (${exc.message})`);
      },
    );
  }
  return library;
}

const finite = (value) => typeof value === "number" && Number.isFinite(value);
const fixed = (digits, unit = "") => (value) => `${value.toFixed(digits)}${unit}`;
const percent = (digits) => (value) => `${(value * 100).toFixed(digits)} %`;

/** Only the lines that have a point to draw, so the legend names nothing that is not there. */
function drawn(series) {
  return series.filter((s) => s.values.some(finite));
}

/** Whole numbers from ``min`` to ``max``, thinned to about a dozen ticks. */
function wholeSteps(min, max) {
  const first = Math.ceil(min);
  const last = Math.floor(max);
  const step = Math.max(1, Math.ceil((last - first + 1) / 12));
  const steps = [];
  for (let value = first; value <= last; value += step) steps.push(value);
  return steps;
}

/** A scale from zero to a little above its largest value. */
function fromZero(u, min, max) {
  return [0, max > 0 ? max * 1.08 : 1];
}

/**
 * What a chart shows: ``x`` and each series' values at those x, the y scales with their axis
 * labels and tick formats, how an x is named, and which x positions are rounds (``rows``, for the
 * values table; the epsilon chart adds two positions only to stretch its budget lines).
 */
function chartSpec({ x, xName, xLabel, xRange, xSteps, series, scales, rows }) {
  return { x, xName, xLabel, xRange, xSteps, series, scales, rows: rows ?? x.map((_, index) => index) };
}

/** Global accuracy and loss of each published round's model, weighted by the sites' validation rows. */
function scoresChart(rounds) {
  const published = latestAttempts(rounds).filter((r) => r.state === "published" && r.evaluations.length);
  if (!published.length) return { empty: "no evaluated round yet" };
  const x = published.map((r) => r.number);
  const scores = published.map(globalScores);
  return chartSpec({
    x,
    xName: "round",
    xLabel: String,
    xRange: [Math.min(...x) - 0.25, Math.max(...x) + 0.25],
    xSteps: wholeSteps,
    series: drawn([
      {
        label: "accuracy (sample-weighted)",
        values: scores.map((s) => s.accuracy),
        scale: "accuracy",
        color: PALETTE[0],
        width: 2.5,
        format: percent(1),
      },
      {
        label: "loss",
        values: scores.map((s) => s.loss),
        scale: "loss",
        color: PALETTE[1],
        width: 2,
        dash: DOTTED,
        format: fixed(3),
      },
    ]),
    scales: {
      accuracy: { label: "accuracy", range: [0, 1.02], ticks: (value) => `${Math.round(value * 100)}%` },
      loss: { label: "loss", range: fromZero, ticks: fixed(2), right: true },
    },
  });
}

/** ε each site reported with its upload, per round, against the budget its agent reports. */
function epsilonChart(rounds, sites) {
  const sitesById = byId(sites);
  const bySite = new Map();
  for (const round of latestAttempts(rounds)) {
    for (const submission of round.submissions) {
      if (typeof submission.metrics.epsilon !== "number") continue;
      if (!bySite.has(submission.site_id)) bySite.set(submission.site_id, new Map());
      bySite.get(submission.site_id).set(round.number, submission.metrics.epsilon);
    }
  }
  if (!bySite.size) return { empty: "no upload yet" };
  const numbers = [...new Set([...bySite.values()].flatMap((spent) => [...spent.keys()]))].sort((a, b) => a - b);
  // The budget lines run from edge to edge: two more x positions, a quarter round outside the first and last.
  const x = [numbers[0] - 0.25, ...numbers, numbers[numbers.length - 1] + 0.25];
  const series = [];
  [...bySite.keys()]
    .sort((a, b) => siteName(sitesById, a).localeCompare(siteName(sitesById, b)))
    .forEach((siteId, index) => {
      const color = PALETTE[index % PALETTE.length];
      const name = siteName(sitesById, siteId);
      const spent = bySite.get(siteId);
      const budget = sitesById.get(siteId)?.agent?.privacy?.max_epsilon;
      series.push({
        label: name,
        column: typeof budget === "number" ? `${name} (limit ${budget.toFixed(2)})` : name,
        values: x.map((number) => spent.get(number) ?? null),
        scale: "epsilon",
        color,
        width: 2.5,
        spanGaps: true,
        format: fixed(2),
      });
      if (typeof budget === "number") {
        series.push({
          label: `${name} budget`,
          values: x.map(() => budget),
          scale: "epsilon",
          color,
          width: 1.5,
          dash: DASHED,
          points: false,
          budget: true,
          format: fixed(2),
        });
      }
    });
  return chartSpec({
    x,
    xName: "round",
    xLabel: String,
    xRange: [x[0], x[x.length - 1]],
    xSteps: wholeSteps,
    series,
    scales: { epsilon: { label: "ε spent (cumulative)", range: fromZero, ticks: fixed(1) } },
    rows: numbers.map((_, index) => index + 1),
  });
}

/** How long each attempt took and how many encrypted bytes the sites uploaded to it, as the aggregator serves them. */
function costChart(rounds) {
  const attempts = [...rounds].sort((a, b) => a.number - b.number || a.attempt - b.attempt);
  const labels = attempts.map((r) => (r.attempt > 1 ? `${r.number} (try ${r.attempt})` : String(r.number)));
  const bytes = attempts.map((r) => r.bytes_uploaded);
  const [unit, scale] = Math.max(0, ...bytes) >= 1e6 ? ["MB", 1e6] : ["kB", 1e3];
  return chartSpec({
    x: attempts.map((_, index) => index),
    xName: "round",
    xLabel: (index) => labels[index] ?? "",
    xRange: [-0.5, attempts.length - 0.5],
    xSteps: (min, max) => wholeSteps(Math.max(0, min), Math.min(attempts.length - 1, max)),
    series: drawn([
      {
        label: `${unit} received`,
        values: bytes.map((value) => value / scale),
        scale: "bytes",
        color: "#93c5fd",
        bars: true,
        format: fixed(1, ` ${unit}`),
      },
      {
        label: "duration (s)",
        values: attempts.map((r) => r.duration_s ?? null),
        scale: "seconds",
        color: PALETTE[4],
        width: 2,
        spanGaps: true,
        format: fixed(1, " s"),
      },
    ]),
    scales: {
      bytes: { label: `${unit} received`, range: fromZero, ticks: fixed(1) },
      seconds: { label: "seconds", range: fromZero, ticks: fixed(0), right: true },
    },
  });
}

/** uPlot's options for ``spec`` at ``width`` pixels. */
function uplotOptions(uPlot, spec, width) {
  const used = [...new Set(spec.series.map((s) => s.scale))];
  const scales = { x: { time: false, range: () => spec.xRange } };
  const axes = [
    {
      label: spec.xName,
      size: 34,
      labelSize: 20,
      font: FONT,
      labelFont: FONT,
      stroke: "#1f2937",
      grid: GRID,
      ticks: TICKS,
      splits: (u) => spec.xSteps(u.scales.x.min, u.scales.x.max),
      values: (u, splits) => splits.map(spec.xLabel),
    },
  ];
  for (const key of used) {
    const { label, range, ticks, right } = spec.scales[key];
    scales[key] = { range };
    axes.push({
      scale: key,
      label,
      side: right ? 1 : 3,
      font: FONT,
      labelFont: FONT,
      stroke: "#1f2937",
      grid: right && used.length > 1 ? { show: false } : GRID,
      ticks: TICKS,
      size: 56,
      values: (u, splits) => splits.map(ticks),
    });
  }
  return {
    width,
    height: HEIGHT,
    scales,
    axes,
    cursor: { points: { size: 7 }, drag: { x: false, y: false } },
    legend: { live: true },
    series: [
      { label: spec.xName, value: (u, value) => (value === null || value === undefined ? "—" : spec.xLabel(value)) },
      ...spec.series.map((s) => ({
        label: s.label,
        class: s.budget ? "budget" : undefined,
        scale: s.scale,
        stroke: s.color,
        fill: s.bars ? s.color : undefined,
        width: s.bars ? 1 : s.width,
        dash: s.dash,
        spanGaps: s.spanGaps ?? false,
        points: { show: !s.bars && s.points !== false, size: 6, fill: s.color },
        paths: s.bars ? uPlot.paths.bars({ size: [0.55, 56] }) : undefined,
        value: (u, value) => (finite(value) ? s.format(value) : "—"),
      })),
    ],
  };
}

/** The chart's values as a table: one row per round, one column per series (a budget line is in its site's header). */
function valuesTable(spec) {
  const columns = spec.series.filter((s) => !s.budget);
  return table(
    [spec.xName, ...columns.map((s) => s.column ?? s.label)],
    spec.rows.map((index) =>
      h(
        "tr",
        { dataset: { x: spec.x[index] } },
        h("td", null, spec.xLabel(spec.x[index])),
        columns.map((s) => h("td", { class: "num" }, finite(s.values[index]) ? s.format(s.values[index]) : "—")),
      ),
    ),
    { className: "compact" },
  );
}

function panel(id, title, note) {
  const plot = h("div", { class: "chart", id: `chart-${id}` });
  const caption = h("span", { class: "muted", id: `chart-${id}-note` }, note);
  const values = h("div");
  const details = h("details", { class: "chart-values", id: `chart-${id}-values` }, h("summary", null, "Values"), values);
  const element = h(
    "figure",
    { class: "chart-box" },
    h("figcaption", null, h("h3", null, title), caption),
    plot,
    details,
  );
  return { element, plot, caption, values, details, chart: null };
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

  // Charts follow their box's width (the grid reflows with the window).
  const resizer = new ResizeObserver((entries) => {
    for (const entry of entries) {
      const found = Object.values(panels).find((p) => p.plot === entry.target);
      const width = Math.floor(entry.contentRect.width);
      if (found?.chart && width > 0 && width !== found.chart.width) found.chart.setSize({ width, height: HEIGHT });
    }
  });
  Object.values(panels).forEach((p) => resizer.observe(p.plot));

  async function draw(name, spec) {
    const target = panels[name];
    const key = JSON.stringify(spec.empty ?? [spec.x, spec.series.map((s) => [s.label, s.values])]);
    if (shown.get(name) === key) return;
    shown.set(name, key);
    try {
      target.chart?.destroy();
      target.chart = null;
      if (spec.empty) {
        target.plot.replaceChildren(h("p", { class: "chart-none muted" }, spec.empty));
        target.values.replaceChildren();
        target.details.hidden = true;
      } else {
        const uPlot = await loadUplot();
        if (shown.get(name) !== key) return; // newer data arrived while the library loaded
        target.plot.replaceChildren();
        const width = Math.max(320, Math.floor(target.plot.clientWidth));
        target.chart = new uPlot(uplotOptions(uPlot, spec, width), [spec.x, ...spec.series.map((s) => s.values)], target.plot);
        target.values.replaceChildren(valuesTable(spec));
        target.details.hidden = false;
      }
      target.plot.dataset.traces = String(spec.empty ? 0 : spec.series.length);
    } catch (exc) {
      shown.delete(name);
      if (!failed) target.plot.replaceChildren(h("p", { class: "failure" }, exc.message));
      failed = true;
    }
  }

  function update(rounds, sites) {
    const uploads = rounds.some((round) => round.submissions.length);
    empty.hidden = uploads;
    grid.hidden = !uploads;
    if (!uploads) return;
    const epsilon = epsilonChart(rounds, sites);
    const limits = (epsilon.series ?? []).some((s) => s.budget);
    panels.epsilon.caption.textContent = limits
      ? "solid: ε reported with each upload; dashed: the site's limit"
      : "ε reported with each upload (no site reported a limit)";
    draw("scores", scoresChart(rounds));
    draw("epsilon", epsilon);
    draw("cost", costChart(rounds));
  }

  return { element, update };
}
