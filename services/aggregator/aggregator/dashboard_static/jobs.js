// Jobs: the list, and one job's page: the live round, charts per round and the round history.

import { createJobCharts } from "./charts.js";
import {
  chip,
  fmtBytes,
  fmtDateTime,
  fmtNumber,
  fmtPercent,
  fmtProbability,
  fmtSeconds,
  h,
  liveText,
  progress,
  renderIfChanged,
  roundNote,
  routeLink,
  table,
} from "./dom.js";
import {
  DECLINE_REASONS,
  ENVIRONMENT_LABELS,
  waitsForSites,
  byId,
  currentAttempt,
  epsilonBeforeDecline,
  globalScores,
  memberAnswers,
  publishedRounds,
  siteName,
} from "./model.js";

export function createJobsView() {
  const list = h("div");
  const element = h("div", { class: "jobs" }, h("h1", null, "Jobs"), h("section", { class: "card" }, list));

  function update(data) {
    const federationsById = byId(data.federations);
    const jobs = [...data.jobs].sort((a, b) => b.created_at.localeCompare(a.created_at));
    renderIfChanged(list, JSON.stringify([jobs, data.federations.map((f) => [f.id, f.name])]), () =>
      table(
        ["Job", "Federation", "Status", "Progress", "Created", "Finished"],
        jobs.map((job) => [
          h(
            "span",
            null,
            routeLink(`jobs/${job.id}`, h("strong", null, job.name)),
            h("div", { class: "mono muted" }, job.id),
          ),
          federationsById.get(job.federation_id)?.name ?? job.federation_id,
          chip(job.status, job.status),
          progress(publishedRounds(job), job.rounds, { label: `${publishedRounds(job)} / ${job.rounds} rounds` }),
          fmtDateTime(job.created_at),
          fmtDateTime(job.finished_at),
        ]),
        { empty: "No job yet. Create one with `fedhe job create`." },
      ),
    );
  }

  return { section: "jobs", element, wants: {}, update };
}

export function createJobView(ctx, jobId) {
  const header = h("div", { class: "job-header" });
  const live = h("div");
  const history = h("div");
  const charts = createJobCharts();
  const element = h(
    "div",
    { class: "job", dataset: { jobId } },
    h("p", { class: "crumbs" }, routeLink("jobs", "Jobs"), " / "),
    header,
    h("section", { class: "card", id: "live-round", "aria-live": "polite" }, live),
    h("section", { class: "card", id: "job-charts" }, h("h2", null, "Per round"), charts.element),
    h("section", { class: "card", id: "round-history" }, h("h2", null, "Round history"), history),
  );

  function update(data) {
    const job = data.jobs.find((candidate) => candidate.id === jobId);
    if (!job) {
      renderIfChanged(header, "missing", () => h("h1", null, `No job ${jobId}`));
      return;
    }
    const sitesById = byId(data.sites);
    const federation = data.federations.find((f) => f.id === job.federation_id);
    const members = federation?.members ?? [];
    const rounds = data.rounds ?? [];
    const siteKey = data.sites.map((s) => [s.id, s.name, s.status, s.agent]);
    renderIfChanged(header, JSON.stringify([job, federation?.name]), () => jobHeader(job, federation));
    const jobNames = data.jobs.map((j) => [j.id, j.name]);
    const liveKey = JSON.stringify([job.status, job.current_round, rounds, members, siteKey, jobNames]);
    renderIfChanged(live, liveKey, () => liveRound(job, rounds, members, sitesById, byId(data.jobs)));
    renderIfChanged(history, JSON.stringify([rounds, siteKey]), () => roundHistory(rounds, sitesById));
    charts.update(rounds, data.sites);
  }

  return { section: "jobs", element, wants: { rounds: jobId }, update };
}

