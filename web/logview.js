// Log panel renderer built for very long build logs (100k+ lines).
//
// - Lines are queued and flushed once per animation frame under a time
//   budget, so a burst of lines never blocks input or painting.
// - DOM is built in a DocumentFragment and appended in one go per frame.
// - Lines are grouped into chunks; full chunks get content-visibility:auto
//   (see style.css) so the browser skips layout/paint of off-screen ones.
// - Text is always set with textContent: log output is untrusted.

const CHUNK_LINES = 500;
const FRAME_BUDGET_MS = 8; // leave the rest of a 16ms frame for the browser
const MIN_LINES_PER_FRAME = 200; // guarantee progress on slow machines
const STICK_THRESHOLD_PX = 24; // "at the bottom" tolerance (sub-pixel, rounding)
const APPROX_LINE_PX = 18; // initial size guess for skipped chunks; refined by the browser

// CSI sequences (colors, cursor moves), OSC sequences (titles, hyperlinks),
// and the remaining two-byte escapes.
// eslint-disable-next-line no-control-regex
const ANSI_RE = /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]/g;
// Other C0 controls except tab and newline would render as junk boxes.
// eslint-disable-next-line no-control-regex
const CONTROL_RE = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/g;

/** Make one raw output line displayable: no ANSI codes, no progress-bar rewrites. */
export function cleanLogText(raw) {
  let text = String(raw ?? "").replace(ANSI_RE, "");
  // Progress bars redraw with "\r"; only the final state is worth showing.
  if (text.includes("\r")) {
    const parts = text.split("\r").filter((part) => part !== "" && part !== "\n");
    text = parts.length ? parts[parts.length - 1] : "";
  }
  return text.replace(CONTROL_RE, "").replace(/\n$/, "");
}

export class LogView {
  /**
   * @param {HTMLElement} scroller  the scrollable panel
   * @param {object} [opts]
   * @param {(following: boolean, unseen: number) => void} [opts.onFollowChange]
   */
  constructor(scroller, { onFollowChange = () => {} } = {}) {
    this.scroller = scroller;
    this.onFollowChange = onFollowChange;
    this.body = document.createElement("div");
    this.body.className = "log-body";
    this.scroller.replaceChildren(this.body);
    this.queue = [];
    this.queueIndex = 0;
    this.frame = 0;
    this.chunk = null;
    this.chunkLines = 0;
    this.lineCount = 0;
    this.following = true;
    this.unseen = 0; // lines added while the user was scrolled up

    this.scroller.addEventListener("scroll", () => this.updateFollowing(), { passive: true });
  }

  get count() {
    return this.lineCount + (this.queue.length - this.queueIndex);
  }

  /** Queue events ({seq, stream, text}) for display. */
  append(events) {
    for (const ev of events) this.queue.push(ev);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  /** Replace everything with the given events (e.g. another deployment selected). */
  reset(events = []) {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.queue = [];
    this.queueIndex = 0;
    this.chunk = null;
    this.chunkLines = 0;
    this.lineCount = 0;
    this.unseen = 0;
    this.body.replaceChildren();
    this.following = true;
    this.onFollowChange(true, 0);
    if (events.length) this.append(events);
  }

  scrollToBottom() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.updateFollowing();
  }

  // -- internals ------------------------------------------------------------

  isAtBottom() {
    const el = this.scroller;
    return el.scrollHeight - el.scrollTop - el.clientHeight <= STICK_THRESHOLD_PX;
  }

  updateFollowing() {
    const following = this.isAtBottom();
    const changed = following !== this.following || (following && this.unseen > 0);
    this.following = following;
    if (following) this.unseen = 0;
    if (changed) this.onFollowChange(following, this.unseen);
  }

  flush() {
    this.frame = 0;
    // Decide before adding lines: only users already at the bottom get
    // scrolled along; someone reading older output stays put.
    const stick = this.isAtBottom();
    const start = performance.now();
    let added = 0;
    const fragment = document.createDocumentFragment();
    let target = this.ensureChunk(fragment);

    while (this.queueIndex < this.queue.length) {
      if (added >= MIN_LINES_PER_FRAME && performance.now() - start > FRAME_BUDGET_MS) break;
      if (this.chunkLines >= CHUNK_LINES) {
        this.sealChunk();
        target = this.ensureChunk(fragment);
      }
      target.appendChild(renderLine(this.queue[this.queueIndex++]));
      this.chunkLines += 1;
      added += 1;
    }

    this.body.appendChild(fragment);
    this.lineCount += added;
    if (this.queueIndex >= this.queue.length) {
      this.queue = []; // release the backlog instead of letting it grow forever
      this.queueIndex = 0;
    } else {
      this.frame = requestAnimationFrame(() => this.flush());
    }

    if (stick) {
      this.scroller.scrollTop = this.scroller.scrollHeight;
      this.following = true;
      this.unseen = 0;
    } else {
      this.following = false;
      this.unseen += added;
    }
    this.onFollowChange(this.following, this.unseen);
  }

  /** Current chunk to write into; a new one is placed in the fragment. */
  ensureChunk(fragment) {
    // A partly filled chunk (already in the DOM) keeps receiving lines.
    if (this.chunk && this.chunkLines < CHUNK_LINES) return this.chunk;
    this.chunk = document.createElement("div");
    this.chunk.className = "log-chunk";
    this.chunkLines = 0;
    fragment.appendChild(this.chunk);
    return this.chunk;
  }

  /** A full chunk never changes again, so the browser may skip it off-screen. */
  sealChunk() {
    const chunk = this.chunk;
    if (!chunk) return;
    chunk.style.containIntrinsicSize = `auto ${this.chunkLines * APPROX_LINE_PX}px`;
    chunk.classList.add("sealed");
    this.chunk = null;
  }
}

function renderLine(ev) {
  const line = document.createElement("div");
  const stream = ev.stream === "stderr" || ev.stream === "system" ? ev.stream : "stdout";
  line.className = `log-line ${stream}`;
  // The number is drawn by CSS (::before) so copying log text doesn't copy it.
  line.dataset.seq = String(ev.seq);
  line.textContent = ev.clean ?? cleanLogText(ev.text);
  return line;
}
