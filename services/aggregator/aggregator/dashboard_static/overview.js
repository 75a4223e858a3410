// Overview: federations, sites by status and how many are online, running jobs and their rounds.

import { chip, fmtBytes, fmtDateTime, h, liveText, progress, renderIfChanged, routeLink, table } from "./dom.js";
import { waitsForSites, byId, memberAnswers, publishedRounds, siteName } from "./model.js";

const STATUSES = ["approved", "pending", "rejected", "revoked"];
const ANSWER_KINDS = {
  uploaded: "uploaded",
  advertised: "advertised",
  declined: "declined",
  waiting: "waiting",
  unable: "neutral",
};
const ANSWER_MARKS = { uploaded: "✓", advertised: "◐", declined: "✕", waiting: "○", unable: "–" };
const ANSWER_TITLES = {
  uploaded: "uploaded to this round",
  advertised: "advertised its key for this secure round; its upload is to come",
  declined: "declined this round",
  waiting: "has not answered yet",
  unable: "member at the keyserver, not approved here",
};

export function createOverviewView() {
  const stats = h("section", { class: "stats", "aria-label": "Summary" });
  const running = h("div");
  const federations = h("div");
  const glance = h("div");
  const audit = h("div");
  const element = h(
    "div",
    { class: "overview" },
    h("h1", null, "Overview"),
    stats,
    h("section", { class: "card", id: "running-jobs" }, h("h2", null, "Running jobs"), running),
    h(
      "div",
      { class: "columns" },
      h(
        "div",
        null,
        h("section", { class: "card", id: "federations" }, h("h2", null, "Federations"), federations),
        h("section", { class: "card", id: "site-glance" }, h("h2", null, "Sites at a glance"), glance),
      ),
      h("section", { class: "card", id: "activity" }, h("h2", null, "Recent activity"), audit),
    ),
  );

  function update(data) {
    const sitesById = byId(data.sites);
    const federationsById = byId(data.federations);
    const jobsById = byId(data.jobs);
    const statsKey = [data.sites.map((s) => [s.status, s.agent?.online]), data.jobs.map((j) => j.status)];
    renderIfChanged(stats, JSON.stringify([statsKey, data.federations.length]), () => renderStats(data));
    const runningJobs = data.jobs.filter((job) => job.status === "running");
    const current = runningJobs.map((job) => data.currentRounds?.get(job.id) ?? null);
    renderIfChanged(
      running,
      JSON.stringify([runningJobs, current, data.federations, data.sites.map((s) => [s.id, s.name, s.status])]),
      () =>
        runningJobs.length
          ? runningJobs.map((job, index) => runningJob(job, current[index], federationsById, sitesById))
          : h("p", { class: "muted" }, "No job is running."),
    );
    const federationsKey = JSON.stringify([data.federations, data.jobs.map((j) => [j.id, j.name, j.status])]);
    renderIfChanged(federations, federationsKey, () =>
      table(
        ["Federation", "Members", "Jobs"],
        data.federations.map((federation) =>
          h(
            "tr",
            { dataset: { federationId: federation.id } },
            h("td", null, h("strong", null, federation.name), h("div", { class: "mono muted" }, federation.id)),
            h("td", { class: "members" }, String(federation.members.length)),
            h("td", null, federationJobs(federation, jobsById)),
          ),
        ),
        { empty: "The keyserver has no federation yet." },
      ),
    );
    renderIfChanged(glance, JSON.stringify([data.sites, data.federations]), () => siteGlance(data));
    if (data.audit) {
      renderIfChanged(audit, JSON.stringify(data.audit.map((e) => e.id)), () =>
        table(
          ["Time", "Who", "What", "Subject"],
          data.audit.map((event) => [
            fmtDateTime(event.at),
            actorName(event.actor, sitesById),
            event.action,
            h("span", { class: "mono" }, subjectName(event.subject, sitesById, jobsById)),
          ]),
          { empty: "No activity yet.", className: "compact" },
        ),
      );
    }
  }

  return { section: "overview", element, wants: { currentRounds: true, audit: 12 }, update };
}

