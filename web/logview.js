// Log panel: a virtual list for build logs of 50,000 lines and more.
//
// The lines live in plain arrays (LogLines); the DOM holds only the rows on
// screen plus a small margin, each ROW_PX high (no wrapping: long lines
// scroll sideways), inside a sizer as tall as the whole log. Scrolling,
// appending and searching re-render at most once per animation frame and
// touch only those few rows, so a long log costs memory, not frames.
// Text reaches the DOM through ansi.js as text nodes: log output is untrusted.

import { findAll, parseAnsi, plainText, renderSegments } from "./ansi.js";

export const ROW_PX = 18; // keep in sync with --log-line in style.css
const OVERSCAN = 20; // rows rendered above and below the viewport
const PAD_PX = 10; // space above the first and below the last row
const BOTTOM_TOLERANCE_PX = 4;
const STREAMS = ["stdout", "stderr", "system"];

/** One deployment's log as parallel arrays (no objects per line kept). */
export class LogLines {
  constructor() {
    this.seqs = [];
    this.times = [];
    this.streams = []; // index into STREAMS
    this.raws = []; // as the server sent it, escapes included
    this.plains = []; // what is shown, for search and download
  }

  get length() {
    return this.seqs.length;
  }

  push(events) {
    for (const ev of events) {
      this.seqs.push(ev.seq);
      this.times.push(typeof ev.ts === "number" ? ev.ts : null);
      this.streams.push(Math.max(0, STREAMS.indexOf(ev.stream)));
      const raw = String(ev.text ?? "").replace(/\r?\n$/, "");
      this.raws.push(raw);
      this.plains.push(plainText(raw));
    }
  }

  /** Index of the line with that seq, or -1 (seqs only grow). */
  indexOfSeq(seq) {
    let lo = 0;
    let hi = this.seqs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.seqs[mid] === seq) return mid;
      if (this.seqs[mid] < seq) lo = mid + 1;
      else hi = mid - 1;
    }
    return -1;
  }

  /** The log as a text file: one line per event, escapes removed. */
  toText() {
    return this.plains.length ? this.plains.join("\n") + "\n" : "";
  }
}

export class LogView {
  /**
   * @param {HTMLElement} scroller  the scrollable panel
   * @param {object} [opts]
   * @param {(following: boolean, unseen: number) => void} [opts.onFollowChange]
   * @param {(current: number, total: number) => void} [opts.onSearchChange]
   * @param {(seq: number) => string} [opts.lineHref]  deep link of a line
   */
  constructor(scroller, { onFollowChange = () => {}, onSearchChange = () => {}, lineHref = () => null } = {}) {
    this.scroller = scroller;
    this.onFollowChange = onFollowChange;
    this.onSearchChange = onSearchChange;
    this.lineHref = lineHref;
    this.sizer = document.createElement("div");
    this.sizer.className = "log-sizer";
    this.rows = document.createElement("div");
    this.rows.className = "log-rows";
    this.sizer.append(this.rows);
    this.scroller.replaceChildren(this.sizer);
    this.lines = new LogLines();
    this.frame = 0;
    this.rendered = { first: -1, last: -1, version: -1 };
    this.version = 0; // bumps whenever rendered rows may be stale
    // Following = keep the newest line in view. Scrolling up stops it;
    // reaching the bottom again (or the button) restarts it.
    this.following = true;
    this.unseen = 0;
    this.lastScrollTop = 0;
    this.query = "";
    this.matches = []; // line indices that contain the query
    this.current = -1; // index into matches
    this.targetSeq = null; // deep-linked line, highlighted
    this.pendingReveal = false; // scroll to targetSeq once it arrives
    this.scroller.addEventListener("scroll", () => this.handleScroll(), { passive: true });
    // The viewport's height changes with the window (phones rotate).
    new ResizeObserver(() => this.schedule()).observe(this.scroller);
  }

  /** Show another deployment's lines (a LogLines, shared with the caller). */
  show(lines) {
    this.lines = lines;
    this.unseen = 0;
    this.targetSeq = null;
    this.rebuildMatches();
    this.version += 1;
    this.setFollowing(true);
    this.schedule();
  }

  /** The caller pushed `count` lines to the LogLines shown. */
  appended(count) {
    if (this.query) {
      const lower = this.query.toLowerCase();
      for (let i = this.lines.length - count; i < this.lines.length; i += 1) {
        if (this.lines.plains[i].toLowerCase().includes(lower)) this.matches.push(i);
      }
      if (this.current < 0 && this.matches.length) this.current = 0;
      this.reportSearch();
    }
    if (!this.following) {
      this.unseen += count;
      this.onFollowChange(false, this.unseen);
    }
    if (this.targetSeq != null && this.pendingReveal) this.revealSeq(this.targetSeq);
    this.version += 1; // the last rows rendered may have been the old end
    this.schedule();
  }

  scrollToBottom() {
    this.setFollowing(true);
    this.schedule();
  }

  /** Highlight the line with that seq and scroll it into view, now or once it arrives. */
  revealSeq(seq) {
    this.targetSeq = seq;
    const index = this.lines.indexOfSeq(seq);
    this.pendingReveal = index < 0;
    this.version += 1;
    if (index >= 0) this.scrollToIndex(index);
    else this.schedule();
    return index >= 0;
  }

