// Building the page safely: every piece of data becomes a text node (never HTML), and the
// few attributes set from data are plain values (ids, numbers), never URLs with a scheme.

import { serverNow } from "./api.js";

/**
 * h("td", {class: "num"}, "12", otherNode): an element with attributes and children.
 * Strings and numbers become text nodes; null, undefined and false children are skipped;
 * "on<event>" attributes given a function become event listeners (no inline handlers).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") {
      el.className = Array.isArray(value) ? value.filter(Boolean).join(" ") : value;
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.append(child);
    else el.append(document.createTextNode(String(child)));
  }
}

/** A link to a route of this page (ids are checked identifiers; the hash is ours). */
export function routeLink(route, ...children) {
  return h("a", { href: `#${route}` }, ...children);
}

/** A small coloured label; kind picks the colour (see style.css .chip-*). */
export function chip(text, kind) {
  return h("span", { class: ["chip", kind && `chip-${kind}`] }, text);
}

/** A table with a header row and body rows (each row an array of cells or a <tr>). */
export function table(headers, rows, { empty = "Nothing to show.", className } = {}) {
  const body = rows.length
    ? rows.map((row) => (row instanceof Node ? row : h("tr", null, row.map((cell) => cellOf(cell)))))
    : [h("tr", null, h("td", { class: "empty", colspan: headers.length }, empty))];
  return h(
    "table",
    { class: className },
    h("thead", null, h("tr", null, headers.map((header) => h("th", { scope: "col" }, header)))),
    h("tbody", null, body),
  );
}

function cellOf(cell) {
  if (cell instanceof Node && cell.nodeName === "TD") return cell;
  return h("td", null, cell);
}

/** " round 3" after an agent's state, or nothing when it reports no round. */
export function roundNote(round) {
  return round === null || round === undefined ? null : h("span", { class: "muted" }, ` round ${round}`);
}

/** A progress bar: value of max, with an optional marker (e.g. min_sites) and a label. */
export function progress(value, max, { label, marker, kind } = {}) {
  const fraction = max > 0 ? Math.min(1, Math.max(0, value / max)) : 0;
  const bar = h("div", { class: ["bar", kind && `bar-${kind}`], role: "progressbar" });
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(max));
  bar.setAttribute("aria-valuenow", String(value));
  const fill = h("div", { class: "bar-fill" });
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  bar.append(fill);
  if (marker !== undefined && max > 0 && marker < max) {
    const tick = h("div", { class: "bar-marker", title: `minimum ${marker}` });
    tick.style.left = `${((marker / max) * 100).toFixed(1)}%`;
    bar.append(tick);
  }
  return h("div", { class: "progress" }, bar, label === undefined ? null : h("span", { class: "bar-label" }, label));
}

// ---- formatting ----------------------------------------------------------------------

// "2026-12-07 03:12:05 UTC": unambiguous whatever the browser's locale, in its own time zone, named.
const dateTimeParts = new Intl.DateTimeFormat("en-GB", {
  year: "numeric",
  month: "2-digit",
  day: "2-digit",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hourCycle: "h23",
  timeZoneName: "short",
});

export function fmtDateTime(iso) {
  if (!iso) return "—";
  const part = Object.fromEntries(dateTimeParts.formatToParts(new Date(iso)).map(({ type, value }) => [type, value]));
  return `${part.year}-${part.month}-${part.day} ${part.hour}:${part.minute}:${part.second} ${part.timeZoneName}`;
}

export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 || value >= 100 ? 0 : 1)} ${units[unit]}`;
}

export function fmtNumber(value, digits = 2) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "—";
}

/** Small probabilities such as δ read better as 1e-5 than as 0.00001. */
export function fmtProbability(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "—";
  return value < 0.001 ? value.toExponential(0) : String(value);
}

export function fmtPercent(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${(value * 100).toFixed(1)} %` : "—";
}

/** "42 s", "3 min 05 s", "2 h 10 min". */
export function fmtSeconds(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

/** "mm:ss" (or "h:mm:ss") left until ``iso`` on the aggregator's clock. */
export function fmtCountdown(iso) {
  const left = Math.round((Date.parse(iso) - serverNow()) / 1000);
  if (left <= 0) return "deadline passed";
  const hours = Math.floor(left / 3600);
  const minutes = String(Math.floor((left % 3600) / 60)).padStart(2, "0");
  const seconds = String(left % 60).padStart(2, "0");
  return hours ? `${hours}:${minutes}:${seconds} left` : `${minutes}:${seconds} left`;
}

export function fmtAgo(iso) {
  if (!iso) return "never";
  const seconds = Math.round((serverNow() - Date.parse(iso)) / 1000);
  if (seconds < 5) return "just now";
  return `${fmtSeconds(seconds)} ago`;
}

/** Text that follows the clock: a countdown to ``iso`` or the time since ``iso``. */
export function liveText(kind, iso) {
  const el = h("span", { class: "live", dataset: { [kind]: iso } });
  refreshLiveText(el);
  return el;
}

export function refreshLiveText(el) {
  if (el.dataset.countdown) {
    el.textContent = fmtCountdown(el.dataset.countdown);
    const left = Date.parse(el.dataset.countdown) - serverNow();
    el.classList.toggle("urgent", left < 30_000);
  } else if (el.dataset.ago) {
    el.textContent = fmtAgo(el.dataset.ago);
  }
}

/** Re-render ``build()`` into ``el`` only when ``key`` changed (keeps focus and scroll still). */
const renderedKeys = new WeakMap();

export function renderIfChanged(el, key, build) {
  if (renderedKeys.get(el) === key) return false;
  el.replaceChildren(...[build()].flat().filter(Boolean));
  renderedKeys.set(el, key);
  return true;
}