function renderStats(data) {
  const counts = Object.fromEntries(STATUSES.map((status) => [status, 0]));
  for (const site of data.sites) counts[site.status] = (counts[site.status] ?? 0) + 1;
  const online = data.sites.filter((site) => site.status === "approved" && site.agent?.online).length;
  const jobs = { running: 0, completed: 0, failed: 0, stopped: 0 };
  for (const job of data.jobs) jobs[job.status] = (jobs[job.status] ?? 0) + 1;
  return [
    stat(
      "Sites online",
      `${online} of ${counts.approved}`,
      "approved sites whose agent reported in the last minute",
      "sites-online",
    ),
    stat(
      "Sites by status",
      STATUSES.map((status) =>
        h("span", { class: "stat-part" }, chip(`${counts[status]} ${status}`, counts[status] ? status : "zero")),
      ),
      null,
      "sites-by-status",
    ),
    stat(
      "Awaiting approval",
      counts.pending ? routeLink("sites", `${counts.pending} pending`) : "none",
      "registrations waiting for an admin",
      "sites-pending",
    ),
    stat("Federations", String(data.federations.length), "at the keyserver", "federation-count"),
    stat(
      "Jobs",
      Object.entries(jobs)
        .filter(([, count]) => count)
        .map(([status, count]) => h("span", { class: "stat-part" }, chip(`${count} ${status}`, status))),
      null,
      "job-counts",
    ),
  ];
}

function federationJobs(federation, jobsById) {
  if (!federation.jobs.length) return h("span", { class: "muted" }, "no job yet");
  return h(
    "div",
    { class: "job-links" },
    federation.jobs.map((jobId) => {
      const job = jobsById.get(jobId);
      return h(
        "span",
        { class: "job-link" },
        routeLink(`jobs/${jobId}`, job?.name ?? jobId),
        " ",
        job ? chip(job.status, job.status) : null,
      );
    }),
  );
}

function stat(label, value, hint, id) {
  return h(
    "div",
    { class: "stat card", id: `stat-${id}` },
    h("div", { class: "stat-label" }, label),
    h("div", { class: "stat-value" }, value),
    hint ? h("div", { class: "stat-hint muted" }, hint) : null,
  );
}

function runningJob(job, round, federationsById, sitesById) {
  const federation = federationsById.get(job.federation_id);
  const published = publishedRounds(job);
  const target = job.target_sites ?? job.min_sites;
  const members = federation?.members ?? [];
  const expected = members.filter((id) => sitesById.get(id)?.status === "approved").length;
  const uploads = round?.num_submissions ?? 0;
  const declined = round?.declines.length ?? 0;
  return h(
    "article",
    { class: "running-job", dataset: { jobId: job.id } },
    h(
      "div",
      { class: "running-job-head" },
      h("h3", null, routeLink(`jobs/${job.id}`, job.name)),
      h("span", { class: "muted" }, federation ? `${federation.name} · ${members.length} members` : job.federation_id),
    ),
    progress(published, job.rounds, { label: `${published} of ${job.rounds} rounds published` }),
    round
      ? h(
          "div",
          { class: "running-job-round" },
          h("span", null, `Round ${round.number}`, round.attempt > 1 ? ` (attempt ${round.attempt})` : "", " "),
          chip(round.state, round.state),
          h("span", null, ` ${uploads} uploaded of ${target} wanted`),
          declined ? h("span", null, ` · ${declined} declined`) : null,
          h("span", null, ` · ${Math.max(0, expected - uploads - declined)} not answered`),
          h("span", null, ` · ${fmtBytes(round.bytes_uploaded)} received`),
          waitsForSites(round) ? h("span", null, " · ", liveText("countdown", round.deadline_at)) : null,
          h(
            "div",
            { class: "member-answers" },
            memberAnswers(round, members, sitesById).map(({ siteId, site, answer }) =>
              h(
                "span",
                {
                  class: ["chip", `chip-${ANSWER_KINDS[answer]}`],
                  title: ANSWER_TITLES[answer],
                  dataset: { siteId, answer },
                },
                `${ANSWER_MARKS[answer]} ${site?.name ?? siteId}`,
              ),
            ),
          ),
        )
      : null,
  );
}

/** One line per site that is approved or waiting: status, online, what its agent does now. */
function siteGlance(data) {
  const shown = data.sites
    .filter((site) => site.status === "approved" || site.status === "pending")
    .sort((a, b) => a.name.localeCompare(b.name));
  return table(
    ["Site", "Status", "Agent"],
    shown.map((site) => [
      h("strong", null, site.name),
      chip(site.status, site.status),
      site.agent
        ? h(
            "span",
            null,
            h("span", { class: ["dot", site.agent.online ? "dot-online" : "dot-offline"], "aria-hidden": "true" }),
            chip(site.agent.state, site.agent.state),
            h("span", { class: "muted" }, " seen ", liveText("ago", site.agent.last_seen_at)),
          )
        : h("span", { class: "muted" }, "no heartbeat yet"),
    ]),
    { empty: "No approved or pending site.", className: "compact" },
  );
}

function actorName(actor, sitesById) {
  if (actor.startsWith("site:")) return `site ${siteName(sitesById, actor.slice(5))}`;
  if (actor.startsWith("account:")) return actor.slice(8);
  return actor;
}

function subjectName(subject, sitesById, jobsById) {
  return sitesById.get(subject)?.name ?? jobsById.get(subject)?.name ?? subject;
}
