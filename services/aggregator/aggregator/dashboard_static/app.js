// The dashboard's shell: login, navigation, the 2-second poll, notices and dialogs.
//
// Every view is an object { element, wants, update(data) }: the shell fetches what the view
// wants on every tick and hands it over; views re-render only the parts whose data changed.

import { Api, endSession, savedSession, startSession } from "./api.js";
import { refreshLiveText } from "./dom.js";
import { createJobsView, createJobView } from "./jobs.js";
import { createOverviewView } from "./overview.js";
import { createSitesView } from "./sites.js";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

let api = null;
let me = null;
let view = null;
let pollTimer = null;
let pollGeneration = 0;
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
  stopPolling();
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
  route();
}

// ---- routing and polling -----------------------------------------------------------------

function context() {
  return {
    api,
    me,
    isAdmin: me.role === "admin",
    notify,
    confirmAction,
    showCredential,
    refresh: () => poll(),
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
  poll();
}

function stopPolling() {
  clearTimeout(pollTimer);
  pollTimer = null;
  pollGeneration += 1;
}

async function fetchData(wants) {
  const federations = api.federations().catch((exc) => {
    // Memberships come from the keyserver: without it, show the last ones and say so.
    if (exc.unauthorized) throw exc;
    notify(`Federation memberships unavailable: ${exc.message}`);
    return lastFederations;
  });
  const [feds, sites, jobs] = await Promise.all([federations, api.sites(), api.jobs()]);
  lastFederations = feds;
  const data = { federations: feds, sites, jobs };
  const extra = [];
  if (wants.currentRounds) {
    const running = jobs.filter((job) => job.status === "running");
    extra.push(
      Promise.all(running.map((job) => api.round(job.id, job.current_round).catch(() => null))).then((rounds) => {
        data.currentRounds = new Map(rounds.filter(Boolean).map((round) => [round.job_id, round]));
      }),
    );
  }
  if (wants.audit) extra.push(api.audit(wants.audit).then((events) => (data.audit = events)));
  if (wants.rounds) {
    const rounds = api.rounds(wants.rounds).catch((exc) => {
      if (exc.status === 400 || exc.status === 404) return []; // no such job: the view says so
      throw exc;
    });
    extra.push(rounds.then((found) => (data.rounds = found)));
  }
  await Promise.all(extra);
  return data;
}

function handleError(exc) {
  if (exc.unauthorized) {
    logout("Your session has ended (expired, revoked or the account was disabled). Log in again.");
    return true;
  }
  notify(exc.message);
  return false;
}

async function poll() {
  clearTimeout(pollTimer);
  const generation = ++pollGeneration;
  const current = view;
  if (!api || !current) return;
  if (Date.parse(api.session.expiresAt) <= Date.now()) {
    logout("Your 8-hour session has expired. Log in again.");
    return;
  }
  try {
    const data = await fetchData(current.wants);
    if (generation !== pollGeneration || current !== view) return; // a newer poll or another view took over
    current.update(data);
    const pending = data.sites.filter((site) => site.status === "pending").length;
    $("pending-count").textContent = String(pending);
    $("pending-count").hidden = pending === 0;
    $("status-text").textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every ${POLL_MS / 1000} s`;
    $("status").classList.remove("status-error");
  } catch (exc) {
    if (generation !== pollGeneration) return;
    if (exc.unauthorized) {
      handleError(exc);
      return;
    }
    $("status-text").textContent = `Could not refresh: ${exc.message} — retrying`;
    $("status").classList.add("status-error");
  }
  if (generation === pollGeneration) pollTimer = setTimeout(poll, POLL_MS);
}

// ---- start ---------------------------------------------------------------------------------

function start() {
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", () => logout());
  $("notice-close").addEventListener("click", clearNotice);
  setUpCredentialDialog();
  window.addEventListener("hashchange", route);
  // Countdowns and "seen 5 s ago" follow the clock between polls.
  setInterval(() => document.querySelectorAll(".live").forEach(refreshLiveText), 1000);
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