function jobHeader(job, federation) {
  const model = job.model;
  const layers = [model.input_shape.join("×"), ...(model.hidden_units ?? []), model.num_classes].join("–");
  const algorithm = job.algorithm.name === "fedprox" ? `FedProx μ ${job.algorithm.proximal_mu}` : "FedAvg";
  const sampling =
    job.sampling.mode === "all" ? "every member" : `${job.sampling.mode} ${job.sampling.fraction} (min ${job.sampling.min_sites})`;
  const facts = [
    ["Federation", federation ? `${federation.name} (${federation.members.length} members)` : job.federation_id],
    ["Rounds", `${publishedRounds(job)} of ${job.rounds} published`],
    [
      "Sites per round",
      `min ${job.min_sites}, closes at ${job.target_sites ?? job.min_sites} uploads or when every member answered`,
    ],
    ["Round deadline", fmtSeconds(job.round_deadline_s)],
    ["Model", `${model.architecture} ${layers} · ${job.num_parameters.toLocaleString()} parameters`],
    ["Algorithm", `${algorithm} · server momentum ${job.algorithm.server_momentum} · sites: ${sampling}`],
    ["Encryption", `${job.format_id}${job.statistics ? " · encrypted statistics step first" : ""}`],
    [
      "Secure aggregation",
      job.secure_aggregation
        ? `on · t = ${job.secure_aggregation.threshold}: the coordinator with fewer than t members reads no update · ` +
          `unmasking deadline ${fmtSeconds(job.secure_aggregation.phase_deadline_s)}`
        : "off: any one member with the coordinator can read an update",
    ],
    ["Training", `${job.local_epochs} epoch(s) · batch ${job.batch_size} · learning rate ${job.learning_rate}`],
    ["DP-SGD", `noise ${job.dp.noise_multiplier} · clip ${job.dp.l2_norm_clip} · δ ${fmtProbability(job.dp.delta)}`],
    [
      "Environment",
      Object.entries(ENVIRONMENT_LABELS)
        .map(([key, label]) => `${label} ${job.environment[key]}`)
        .join(" · "),
    ],
    ["Created", fmtDateTime(job.created_at)],
    job.finished_at ? ["Finished", fmtDateTime(job.finished_at)] : null,
  ].filter(Boolean);
  return [
    h("h1", null, job.name, " ", chip(job.status, job.status)),
    h("div", { class: "mono muted" }, job.id),
    h("dl", { class: "facts" }, facts.map(([term, value]) => [h("dt", null, term), h("dd", null, value)])),
  ];
}

function liveRound(job, rounds, members, sitesById, jobsById) {
  const round = currentAttempt(job, rounds);
  if (!round) return [h("h2", null, "Live round"), h("p", { class: "muted" }, "Waiting for the first round…")];
  const target = job.target_sites ?? job.min_sites;
  const answers = memberAnswers(round, members, sitesById);
  const count = (answer) => answers.filter((a) => a.answer === answer).length;
  const open = job.status === "running" && waitsForSites(round);
  const title =
    job.status === "running" ? `Live round ${round.number}` : `Job ${job.status}: last round ${round.number}`;
  return [
    h(
      "div",
      { class: "live-head" },
      h(
        "h2",
        { id: "live-round-title", dataset: { round: round.number, attempt: round.attempt, state: round.state } },
        title,
        round.attempt > 1 ? ` (attempt ${round.attempt})` : "",
        h("span", { class: "muted title-note" }, ` of rounds 0–${job.rounds - 1}`),
        " ",
        chip(round.state, round.state),
      ),
      open
        ? h("div", { class: "countdown", id: "countdown" }, liveText("countdown", round.deadline_at))
        : h("div", { class: "countdown done" }, roundEnd(round)),
    ),
    h(
      "div",
      { class: "live-summary" },
      h(
        "div",
        null,
        progress(round.num_submissions, target, {
          label: `${round.num_submissions} of ${target} uploads wanted (min ${job.min_sites})`,
          marker: job.min_sites,
        }),
        h("div", { class: "muted round-opened", id: "round-opened" }, `opened ${fmtDateTime(round.opened_at)}`),
      ),
      h(
        "div",
        { class: "live-figures" },
        figure("uploaded", count("uploaded"), "uploaded"),
        round.secure ? figure("key advertised", count("advertised"), "advertised") : null,
        round.secure ? figure("unmasking answered", round.answered.length, "unmasked") : null,
        figure("declined", count("declined"), "declined"),
        figure("not answered", count("waiting"), "waiting"),
        figure("received", fmtBytes(round.bytes_uploaded), "bytes"),
        figure("samples", round.total_samples.toLocaleString(), "samples"),
      ),
    ),
    round.failure_reason ? h("p", { class: "failure" }, `Failed: ${round.failure_reason}`) : null,
    table(
      ["Site", "Answer", "Details", "Agent in this job"],
      answers.map((answer) => answerRow(answer, round, rounds, jobsById)),
      { empty: "This federation has no members yet.", className: "answers" },
    ),
  ];
}

function roundEnd(round) {
  if (round.published_at) return `published ${fmtDateTime(round.published_at)} after ${fmtSeconds(round.duration_s)}`;
  if (round.closed_at) return `closed ${fmtDateTime(round.closed_at)}`;
  return `deadline was ${fmtDateTime(round.deadline_at)}`;
}

function figure(label, value, id) {
  return h(
    "div",
    { class: "figure", id: `figure-${id}` },
    h("div", { class: "figure-value" }, value),
    h("div", { class: "figure-label" }, label),
  );
}

