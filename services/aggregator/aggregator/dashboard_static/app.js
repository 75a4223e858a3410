// The dashboard's shell: login, navigation, following the aggregator's events, notices and dialogs.
//
// Every view is an object { element, wants, update(data) }. The shell loads what the view wants,
// then follows /v1/events and refetches only what an event concerns (a heartbeat event carries
// the agent's whole report, so it costs no request); views re-render only the parts whose data
// changed. Only while the stream is down does the shell poll, slowly.

import { Api, endSession, savedSession, serverNow, startSession } from "./api.js";
import { fmtDateTime, refreshLiveText } from "./dom.js";
import { followEvents } from "./events.js";
import { createJobsView, createJobView } from "./jobs.js";
import { createOverviewView } from "./overview.js";
import { createSitesView } from "./sites.js";

const FALLBACK_POLL_MS = 15_000;
const RETRY_MS = 5_000;
// The events of one change arrive together: wait this long so they cost one refetch.
const SETTLE_MS = 150;
// The aggregator's ONLINE_WITHIN: an agent silent for longer is offline (no event says so).
const ONLINE_MS = 60_000;
const $ = (id) => document.getElementById(id);

let api = null;
let me = null;
let view = null;
let data = null;
let lastFederations = [];

// ---- notices and dialogs ---------------------------------------------------------------

let noticeTimer = null;

function notify(message, { sticky = false } = {}) {
  $("notice-text").textContent = message;
  $("notice").hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(clearNotice, 12_000);
}

function clearNotice() {
  $("notice").hidden = true;
  $("notice-text").textContent = "";
}

/** Ask before an action; resolves true if the operator confirmed. */
function confirmAction({ title, text, action, danger = false }) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  const ok = $("confirm-ok");
  ok.textContent = action;
  ok.classList.toggle("button-danger", danger);
  return new Promise((resolve) => {
    const finish = (answer) => {
      ok.removeEventListener("click", onOk);
      $("confirm-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      dialog.close();
      resolve(answer);
    };
    const onOk = () => finish(true);
    const onCancel = (event) => {
      event.preventDefault();
      finish(false);
    };
    ok.addEventListener("click", onOk);
    $("confirm-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
  });
}

/** Show an approved site's one-time credential; it is wiped from the page when closed. */
function showCredential(site, credential) {
  const dialog = $("credential-dialog");
  const field = $("credential-value");
  $("credential-title").textContent = `Site approved: ${site.name}`;
  field.value = credential;
  $("credential-copied").textContent = "";
  dialog.showModal();
  field.focus();
  field.select();
}

function setUpCredentialDialog() {
  const dialog = $("credential-dialog");
  $("credential-copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("credential-value").value);
      $("credential-copied").textContent = "Copied to the clipboard.";
    } catch {
      $("credential-value").select();
      $("credential-copied").textContent = "Copy it with Ctrl+C / ⌘C (the clipboard is not available here).";
    }
  });
  // The close event fires a task later, so the button wipes the credential itself before
  // closing; the event covers closing with Escape.
  const wipe = () => {
    $("credential-value").value = "";
    $("credential-copied").textContent = "";
  };
  $("credential-done").addEventListener("click", () => {
    wipe();
    dialog.close();
  });
  dialog.addEventListener("close", wipe);
}

// ---- login and logout --------------------------------------------------------------------

function showLogin(message) {
  stopFollowing();
  view = null;
  me = null;
  api = null;
  $("view").replaceChildren();
  $("view").hidden = true;
  $("nav").hidden = true;
  $("account").hidden = true;
  $("status").hidden = true;
  $("login").hidden = false;
  const error = $("login-error");
  error.textContent = message ?? "";
  error.hidden = !message;
  $("api-token").focus();
}

async function onLogin(event) {
  event.preventDefault();
  const field = $("api-token");
  const button = $("login-submit");
  button.disabled = true;
  $("login-error").hidden = true;
  try {
    const session = await startSession(field.value);
    field.value = "";
    await enter(session);
  } catch (exc) {
    showLogin(exc.message);
  } finally {
    field.value = "";
    button.disabled = false;
  }
}

async function logout(message) {
  const session = api?.session;
  showLogin(message);
  await endSession(session);
}

async function enter(session) {
  api = new Api(session);
  me = await api.whoami();
  if (me.role !== "admin" && me.role !== "viewer") {
    await logout(`The account ${me.name} (${me.role}) is not an operator account.`);
    return;
  }
  $("login").hidden = true;
  $("view").hidden = false;
  $("nav").hidden = false;
  $("account").hidden = false;
  $("status").hidden = false;
  $("who").replaceChildren(me.name, " · ", Object.assign(document.createElement("span"), {
    className: `chip chip-${me.role === "admin" ? "admin" : "neutral"}`,
    textContent: me.role,
  }));
  $("who").dataset.role = me.role;
  startFollowing();
  route();
}

// ---- routing --------------------------------------------------------------------------------

