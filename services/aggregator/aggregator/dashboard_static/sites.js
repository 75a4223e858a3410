// Sites: the approval queue (admins approve or reject) and every site with its agent's report.

import {
  chip,
  fmtDateTime,
  fmtNumber,
  fmtProbability,
  h,
  liveText,
  progress,
  renderIfChanged,
  roundNote,
  routeLink,
  table,
} from "./dom.js";
import { ENVIRONMENT_LABELS, byId, environmentDifferences, membershipsBySite, siteJob } from "./model.js";

export function createSitesView(ctx) {
  const queue = h("div");
  const all = h("div");
  const busy = new Set(); // sites with a decision in flight (their buttons stay disabled)
  let last = null;

  const element = h(
    "div",
    { class: "sites" },
    h("h1", null, "Sites"),
    h(
      "section",
      { class: "card", id: "approval-queue" },
      h("h2", null, "Approval queue"),
      ctx.isAdmin
        ? h("p", { class: "muted" }, "Check each registration with the site (out of band) before approving it.")
        : h("p", { class: "muted" }, "You are logged in as a viewer: only admins approve, reject or revoke sites."),
      queue,
    ),
    h("section", { class: "card", id: "all-sites" }, h("h2", null, "All sites"), all),
  );

  async function decide(site, decision) {
    const texts = {
      approve: {
        title: `Approve ${site.name}?`,
        text:
          `${site.name} (${site.organisation}, contact ${site.contact}) will be able to talk to the aggregator. ` +
          "Which federations it belongs to is decided at the keyserver.",
        action: "Approve",
      },
      reject: {
        title: `Reject ${site.name}?`,
        text: "The registration is refused for good.",
        action: "Reject",
        danger: true,
      },
      revoke: {
        title: `Revoke ${site.name}?`,
        text: "Its credential stops working at once; it can no longer upload to any round.",
        action: "Revoke",
        danger: true,
      },
    }[decision];
    if (!(await ctx.confirmAction(texts))) return;
    busy.add(site.id);
    rerender();
    try {
      const answer = await ctx.api.decide(site.id, decision);
      if (decision === "approve") ctx.showCredential(answer.site, answer.credential);
      else ctx.notify(`${site.name} is now ${answer.status}.`);
    } catch (exc) {
      ctx.handleError(exc);
    } finally {
      busy.delete(site.id);
      await ctx.refresh();
    }
  }

  function button(site, decision, label, kind) {
    return h(
      "button",
      {
        type: "button",
        class: kind,
        disabled: busy.has(site.id),
        dataset: { action: decision, siteId: site.id },
        onclick: () => decide(site, decision),
      },
      label,
    );
  }

  function rerender() {
    if (last) update(last, true);
  }

  function update(data, force = false) {
    last = data;
    const memberships = membershipsBySite(data.federations);
    const jobsById = byId(data.jobs);
    const pending = data.sites.filter((site) => site.status === "pending");
    const key = (value) => (force ? `${Math.random()}` : JSON.stringify([value, [...busy]]));
    renderIfChanged(queue, key(pending), () =>
      table(
        ["Site", "Organisation", "Contact", "Registered", "Public key", ctx.isAdmin && "Decision"].filter(Boolean),
        pending.map((site) =>
          h(
            "tr",
            { dataset: { siteId: site.id } },
            h("td", null, h("strong", null, site.name), h("div", { class: "mono muted" }, site.id)),
            h("td", null, site.organisation),
            h("td", null, site.contact),
            h("td", null, liveText("ago", site.created_at)),
            h("td", { class: "mono", title: site.public_key }, `${site.public_key.slice(0, 16)}…`),
            ctx.isAdmin
              ? h(
                  "td",
                  { class: "actions" },
                  button(site, "approve", "Approve", "button-primary"),
                  button(site, "reject", "Reject", "button-danger"),
                )
              : null,
          ),
        ),
        { empty: "No site is waiting for approval." },
      ),
    );
    renderIfChanged(all, key([data.sites, data.federations, data.jobs.map((j) => [j.id, j.environment])]), () =>
      table(
        ["Site", "Status", "Federations", "Agent", "Versions", "Privacy spent", ctx.isAdmin ? "" : null].filter(
          (header) => header !== null,
        ),
        [...data.sites]
          .sort((a, b) => a.name.localeCompare(b.name))
          .map((site) => siteRow(site, memberships.get(site.id) ?? [], jobsById, ctx.isAdmin ? button : null)),
        { empty: "No site has registered yet.", className: "sites-table" },
      ),
    );
  }

  return { section: "sites", element, wants: {}, update };
}

