// Live socket client: one WebSocket, any number of project subscriptions,
// automatic reconnect with resume so a dropped connection loses no log line
// and repeats none.

import { getToken, wsUrl } from "./api.js";

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10_000;
// A connection that stays up this long counts as healthy and resets backoff;
// otherwise a server that accepts and immediately drops us would be hammered.
const STABLE_AFTER_MS = 5_000;
const MAX_RESUME = 100; // the server rejects a larger resume object

/** Delay before reconnect attempt n (0-based): exponential, capped, "equal jitter". */
export function backoffDelay(attempt) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
  // Half fixed, half random: spreads out many tabs reconnecting after a server
  // restart while still guaranteeing some wait.
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/**
 * States reported through onState:
 *   "idle"         no subscription, no socket
 *   "connecting"   first connection attempt
 *   "open"         connected
 *   "reconnecting" connection lost, waiting to retry
 *   "unauthorized" closed with 4401; waits for reconnectNow() with a token
 */
export class LiveClient {
  /**
   * @param {object} handlers
   * @param {(msg: object) => void} handlers.onMessage  every server message;
   *        "logs" messages arrive with already de-duplicated events
   * @param {(state: string) => void} [handlers.onState]
   */
  constructor({ onMessage, onState = () => {} }) {
    this.onMessage = onMessage;
    this.onState = onState;
    this.socket = null;
    this.attempt = 0;
    this.retryTimer = null;
    this.stableTimer = null;
    this.state = "idle";
    /** project name -> Map(deployment id -> last seq received) */
    this.projects = new Map();
    // Unsubscribed on this socket: frames sent before the server saw the
    // unsubscribe may still arrive. If the project is subscribed again, such
    // stale lines would advance lastSeq past the replay and cause a gap, so
    // its logs are ignored until the new "subscribed" snapshot arrives.
    this.unsubscribedHere = new Set();
    this.awaitingSnapshot = new Set();

    // The browser knows better than our backoff when the network is back.
    window.addEventListener("online", () => {
      if (this.state === "reconnecting") this.reconnectNow();
    });
  }

  subscribe(project) {
    if (this.projects.has(project)) return;
    this.projects.set(project, new Map());
    if (this.unsubscribedHere.has(project)) this.awaitingSnapshot.add(project);
    if (this.isOpen()) this.sendSubscribe(project);
    else this.ensureConnecting();
  }

  /** Stop following a project; its resume positions are forgotten too, since
   *  the caller drops the log lines it had for it. */
  unsubscribe(project) {
    if (!this.projects.delete(project)) return;
    this.awaitingSnapshot.delete(project);
    if (this.isOpen()) {
      this.send({ type: "unsubscribe", project });
      this.unsubscribedHere.add(project);
    }
  }

  /**
   * Ask for a deployment's whole log. On subscribe the server replays history
   * only for the newest deployment and those named in `resume`, so an older
   * one is requested by subscribing again with it at seq 0; the other entries
   * carry their lastSeq, so nothing already received is sent twice.
   */
  requestHistory(project, deploymentId) {
    const seqs = this.projects.get(project);
    if (!seqs || seqs.has(deploymentId)) return;
    seqs.set(deploymentId, 0);
    if (this.isOpen()) this.sendSubscribe(project);
  }

  /** Drop the current socket and connect again at once (e.g. new auth token). */
  reconnectNow() {
    this.attempt = 0;
    this.teardown();
    if (this.projects.size) this.connect(this.state === "idle" ? "connecting" : "reconnecting");
  }

  /** Last seq received for a deployment (0 if none). */
  lastSeq(project, deploymentId) {
    return this.projects.get(project)?.get(deploymentId) ?? 0;
  }

  // -- internals ------------------------------------------------------------

  isOpen() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  ensureConnecting() {
    if (this.socket || this.retryTimer) return; // already on its way
    this.connect("connecting");
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.onState(state);
  }

  connect(state) {
    this.setState(state);
    let socket;
    try {
      socket = new WebSocket(wsUrl());
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    this.unsubscribedHere.clear(); // a new socket carries no stale frames
    this.awaitingSnapshot.clear();
    socket.addEventListener("open", () => this.handleOpen(socket));
    socket.addEventListener("message", (event) => this.handleMessage(socket, event));
    // "error" is always followed by "close"; reconnecting from close alone
    // avoids scheduling two retries for one failure.
    socket.addEventListener("close", (event) => this.handleClose(socket, event));
  }

  handleOpen(socket) {
    if (socket !== this.socket) return;
    const token = getToken();
    if (token) this.send({ type: "auth", token }); // must be the first message
    for (const project of this.projects.keys()) this.sendSubscribe(project);
    this.setState("open");
    clearTimeout(this.stableTimer);
    this.stableTimer = setTimeout(() => (this.attempt = 0), STABLE_AFTER_MS);
  }

  handleMessage(socket, event) {
    if (socket !== this.socket) return; // a late frame from a socket we dropped
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return; // not ours to interpret
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "subscribed") this.awaitingSnapshot.delete(msg.project);
    if (msg.type === "logs") {
      const events = this.acceptLogs(msg);
      if (!events.length) return;
      msg = { ...msg, events };
    }
    this.onMessage(msg);
  }

  handleClose(socket, event) {
    if (socket !== this.socket) return;
    this.socket = null;
    clearTimeout(this.stableTimer);
    if (event.code === 4401) {
      // Retrying with the same (missing or wrong) token cannot succeed.
      this.setState("unauthorized");
      this.onMessage({ type: "auth-required" });
      return;
    }
    if (this.projects.size) this.scheduleReconnect();
    else this.setState("idle");
  }

  scheduleReconnect() {
    this.setState("reconnecting");
    clearTimeout(this.retryTimer);
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (this.projects.size) this.connect("reconnecting");
      else this.setState("idle");
    }, delay);
  }

  teardown() {
    clearTimeout(this.retryTimer);
    clearTimeout(this.stableTimer);
    this.retryTimer = null;
    const socket = this.socket;
    this.socket = null; // handlers ignore events from sockets that aren't current
    if (socket) socket.close(1000, "client reconnect");
  }

  sendSubscribe(project) {
    const msg = { type: "subscribe", project };
    const seqs = this.projects.get(project);
    // Newest entries last in the Map; those are the ones worth resuming.
    if (seqs && seqs.size) msg.resume = Object.fromEntries([...seqs].slice(-MAX_RESUME));
    this.send(msg);
  }

  send(msg) {
    if (this.isOpen()) this.socket.send(JSON.stringify(msg));
  }

  /**
   * Keep only events newer than what we already have for that deployment and
   * advance lastSeq. The server promises exactly-once, in-order delivery per
   * socket, but across a reconnect a replay may overlap what we saw.
   */
  acceptLogs(msg) {
    const seqs = this.projects.get(msg.project);
    if (!seqs || !Array.isArray(msg.events)) return []; // unsubscribed meanwhile
    if (this.awaitingSnapshot.has(msg.project)) return []; // stale, see constructor
    let last = seqs.get(msg.deployment) ?? 0;
    const fresh = [];
    for (const ev of msg.events) {
      if (!ev || typeof ev.seq !== "number" || ev.seq <= last) continue;
      fresh.push(ev);
      last = ev.seq;
    }
    if (fresh.length) seqs.set(msg.deployment, last);
    return fresh;
  }
}
