// The aggregator's live events (GET /v1/events, Server-Sent Events), followed for as long as the
// page is logged in.
//
// EventSource cannot send an Authorization header, and the session token must not travel in a
// URL (access logs, proxies, history) nor in a cookie (every POST would then need CSRF
// protection), so the stream is read with fetch and parsed here as the SSE format says. After a
// drop it reconnects with Last-Event-ID, so events published meanwhile still arrive.

const RETRY_MS = [1_000, 2_000, 5_000, 10_000];

/**
 * Follow the stream with ``token`` until ``stop()``. Calls ``onUp()`` whenever it (re)connects
 * to a working stream, ``onDown(reason)`` whenever it drops or the aggregator says it cannot
 * stream, ``onEvent(event)`` for each event (its JSON data) and ``onUnauthorized()`` once if
 * the session is refused.
 */
export function followEvents(token, { onUp, onDown, onEvent, onUnauthorized }) {
  const controller = new AbortController();
  let lastEventId = null;
  let failures = 0;
  // Down until the server says "connected", so the caller polls if the stream never comes up.
  let state = "connecting";

  /** "up", or why the stream is down; the caller hears of each change. */
  const setState = (next) => {
    if (next === state) return;
    state = next;
    if (next === "up") onUp();
    else onDown(next);
  };

  async function run() {
    while (!controller.signal.aborted) {
      try {
        const headers = { Accept: "text/event-stream", Authorization: `Bearer ${token}` };
        if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
        const response = await fetch("/v1/events", {
          headers,
          cache: "no-store",
          credentials: "omit",
          redirect: "error",
          signal: controller.signal,
        });
        if (response.status === 401) {
          onUnauthorized();
          return;
        }
        if (!response.ok || !response.body) throw new Error(`${response.status} ${response.statusText}`);
        for await (const message of readMessages(response.body)) {
          if (message.comment === "coordination unavailable, retrying") {
            setState("the aggregator cannot reach its event store");
          } else if (message.comment !== undefined) {
            // "connected" and keep-alives: the stream works.
            failures = 0;
            setState("up");
          } else {
            if (message.id !== undefined) lastEventId = message.id;
            setState("up");
            try {
              onEvent(JSON.parse(message.data));
            } catch (exc) {
              if (!(exc instanceof SyntaxError)) throw exc;
            }
          }
        }
        throw new Error("the stream ended");
      } catch (exc) {
        if (controller.signal.aborted) return;
        setState(exc.message);
        await new Promise((resolve) => setTimeout(resolve, RETRY_MS[Math.min(failures, RETRY_MS.length - 1)]));
        failures += 1;
      }
    }
  }

  onDown(state);
  run();
  return { stop: () => controller.abort() };
}

/** Messages of an SSE body: { id, event, data } for events, { comment } for comment lines. */
async function* readMessages(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = {};
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines.map((raw) => raw.replace(/\r$/, ""))) {
        if (line === "") {
          if (message.data !== undefined) yield message;
          message = {};
        } else if (line.startsWith(":")) {
          yield { comment: line.slice(1).trim() };
        } else {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") message.data = message.data === undefined ? value : `${message.data}\n${value}`;
          else if (field === "id") message.id = value;
          else if (field === "event") message.event = value;
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}
