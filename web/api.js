// HTTP helpers for the DeployHub API.
//
// Every URL is resolved against document.baseURI rather than "/" because the
// app may be mounted under a prefix (aiohttp add_subapp): a page served at
// /something/ must talk to /something/api/..., never to /api/....

const TOKEN_KEY = "deployhub.token";

/** Absolute URL of an API path, e.g. apiUrl("projects") -> ".../api/projects". */
export function apiUrl(path) {
  // Strip a leading slash so the path stays relative to the API root.
  return new URL(String(path).replace(/^\/+/, ""), new URL("api/", document.baseURI)).href;
}

/** ws:// or wss:// URL of the live socket, same relative path as the API. */
export function wsUrl() {
  const url = new URL(apiUrl("ws"));
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || null;
  } catch {
    return null; // storage can be disabled (privacy modes); behave as signed out
  }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* nothing useful to do: the token just won't persist */
  }
}

/** Error carrying the HTTP status and the server's {"error": "..."} message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

/** Fired on window whenever the server answers 401, so the UI can ask for a token. */
export const AUTH_REQUIRED_EVENT = "deployhub:auth-required";

/**
 * fetch() against the API root, adding the bearer token when one is stored.
 * `options.json` (if given) is serialised as the JSON request body.
 * Resolves with the Response; a 401 also fires AUTH_REQUIRED_EVENT.
 */
export async function apiFetch(path, options = {}) {
  const { json, ...init } = options;
  const headers = new Headers(init.headers);
  headers.set("Accept", "application/json");
  const token = getToken();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  }
  const response = await fetch(apiUrl(path), { ...init, headers });
  if (response.status === 401) {
    window.dispatchEvent(new CustomEvent(AUTH_REQUIRED_EVENT));
  }
  return response;
}

// -- outages --------------------------------------------------------------------
//
// While the server is unreachable, or answers 503 with Retry-After (its Redis is away), the
// page says "reconnecting…" and one probe loop retries with backoff; reads (GET) wait for it
// and then go again, so every view fills in by itself once the server is back. A write is
// never sent twice: it fails with the server's message.

/** Fired on window with detail {away: boolean, reason: string} when that changes. */
export const SERVER_STATE_EVENT = "deployhub:server-state";
const PROBE_MIN_MS = 1_000;
const PROBE_MAX_MS = 10_000;
let outage = null; // {reason, back: Promise, resolve} while the server is away

function isOutage(response) {
  // A 503 without Retry-After is a refusal (builds cannot run here), not an outage.
  return response === null || (response.status === 503 && response.headers.has("Retry-After"));
}

function retryAfterMs(response) {
  const seconds = Number(response?.headers.get("Retry-After"));
  return Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : PROBE_MAX_MS;
}

/** Note that the server is away (`response` null: unreachable) and start probing it. */
export function serverAway(response) {
  const reason =
    response === null
      ? "The DeployHub server cannot be reached."
      : "DeployHub's database (Redis) is not answering.";
  if (outage) {
    outage.reason = reason;
    return outage.back;
  }
  let resolve;
  const back = new Promise((r) => (resolve = r));
  outage = { reason, back, resolve };
  window.dispatchEvent(new CustomEvent(SERVER_STATE_EVENT, { detail: { away: true, reason } }));
  probe(0, retryAfterMs(response));
  return back;
}

async function probe(attempt, ceilingMs) {
  // Exponential with equal jitter, never longer than the server asked us to wait.
  const ceiling = Math.min(ceilingMs, PROBE_MAX_MS, PROBE_MIN_MS * 2 ** attempt);
  await new Promise((r) => setTimeout(r, ceiling / 2 + Math.random() * (ceiling / 2)));
  let response = null;
  try {
    response = await apiFetch("server");
  } catch {
    /* still unreachable */
  }
  if (isOutage(response)) {
    if (outage) outage.reason = response === null ? "The DeployHub server cannot be reached." : outage.reason;
    probe(attempt + 1, response ? retryAfterMs(response) : ceilingMs);
    return;
  }
  const done = outage;
  outage = null;
  window.dispatchEvent(new CustomEvent(SERVER_STATE_EVENT, { detail: { away: false, reason: "" } }));
  done?.resolve();
}

/** apiFetch + JSON decoding; throws ApiError with the server's message on non-2xx. A GET
 *  made while the server is away waits for it to come back, then goes again. */
export async function apiJson(path, options = {}) {
  const read = (options.method ?? "GET").toUpperCase() === "GET";
  let response;
  for (;;) {
    response = null;
    try {
      response = await apiFetch(path, options);
    } catch {
      /* unreachable: an outage like a 503 */
    }
    if (!isOutage(response)) break;
    const back = serverAway(response);
    if (!read) {
      if (response === null) {
        throw new ApiError(0, "Cannot reach the DeployHub server. Check your connection and try again.");
      }
      break; // the 503's own message below
    }
    await back;
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message =
      body && typeof body.error === "string" && body.error
        ? body.error
        : response.status === 401
          ? "Sign in required"
          : `Request failed (HTTP ${response.status})`;
    throw new ApiError(response.status, message);
  }
  return body;
}

/** One look at the server (GET api/server); an outage starts the probe loop. */
export async function checkServer() {
  let response = null;
  try {
    response = await apiFetch("server");
  } catch {
    /* unreachable */
  }
  if (isOutage(response)) serverAway(response);
  return response;
}
