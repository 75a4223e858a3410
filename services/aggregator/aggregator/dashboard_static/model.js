// What the views derive from the API's answers (pure functions, no DOM).

export const ENVIRONMENT_LABELS = {
  fedhe: "fedhe",
  python: "Python",
  tensorflow: "TensorFlow",
  tensorflow_privacy: "TF Privacy",
  tenseal: "TenSEAL",
};

export function byId(items) {
  return new Map(items.map((item) => [item.id, item]));
}

export function siteName(sitesById, siteId) {
  return sitesById.get(siteId)?.name ?? siteId;
}

/** site id -> the federations (overviews) it is an active member of. */
export function membershipsBySite(federations) {
  const memberships = new Map();
  for (const federation of federations) {
    for (const siteId of federation.members) {
      if (!memberships.has(siteId)) memberships.set(siteId, []);
      memberships.get(siteId).push(federation);
    }
  }
  return memberships;
}

/** The latest attempt of each round number, in round order. */
export function latestAttempts(rounds) {
  const latest = new Map();
  for (const round of rounds) {
    const seen = latest.get(round.number);
    if (!seen || round.attempt > seen.attempt) latest.set(round.number, round);
  }
  return [...latest.values()].sort((a, b) => a.number - b.number);
}

/** The attempt a running job is collecting now (or the last one, once the job ended). */
export function currentAttempt(job, rounds) {
  const ofCurrent = rounds.filter((round) => round.number === job.current_round);
  if (ofCurrent.length) return ofCurrent.reduce((a, b) => (b.attempt > a.attempt ? b : a));
  return rounds.length ? rounds[rounds.length - 1] : null;
}

/** Published training rounds (a statistics step, when the job has one, is round 0 and not counted). */
export function publishedRounds(job, rounds) {
  if (rounds) {
    const training = rounds.filter((r) => r.state === "published" && r.kind === "training");
    return new Set(training.map((r) => r.number)).size;
  }
  if (job.status === "completed") return job.rounds;
  return Math.max(0, job.current_round - (job.statistics ? 1 : 0));
}

/** The global model's sample-weighted accuracy and loss, as the aggregator combines them once
 * the job's min_eval_sites sites have evaluated it (null until then). */
export function globalScores(round) {
  const metrics = round.global_metrics ?? {};
  return { accuracy: metrics.accuracy ?? null, loss: metrics.loss ?? null };
}

/** Whether a round attempt still waits for sites: advertising keys or uploading (open,
 * collecting), or, in a secure round, answering the unmasking. */
export function waitsForSites(round) {
  return round.state === "open" || round.state === "collecting" || round.state === "unmasking";
}

/**
 * Each member site's answer to a round: uploaded, declined, advertised (a secure round's key
 * advertised, its upload still to come), waiting (may still answer) or unable (a member at the
 * keyserver that is not approved here, so it cannot upload). An uploaded site of a secure round
 * also says whether it answered the unmasking. Sites that answered without being listed as
 * members (membership changed) are kept too.
 */
export function memberAnswers(round, memberIds, sitesById) {
  const uploads = new Map(round.submissions.map((s) => [s.site_id, s]));
  const declines = new Map(round.declines.map((d) => [d.site_id, d]));
  const advertised = new Set(round.advertised ?? []);
  const unmasked = new Set(round.answered ?? []);
  const ids = [...new Set([...memberIds, ...uploads.keys(), ...declines.keys(), ...advertised])];
  const answers = ids.map((siteId) => {
    const site = sitesById.get(siteId) ?? null;
    let answer = "waiting";
    if (uploads.has(siteId)) answer = "uploaded";
    else if (declines.has(siteId)) answer = "declined";
    else if (advertised.has(siteId)) answer = "advertised";
    else if (site?.status !== "approved") answer = "unable";
    return {
      siteId,
      site,
      answer,
      upload: uploads.get(siteId),
      decline: declines.get(siteId),
      unmasked: unmasked.has(siteId),
    };
  });
  const order = { uploaded: 0, advertised: 1, declined: 2, waiting: 3, unable: 4 };
  return answers.sort(
    (a, b) => order[a.answer] - order[b.answer] || (a.site?.name ?? a.siteId).localeCompare(b.site?.name ?? b.siteId),
  );
}

/** The environment fields where a site's agent differs from what a job requires. */
export function environmentDifferences(siteEnvironment, jobEnvironment) {
  if (!siteEnvironment || !jobEnvironment) return [];
  return Object.keys(ENVIRONMENT_LABELS).filter((key) => siteEnvironment[key] !== jobEnvironment[key]);
}

/** The running job a site currently reports working on, if any. */
export function siteJob(site, jobsById) {
  const jobId = site.agent?.job_id;
  return jobId ? (jobsById.get(jobId) ?? null) : null;
}

/**
 * The ε a site had spent when it declined ``round``: the ε it reported with its latest upload to
 * an earlier round of this job, else what its agent reports while still on this job (a site that
 * declines spends nothing more). ``epsilon`` is null when neither says: the site uploaded to no
 * earlier round, so it spent nothing in this job.
 */
export function epsilonBeforeDecline(rounds, round, siteId, agent) {
  let spent = null;
  for (const earlier of rounds) {
    const before = earlier.number < round.number || (earlier.number === round.number && earlier.attempt < round.attempt);
    const upload = before ? earlier.submissions.find((s) => s.site_id === siteId) : undefined;
    if (typeof upload?.metrics.epsilon === "number") spent = Math.max(spent ?? 0, upload.metrics.epsilon);
  }
  if (spent === null && agent?.privacy && agent.job_id === round.job_id) spent = agent.privacy.epsilon;
  return { epsilon: spent, limit: agent?.privacy?.max_epsilon ?? null };
}

export const DECLINE_REASONS = {
  budget_exhausted: "privacy budget exhausted",
  refused: "refused",
  data_problem: "data problem",
  environment_mismatch: "environment mismatch",
  stale_key: "stale key",
  other: "other",
};