function answerRow({ siteId, site, answer, upload, decline, unmasked }, round, rounds, jobsById) {
  let status;
  let details;
  if (answer === "uploaded") {
    status = chip("uploaded", "uploaded");
    const epsilon = upload.metrics.epsilon;
    details = [
      `${fmtDateTime(upload.received_at)} · ${fmtBytes(upload.num_bytes)} · ${upload.num_samples} samples`,
      typeof epsilon === "number" ? ` · ε ${fmtNumber(epsilon)}` : "",
      typeof upload.metrics.train_loss === "number" ? ` · train loss ${fmtNumber(upload.metrics.train_loss, 3)}` : "",
      unmasked ? " · unmasking answered" : "",
    ].join("");
  } else if (answer === "advertised") {
    status = chip("key advertised", "advertised");
    details = h(
      "span",
      { class: "muted" },
      round.state === "open" ? "waiting for the roster to close" : "in the roster; training and uploading",
    );
  } else if (answer === "declined") {
    status = chip("declined", "declined");
    details = [
      h("strong", null, DECLINE_REASONS[decline.reason] ?? decline.reason),
      decline.message ? `: ${decline.message}` : "",
      h("span", { class: "muted" }, ` (${fmtDateTime(decline.at)})`),
      spentBefore(epsilonBeforeDecline(rounds, round, siteId, site?.agent)),
    ];
  } else if (answer === "waiting") {
    status = chip(waitsForSites(round) ? "not answered yet" : "did not answer", "waiting");
    details = h("span", { class: "muted" }, waitsForSites(round) ? "may still upload or decline" : "");
  } else {
    status = chip("cannot answer", "neutral");
    details = h("span", { class: "muted" }, `member at the keyserver, but ${site ? site.status : "unknown"} here`);
  }
  return h(
    "tr",
    { dataset: { siteId, answer } },
    h(
      "td",
      null,
      h("strong", null, site?.name ?? siteId),
      site ? h("div", { class: "muted" }, site.organisation) : null,
    ),
    h("td", null, status),
    h("td", null, details),
    h("td", { class: "agent-in-job" }, agentInJob(site?.agent, round.job_id, jobsById)),
  );
}

/** "ε 1.23 spent before declining (limit 2.0)" beside a decline. */
function spentBefore(spent) {
  if (spent.epsilon === null) return h("div", { class: "spent-before" }, "no ε spent in this job before declining");
  const limit = spent.limit === null ? "" : ` (limit ${fmtNumber(spent.limit, 1)})`;
  return h("div", { class: "spent-before" }, `ε ${fmtNumber(spent.epsilon)} spent before declining${limit}`);
}

/** What a site's agent does in this job; an agent busy with another job says only which. */
function agentInJob(agent, jobId, jobsById) {
  if (!agent) return h("span", { class: "muted" }, "no heartbeat");
  const dot = h("span", { class: ["dot", agent.online ? "dot-online" : "dot-offline"], "aria-hidden": "true" });
  if (agent.job_id && agent.job_id !== jobId) {
    const other = jobsById.get(agent.job_id)?.name ?? agent.job_id;
    return [dot, h("span", { class: "muted" }, "busy with ", routeLink(`jobs/${agent.job_id}`, other))];
  }
  return [
    dot,
    chip(agent.state, agent.state),
    roundNote(agent.round),
    agent.message ? h("div", { class: "agent-message" }, agent.message) : null,
  ];
}

function roundHistory(rounds, sitesById) {
  const declined = (round, decline) => {
    const spent = epsilonBeforeDecline(rounds, round, decline.site_id, sitesById.get(decline.site_id)?.agent);
    const reason = DECLINE_REASONS[decline.reason] ?? decline.reason;
    const epsilon = spent.epsilon === null ? " · no ε spent in this job" : ` · ε ${fmtNumber(spent.epsilon)} spent`;
    return h("div", null, `${siteName(sitesById, decline.site_id)} (${reason}${epsilon})`);
  };
  return table(
    ["Round", "State", "Uploaded", "Declined", "Global accuracy", "Global loss", "Bytes", "Duration"],
    [...rounds]
      .sort((a, b) => b.number - a.number || b.attempt - a.attempt)
      .map((round) => {
        const scores = globalScores(round);
        return h(
          "tr",
          { dataset: { round: round.number, attempt: round.attempt } },
          h(
            "td",
            null,
            String(round.number),
            round.attempt > 1 ? h("span", { class: "muted" }, ` attempt ${round.attempt}`) : null,
          ),
          h(
            "td",
            null,
            chip(round.state, round.state),
            round.failure_reason ? h("div", { class: "failure" }, round.failure_reason) : null,
          ),
          h("td", null, round.submissions.map((s) => siteName(sitesById, s.site_id)).join(", ") || "—"),
          h(
            "td",
            null,
            round.declines.length ? round.declines.map((d) => declined(round, d)) : "—",
          ),
          h("td", { class: "num" }, fmtPercent(scores.accuracy)),
          h("td", { class: "num" }, fmtNumber(scores.loss, 3)),
          // The round's figures as the aggregator serves them (RoundPublic.bytes_uploaded, .duration_s).
          h("td", { class: "num bytes" }, fmtBytes(round.bytes_uploaded)),
          h("td", { class: "num duration" }, fmtSeconds(round.duration_s)),
        );
      }),
    { empty: "No round yet.", className: "history" },
  );
}