function context() {
  return {
    api,
    me,
    isAdmin: me.role === "admin",
    notify,
    confirmAction,
    showCredential,
    refresh: () => {
      need.all = true;
      return refresh();
    },
    handleError,
  };
}

function route() {
  if (!api) return;
  const [section, id] = (location.hash.replace(/^#/, "") || "overview").split("/");
  let next;
  if (section === "sites") next = createSitesView(context());
  else if (section === "jobs" && id) next = createJobView(context(), id);
  else if (section === "jobs") next = createJobsView(context());
  else next = createOverviewView(context());
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.section === next.section);
    if (link.classList.contains("active")) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  view = next;
  $("view").replaceChildren(view.element);
  $("view").dataset.section = view.section;
  generation += 1;
  need.all = true;
  refresh();
}

// ---- what to fetch -------------------------------------------------------------------------

/** What the next refresh fetches: everything, or the parts events concerned. */
function nothingNeeded() {
  return { all: false, federations: false, sites: false, jobs: false, audit: false, current: new Set(), rounds: new Set() };
}

let need = nothingNeeded();
let generation = 0;
let refreshTimer = null;
let inFlight = false;
let again = false;

function fetchFederations() {
  return api.federations().catch((exc) => {
    // Memberships come from the keyserver: without it, show the last ones and say so.
    if (exc.unauthorized) throw exc;
    notify(`Federation memberships unavailable: ${exc.message}`);
    return lastFederations;
  });
}

/** The view's data with the needed parts fetched again and the rest kept from ``data``. */
async function load(asked, current) {
  const all = asked.all || !data;
  const next = all ? {} : { ...data };
  const wants = current.wants;
  const parts = [];
  if (all || asked.federations) parts.push(fetchFederations().then((found) => (next.federations = found)));
  if (all || asked.sites) parts.push(api.sites().then((found) => (next.sites = found)));
  if (all || asked.jobs) parts.push(api.jobs().then((found) => (next.jobs = found)));
  if (wants.audit && (all || asked.audit)) parts.push(api.audit(wants.audit).then((found) => (next.audit = found)));
  if (wants.rounds) parts.push(loadRounds(wants.rounds, all || asked.rounds.has("all") ? null : asked.rounds, next));
  await Promise.all(parts);
  lastFederations = next.federations;
  if (wants.currentRounds) await loadCurrentRounds(all ? null : asked.current, next);
  return next;
}

/** A job's rounds: all of them, or only ``numbers`` (each one's latest attempt) merged into those known. */
async function loadRounds(jobId, numbers, next) {
  if (numbers === null || next.roundsOf !== jobId) {
    next.rounds = await api.rounds(jobId).catch((exc) => {
      if (exc.status === 400 || exc.status === 404) return []; // no such job: the view says so
      throw exc;
    });
    next.roundsOf = jobId;
    return;
  }
  const fetched = await Promise.all([...numbers].map((number) => api.round(jobId, number).catch(() => null)));
  const rounds = [...next.rounds];
  for (const round of fetched.filter(Boolean)) {
    const index = rounds.findIndex((r) => r.number === round.number && r.attempt === round.attempt);
    if (index >= 0) rounds[index] = round;
    else rounds.push(round);
  }
  next.rounds = rounds.sort((a, b) => a.number - b.number || a.attempt - b.attempt);
}

/** The round each running job collects now: fetched for ``jobIds`` (null: all) and for jobs whose round moved. */
async function loadCurrentRounds(jobIds, next) {
  const known = next.currentRounds ?? new Map();
  const running = next.jobs.filter((job) => job.status === "running");
  const stale = (job) =>
    jobIds === null || jobIds.has(job.id) || known.get(job.id)?.number !== job.current_round;
  const fetched = await Promise.all(
    running.map((job) => (stale(job) ? api.round(job.id, job.current_round).catch(() => null) : known.get(job.id))),
  );
  next.currentRounds = new Map(fetched.filter(Boolean).map((round) => [round.job_id, round]));
}

/** Note what ``event`` changed; true if it needs a refetch (a heartbeat is applied as it comes). */
function noteEvent(event) {
  const kind = String(event.kind ?? "");
  if (kind === "site.heartbeat") {
    const site = data?.sites.find((candidate) => candidate.id === event.site_id);
    if (!site) {
      need.sites = true;
      return true;
    }
    site.agent = event.agent;
    render();
    return false;
  }
  if (kind === "site.state") return false; // its heartbeat event came with it
  need.audit = true;
  if (kind.startsWith("site.")) {
    need.sites = true;
    return true;
  }
  const jobId = event.job_id;
  if (kind.startsWith("job.") || kind === "round.opened" || kind === "round.published") need.jobs = true;
  if (kind === "job.created") need.federations = true;
  if (jobId) need.current.add(jobId);
  if (jobId && jobId === view?.wants.rounds) {
    // A failed attempt is followed by the next one (a fetch by number would return only that),
    // a stopped job fails its round without an event, a refused aggregate fails later rounds.
    const whole = kind.startsWith("job.") || kind === "round.failed" || kind === "aggregate.refused";
    need.rounds.add(whole || typeof event.round !== "number" ? "all" : event.round);
  }
  return true;
}

function mergeNeed(into, from) {
  for (const key of ["all", "federations", "sites", "jobs", "audit"]) into[key] ||= from[key];
  from.current.forEach((id) => into.current.add(id));
  from.rounds.forEach((number) => into.rounds.add(number));
}

// ---- refreshing ----------------------------------------------------------------------------

function schedule(delay) {
  if (refreshTimer === null) refreshTimer = setTimeout(refresh, delay);
}

function render() {
  if (!view || !data) return;
  view.update(data);
  const pending = data.sites.filter((site) => site.status === "pending").length;
  $("pending-count").textContent = String(pending);
  $("pending-count").hidden = pending === 0;
}

async function refresh() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
  if (inFlight) {
    again = true;
    return;
  }
  const current = view;
  const started = generation;
  if (!api || !current) return;
  if (Date.parse(api.session.expiresAt) <= Date.now()) {
    logout("Your 8-hour session has expired. Log in again.");
    return;
  }
  const asked = need;
  need = nothingNeeded();
  inFlight = true;
  try {
    const next = await load(asked, current);
    if (started !== generation || current !== view) return; // another view took over
    data = next;
    render();
    $("status").classList.remove("status-error");
    showStatus();
  } catch (exc) {
    if (started !== generation) return;
    if (exc.unauthorized) {
      handleError(exc);
      return;
    }
    mergeNeed(need, asked);
    $("status-text").textContent = `Could not refresh: ${exc.message} — retrying`;
    $("status").classList.add("status-error");
    schedule(RETRY_MS);
  } finally {
    inFlight = false;
    if (again) {
      again = false;
      schedule(0);
    }
  }
}

