// The aggregator's REST API as the dashboard uses it: same origin, JSON, a bearer token.
//
// Only the 8-hour session token is kept, in this tab's sessionStorage; the API token the
// operator pastes is used once, to start the session, and then dropped.

const SESSION_KEY = "fedhe.session";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  get unauthorized() {
    return this.status === 401;
  }
}

let clockOffsetMs = 0;

/** Milliseconds to add to the browser's clock to get the aggregator's (from the Date header). */
export function serverNow() {
  return Date.now() + clockOffsetMs;
}

function noteServerClock(response) {
  const date = Date.parse(response.headers.get("Date") ?? "");
  if (!Number.isNaN(date)) {
    // The header has whole seconds: add half a second so the error is at most ±0.5 s.
    clockOffsetMs = date + 500 - Date.now();
  }
}

async function call(method, path, token, body) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
    });
  } catch (exc) {
    throw new ApiError(0, "unreachable", `cannot reach the aggregator (${exc.message})`);
  }
  noteServerClock(response);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data?.error;
    const message = typeof error?.message === "string" ? error.message : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, error?.code ?? "http_error", message);
  }
  return data;
}

/** The session saved in this tab, or null. */
export function savedSession() {
  try {
    const session = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? "null");
    if (session && typeof session.token === "string" && Date.parse(session.expiresAt) > Date.now()) {
      return session;
    }
  } catch {
    // a damaged entry is the same as none
  }
  sessionStorage.removeItem(SESSION_KEY);
  return null;
}

/** Exchange an API token for a session token and keep only the latter. */
export async function startSession(apiToken) {
  const issued = await call("POST", "/v1/sessions", apiToken.trim());
  const session = { token: issued.token, id: issued.info.id, expiresAt: issued.info.expires_at };
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  return session;
}

/** Forget the session here, and revoke it at the aggregator so a copied token dies too. */
export async function endSession(session) {
  sessionStorage.removeItem(SESSION_KEY);
  if (session) {
    try {
      await call("POST", `/v1/tokens/${encodeURIComponent(session.id)}/revoke`, session.token);
    } catch {
      // already expired or revoked: nothing left to do
    }
  }
}

/** The calls the dashboard makes, all with the session token. */
export class Api {
  constructor(session) {
    this.session = session;
  }

  get(path) {
    return call("GET", path, this.session.token);
  }

  post(path, body = {}) {
    return call("POST", path, this.session.token, body);
  }

  whoami() {
    return this.get("/v1/whoami");
  }

  federations() {
    return this.get("/v1/federations");
  }

  sites() {
    return this.get("/v1/sites");
  }

  jobs() {
    return this.get("/v1/jobs");
  }

  rounds(jobId) {
    return this.get(`/v1/jobs/${encodeURIComponent(jobId)}/rounds`);
  }

  round(jobId, number) {
    return this.get(`/v1/jobs/${encodeURIComponent(jobId)}/rounds/${Number(number)}`);
  }

  audit(limit) {
    return this.get(`/v1/audit?limit=${Number(limit)}`);
  }

  decide(siteId, decision) {
    if (!["approve", "reject", "revoke"].includes(decision)) throw new Error(`unknown decision ${decision}`);
    return this.post(`/v1/sites/${encodeURIComponent(siteId)}/${decision}`);
  }
}
