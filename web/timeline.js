// Pure helpers for deployment status, step timeline and time formatting.
// No DOM here. The lifecycle (steps, final statuses) comes from the server's Status enum
// through the generated lifecycle.js module, so the page keeps no list of its own.

import { LIFECYCLE } from "./lifecycle.js";

export const STEPS = LIFECYCLE.steps;
export const STATUSES = LIFECYCLE.statuses;
const FINAL = new Set(LIFECYCLE.final);

export function isFinal(status) {
  return FINAL.has(status);
}

/** Known status or "unknown": safe to use in a CSS class name. */
export function statusKey(status) {
  return STATUSES.includes(status) ? status : "unknown";
}

export function statusLabel(status) {
  if (!STATUSES.includes(status)) return String(status ?? "Unknown");
  return status.charAt(0).toUpperCase() + status.slice(1);
}

/**
 * Server clock estimate. Step durations of a running deployment compare the
 * server's timestamps with "now"; a client clock that is a few seconds off
 * would show negative or inflated durations. Every server timestamp we see
 * is <= the server's now, so client_now - ts over-estimates the offset and
 * the smallest observation is the best estimate.
 */
export const clock = {
  offset: Infinity,
  observe(serverTs) {
    if (typeof serverTs !== "number" || !Number.isFinite(serverTs)) return;
    this.offset = Math.min(this.offset, Date.now() / 1000 - serverTs);
  },
  now() {
    return Date.now() / 1000 - (Number.isFinite(this.offset) ? this.offset : 0);
  },
};

/** Index in STEPS where the deployment is, or stopped (failed/canceled). */
function stopIndex(dep, ts) {
  if (dep.status === "ready") return STEPS.length - 1;
  const index = STEPS.indexOf(dep.status);
  if (index >= 0) return index;
  // failed/canceled: the last step that was reached is where it stopped.
  for (let i = STEPS.length - 2; i >= 0; i -= 1) {
    if (ts[STEPS[i]] != null) return i;
  }
  return 0;
}

/**
 * Steps for the timeline: [{name, label, state, duration}] where state is
 * done | current | failed | canceled | pending | skipped and duration is in
 * seconds (null when unknown). Also returns the total elapsed time.
 */
export function computeSteps(dep, now = clock.now()) {
  const ts = (dep && dep.timestamps) || {};
  const status = dep.status;
  const final = isFinal(status);
  const stop = stopIndex(dep, ts);
  const end = final ? (ts[status] ?? dep.updated_at ?? now) : now;

  const steps = STEPS.map((name, i) => {
    let state;
    if (status === "ready" || i < stop) state = "done";
    else if (i === stop)
      state = status === "failed" ? "failed" : status === "canceled" ? "canceled" : "current";
    else state = final ? "skipped" : "pending";
    return { name, label: statusLabel(name), state, duration: stepDuration(ts, i, stop, end) };
  });

  const start = ts.queued ?? dep.created_at;
  const total = typeof start === "number" ? Math.max(0, end - start) : null;
  return { steps, total };
}

function stepDuration(ts, i, stop, end) {
  const start = ts[STEPS[i]];
  if (start == null || STEPS[i] === "ready") return null; // "ready" is an instant
  // A step lasts until the next step that has a timestamp (steps may be
  // skipped), or until now/the end for the step where things are.
  for (let j = i + 1; j < STEPS.length; j += 1) {
    if (ts[STEPS[j]] != null) return Math.max(0, ts[STEPS[j]] - start);
  }
  return i === stop ? Math.max(0, end - start) : null;
}

export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "";
  if (seconds < 10) return `${seconds.toFixed(1)}s`;
  if (seconds < 60) return `${Math.round(seconds)}s`;
  const s = Math.round(seconds);
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function formatRelative(ts, now = clock.now()) {
  if (typeof ts !== "number") return "";
  const diff = Math.max(0, now - ts);
  if (diff < 10) return "just now";
  if (diff < 60) return `${Math.floor(diff)}s ago`;
  if (diff < 3600) return `${Math.floor(diff / 60)}m ago`;
  if (diff < 86400) return `${Math.floor(diff / 3600)}h ago`;
  if (diff < 7 * 86400) return `${Math.floor(diff / 86400)}d ago`;
  return new Date(ts * 1000).toLocaleDateString();
}

export function formatAbsolute(ts) {
  return typeof ts === "number" ? new Date(ts * 1000).toLocaleString() : "";
}

// The build phases drawn in a project's strip, each from its status's timestamp to the next.
export const PHASES = ["cloning", "installing", "building", "uploading"];

/**
 * {cloning, installing, building, uploading} in seconds (null: not reached) and their total,
 * for a finished deployment; null while it still runs.
 */
export function phaseDurations(dep) {
  if (!dep || !isFinal(dep.status)) return null;
  const byName = new Map(computeSteps(dep).steps.map((step) => [step.name, step.duration]));
  const phases = Object.fromEntries(PHASES.map((name) => [name, byName.get(name) ?? null]));
  const total = PHASES.reduce((sum, name) => sum + (phases[name] ?? 0), 0);
  return { phases, total };
}