  /** Highlight the line with that seq where it is, without scrolling. */
  highlightSeq(seq) {
    this.targetSeq = seq;
    this.pendingReveal = false;
    this.version += 1;
    this.schedule();
  }

  /** Search the log; returns the number of matching lines. */
  search(query) {
    this.query = query;
    this.rebuildMatches();
    // From the first hit, not from the view: a follower sits at the end, and
    // "1 of N" should mean the first line that has it.
    if (this.matches.length) this.goToMatch(0);
    this.version += 1;
    this.schedule();
    return this.matches.length;
  }

  nextMatch(step = 1) {
    if (!this.matches.length) return;
    const n = this.matches.length;
    this.goToMatch((((this.current + step) % n) + n) % n);
  }

  /** Rows currently in the DOM (for tests and for the curious). */
  get domRows() {
    return this.rows.childElementCount;
  }

  // -- internals ------------------------------------------------------------

  rebuildMatches() {
    this.matches = [];
    this.current = -1;
    if (this.query) {
      const lower = this.query.toLowerCase();
      const { plains } = this.lines;
      for (let i = 0; i < plains.length; i += 1) {
        if (plains[i].toLowerCase().includes(lower)) this.matches.push(i);
      }
    }
    this.reportSearch();
  }

  goToMatch(at) {
    this.current = at;
    this.reportSearch();
    this.version += 1;
    this.scrollToIndex(this.matches[at]);
  }

  reportSearch() {
    this.onSearchChange(this.current, this.matches.length);
  }

  scrollToIndex(index) {
    this.setFollowing(false);
    const el = this.scroller;
    this.sizeSizer();
    el.scrollTop = Math.max(0, PAD_PX + index * ROW_PX - (el.clientHeight - ROW_PX) / 2);
    this.lastScrollTop = el.scrollTop;
    this.schedule();
  }

  isAtBottom() {
    const el = this.scroller;
    return el.scrollHeight - el.scrollTop - el.clientHeight <= BOTTOM_TOLERANCE_PX;
  }

  handleScroll() {
    const top = this.scroller.scrollTop;
    if (this.isAtBottom()) this.setFollowing(true);
    else if (top < this.lastScrollTop - 1) this.setFollowing(false); // moved up: reading
    this.lastScrollTop = top;
    this.schedule();
  }

  setFollowing(following) {
    const changed = following !== this.following || (following && this.unseen > 0);
    this.following = following;
    if (following) this.unseen = 0;
    if (changed) this.onFollowChange(following, this.unseen);
  }

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  sizeSizer() {
    const height = `${this.lines.length * ROW_PX + 2 * PAD_PX}px`;
    if (this.sizer.style.height !== height) this.sizer.style.height = height;
  }

  render() {
    this.frame = 0;
    const el = this.scroller;
    this.sizeSizer();
    if (this.following) {
      el.scrollTop = el.scrollHeight;
      this.lastScrollTop = el.scrollTop;
    }
    const count = this.lines.length;
    const top = el.scrollTop - PAD_PX;
    const first = Math.max(0, Math.floor(top / ROW_PX) - OVERSCAN);
    const last = Math.min(count, Math.ceil((top + el.clientHeight) / ROW_PX) + OVERSCAN);
    const r = this.rendered;
    if (r.first === first && r.last === last && r.version === this.version) return;
    this.rendered = { first, last, version: this.version };

    const marked = new Set();
    if (this.query) for (const i of this.matches) if (i >= first && i < last) marked.add(i);
    const currentLine = this.current >= 0 ? this.matches[this.current] : -1;
    const fragment = document.createDocumentFragment();
    for (let i = first; i < last; i += 1) {
      fragment.append(this.renderRow(i, marked.has(i), i === currentLine));
    }
    this.rows.style.transform = `translateY(${PAD_PX + first * ROW_PX}px)`;
    this.rows.replaceChildren(fragment);
  }

  renderRow(i, marked, isCurrent) {
    const { lines } = this;
    const seq = lines.seqs[i];
    const row = document.createElement("div");
    row.className = `log-line ${STREAMS[lines.streams[i]]}`;
    if (seq === this.targetSeq) row.classList.add("target");
    if (isCurrent) row.classList.add("current-match");
    row.setAttribute("data-seq", String(seq));

    // Number and time are links/labels outside the selectable text, so
    // copying a selection copies the log alone.
    const num = document.createElement("a");
    num.className = "log-num";
    num.textContent = String(seq);
    num.tabIndex = -1; // the scroller is the tab stop, not each of 50,000 links
    const href = this.lineHref(seq);
    if (href) num.setAttribute("href", href);
    const time = document.createElement("span");
    time.className = "log-time";
    time.textContent = formatClock(lines.times[i]);
    const text = document.createElement("span");
    text.className = "log-text";
    const marks = marked ? findAll(lines.plains[i], this.query) : [];
    renderSegments(text, parseAnsi(lines.raws[i]), marks, isCurrent ? 0 : -1);
    // Colour alone does not tell stderr apart (screen readers, colour
    // blindness): a marker column says it too.
    const tag = document.createElement("span");
    tag.className = "log-stream";
    tag.textContent = lines.streams[i] === 1 ? "err" : "";
    row.append(num, time, tag, text);
    return row;
  }
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

/** Local wall-clock time of a log line, HH:MM:SS.mmm. */
export function formatClock(ts) {
  if (typeof ts !== "number") return "";
  const d = new Date(ts * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}