// ---- the event stream, and the poll while it is down ------------------------------------------

let stream = null;
let fallbackTimer = null;
let streamProblem = null;
let updatedAt = null;

function showStatus() {
  updatedAt = new Date().toISOString();
  const live = streamProblem === null;
  $("status").dataset.stream = live ? "up" : "down";
  let state = "Live: following the aggregator's events";
  if (streamProblem === "connecting") state = "Connecting to the aggregator's events";
  else if (!live) state = `Live updates unavailable (${streamProblem}): refreshing every ${FALLBACK_POLL_MS / 1000} s`;
  $("status-text").textContent = `${state} · updated ${fmtDateTime(updatedAt)}`;
}

function startFollowing() {
  stopFollowing();
  stream = followEvents(api.session.token, {
    onUp() {
      streamProblem = null;
      clearInterval(fallbackTimer);
      fallbackTimer = null;
      // Whatever changed while the stream was down (or before it connected) is fetched once.
      need.all = true;
      refresh();
    },
    onDown(reason) {
      streamProblem = reason;
      if (updatedAt) showStatus();
      if (fallbackTimer === null) {
        fallbackTimer = setInterval(() => {
          need.all = true;
          refresh();
        }, FALLBACK_POLL_MS);
      }
    },
    onEvent(event) {
      if (noteEvent(event)) schedule(SETTLE_MS);
    },
    onUnauthorized() {
      logout("Your session has ended (expired, revoked or the account was disabled). Log in again.");
    },
  });
}

function stopFollowing() {
  stream?.stop();
  stream = null;
  clearInterval(fallbackTimer);
  fallbackTimer = null;
  clearTimeout(refreshTimer);
  refreshTimer = null;
  streamProblem = null;
  updatedAt = null;
  generation += 1;
  data = null;
  need = nothingNeeded();
}

/** Agents silent for longer than ONLINE_MS are offline now, though no event says so. */
function markSilentAgentsOffline() {
  let changed = false;
  for (const site of data?.sites ?? []) {
    const agent = site.agent;
    if (agent?.online && serverNow() - Date.parse(agent.last_seen_at) > ONLINE_MS) {
      site.agent = { ...agent, online: false };
      changed = true;
    }
  }
  if (changed) render();
}

function handleError(exc) {
  if (exc.unauthorized) {
    logout("Your session has ended (expired, revoked or the account was disabled). Log in again.");
    return true;
  }
  notify(exc.message);
  return false;
}

// ---- start ---------------------------------------------------------------------------------

function start() {
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", () => logout());
  $("notice-close").addEventListener("click", clearNotice);
  setUpCredentialDialog();
  window.addEventListener("hashchange", route);
  // Countdowns and "seen 5 s ago" follow the clock between events.
  setInterval(() => {
    document.querySelectorAll(".live").forEach(refreshLiveText);
    markSilentAgentsOffline();
  }, 1000);
  const session = savedSession();
  if (session) {
    enter(session).catch((exc) => {
      if (exc.unauthorized) logout("Your session has ended. Log in again.");
      else showLogin(exc.message);
    });
  } else {
    showLogin();
  }
}

start();