function siteRow(site, federations, jobsById, button) {
  const agent = site.agent;
  return h(
    "tr",
    { dataset: { siteId: site.id, status: site.status } },
    h(
      "td",
      null,
      h("strong", null, site.name),
      h("div", { class: "muted" }, site.organisation),
      h("div", { class: "mono muted" }, site.id),
    ),
    h(
      "td",
      null,
      h("span", { class: "site-status" }, chip(site.status, site.status)),
      site.decided_at ? h("div", { class: "muted" }, `since ${fmtDateTime(site.decided_at)}`) : null,
    ),
    h(
      "td",
      null,
      federations.length ? federations.map((f) => h("div", null, f.name)) : h("span", { class: "muted" }, "none"),
    ),
    h("td", { class: "agent" }, agentCell(agent, jobsById)),
    h("td", { class: "versions" }, versionsCell(agent, siteJob(site, jobsById))),
    h("td", { class: "privacy" }, privacyCell(agent)),
    button
      ? h(
          "td",
          { class: "actions" },
          site.status === "approved" ? button(site, "revoke", "Revoke", "button-danger") : null,
        )
      : null,
  );
}

function agentCell(agent, jobsById) {
  if (!agent) return h("span", { class: "muted" }, "no heartbeat yet");
  return [
    h(
      "div",
      null,
      h("span", { class: ["dot", agent.online ? "dot-online" : "dot-offline"], "aria-hidden": "true" }),
      agent.online ? "online" : "offline",
      h("span", { class: "muted" }, " · seen ", liveText("ago", agent.last_seen_at)),
    ),
    h(
      "div",
      { class: "agent-job" },
      chip(agent.state, agent.state),
      agent.job_id ? [" in ", routeLink(`jobs/${agent.job_id}`, jobsById.get(agent.job_id)?.name ?? agent.job_id)] : null,
      roundNote(agent.round),
    ),
    agent.message ? h("div", { class: "agent-message" }, agent.message) : null,
  ];
}

function versionsCell(agent, job) {
  if (!agent) return h("span", { class: "muted" }, "—");
  const differs = new Set(environmentDifferences(agent.environment, job?.environment));
  return h(
    "dl",
    { class: "versions-list" },
    Object.entries(ENVIRONMENT_LABELS).map(([key, label]) => [
      h("dt", null, label),
      h(
        "dd",
        differs.has(key) ? { class: "mismatch", title: `the job requires ${job.environment[key]}` } : null,
        agent.environment[key],
        differs.has(key) ? ` (job: ${job.environment[key]})` : null,
      ),
    ]),
  );
}

function privacyCell(agent) {
  const privacy = agent?.privacy;
  if (!privacy) return h("span", { class: "muted" }, agent ? "not reported yet" : "—");
  const budget = privacy.max_epsilon;
  const spent = `ε ${fmtNumber(privacy.epsilon)}`;
  const label = budget ? `${spent} of ${fmtNumber(budget, 1)}` : `${spent} (no budget set)`;
  const used = budget ? privacy.epsilon / budget : 0;
  return [
    budget
      ? progress(privacy.epsilon, budget, { label, kind: used > 0.9 ? "danger" : used > 0.7 ? "warn" : "ok" })
      : h("div", null, label),
    h("div", { class: "muted" }, `δ ${fmtProbability(privacy.delta)}`),
  ];
}
