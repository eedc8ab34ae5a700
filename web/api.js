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

/** apiFetch + JSON decoding; throws ApiError with the server's message on non-2xx. */
export async function apiJson(path, options = {}) {
  let response;
  try {
    response = await apiFetch(path, options);
  } catch {
    throw new ApiError(0, "Cannot reach the DeployHub server. Check your connection and try again.");
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
