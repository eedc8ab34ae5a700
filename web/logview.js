// Log panel renderer built for very long build logs (100k+ lines).
//
// - Lines are queued and flushed once per animation frame under a time
//   budget, so a burst of lines never blocks input or painting.
// - New chunks are built detached (via a DocumentFragment) and attached in
//   one go per frame; only the visible tail chunk grows while in the DOM.
// - Lines are grouped into chunks; full chunks get content-visibility:auto
//   (see style.css) so the browser skips layout/paint of off-screen ones.
// - While the user follows a burst (e.g. a 100k-line replay), full chunks are
//   "parked" with content-visibility:hidden: only the tail is visible, and
//   Chrome was measured laying out hundreds of "auto" lines per frame near the
//   bottom (~1/3 of all lines). Once caught up, just enough chunks to fill
//   the viewport are unparked; the rest go back to "auto" after a quiet
//   moment (so find-in-page and screen readers see them) or as soon as the
//   user scrolls up.
// - Text is always set with textContent: log output is untrusted.

const CHUNK_LINES = 100;
const FRAME_BUDGET_MS = 10; // leave the rest of a 16ms frame to style, layout, paint
const MIN_LINES_PER_FRAME = 200; // guarantee progress on slow machines
const BOTTOM_TOLERANCE_PX = 24; // "at the bottom" despite sub-pixel rounding
const APPROX_LINE_PX = 18; // initial size guess for skipped chunks; refined by the browser
const UNPARK_AFTER_MS = 400; // quiet time before parked chunks become renderable

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
    this.parked = [];
    this.unparkTimer = 0;
    // Following = keep the newest line in view. It is the user's intent, not
    // geometry: off-screen chunks are laid out lazily and may grow when they
    // come into view, so "not at the bottom" alone doesn't mean "scrolled up".
    this.following = true;
    this.unseen = 0; // lines added while the user was scrolled up
    this.lastScrollTop = 0;

    this.scroller.addEventListener("scroll", () => this.handleScroll(), { passive: true });
  }

  /** Queue events ({seq, stream, text}) for display. */
  append(events) {
    for (const ev of events) this.queue.push(ev);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  /** Replace everything with the given events (e.g. another deployment selected). */
  reset(events = []) {
    cancelAnimationFrame(this.frame);
    clearTimeout(this.unparkTimer);
    this.frame = 0;
    this.queue = [];
    this.queueIndex = 0;
    this.chunk = null;
    this.chunkLines = 0;
    this.parked = [];
    this.unseen = 0;
    this.body.replaceChildren();
    this.lastScrollTop = 0;
    this.setFollowing(true);
    if (events.length) this.append(events);
  }

  scrollToBottom() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.setFollowing(true);
  }

  // -- internals ------------------------------------------------------------

  isAtBottom() {
    const el = this.scroller;
    return el.scrollHeight - el.scrollTop - el.clientHeight <= BOTTOM_TOLERANCE_PX;
  }

  handleScroll() {
    const top = this.scroller.scrollTop;
    if (this.isAtBottom()) this.setFollowing(true);
    else if (top < this.lastScrollTop - 1) {
      this.setFollowing(false); // moved up: reading
      this.unpark(); // what they scroll to must be renderable
    }
    this.lastScrollTop = top;
  }

  setFollowing(following) {
    const changed = following !== this.following || (following && this.unseen > 0);
    this.following = following;
    if (following) this.unseen = 0;
    if (changed) this.onFollowChange(following, this.unseen);
  }

  flush() {
    this.frame = 0;
    clearTimeout(this.unparkTimer);
    const viewportHeight = this.scroller.clientHeight; // read before mutating: no forced layout
    const start = performance.now();
    const fragment = document.createDocumentFragment();
    let added = 0;

    while (this.queueIndex < this.queue.length) {
      if (added >= MIN_LINES_PER_FRAME && performance.now() - start > FRAME_BUDGET_MS) break;
      if (!this.chunk) this.startChunk();
      this.chunk.appendChild(renderLine(this.queue[this.queueIndex++]));
      this.chunkLines += 1;
      added += 1;
      if (this.chunkLines >= CHUNK_LINES) this.sealChunk(fragment);
    }

    const drained = this.queueIndex >= this.queue.length;
    // A partly filled chunk is shown only once we have caught up. During a
    // burst it would otherwise be laid out in this frame and again in the
    // next; a full (sealed) chunk off-screen is never laid out at all.
    if (drained && this.chunk && !this.chunk.isConnected) fragment.appendChild(this.chunk);
    this.body.appendChild(fragment);

    if (drained) {
      this.queue = []; // release the backlog instead of letting it grow forever
      this.queueIndex = 0;
      // Revealed chunks get their real (maybe wrapped) height in the next
      // rendering; one more pass then scrolls a follower to the very end.
      if (this.revealTail(viewportHeight) && this.following) {
        this.frame = requestAnimationFrame(() => this.flush());
      }
      if (this.parked.length) this.unparkTimer = setTimeout(() => this.unpark(), UNPARK_AFTER_MS);
    } else {
      this.frame = requestAnimationFrame(() => this.flush());
    }

    // Only a user who is following gets scrolled along; someone reading older
    // output stays put and is offered a "new lines" button instead.
    if (this.following) {
      this.scroller.scrollTop = this.scroller.scrollHeight;
      this.lastScrollTop = this.scroller.scrollTop;
    } else {
      this.unseen += added;
      this.onFollowChange(false, this.unseen);
    }
  }

  startChunk() {
    this.chunk = document.createElement("div");
    this.chunk.className = "log-chunk";
    this.chunkLines = 0;
  }

  /** A full chunk never changes again, so the browser may skip it off-screen. */
  sealChunk(fragment) {
    const chunk = this.chunk;
    chunk.style.containIntrinsicSize = `auto ${this.chunkLines * APPROX_LINE_PX}px`;
    chunk.classList.add("sealed");
    if (!chunk.isConnected) {
      if (this.following) {
        chunk.classList.add("parked");
        this.parked.push(chunk);
      }
      fragment.appendChild(chunk);
    }
    this.chunk = null;
    this.chunkLines = 0;
  }

  /** Unpark the last chunks, enough to fill the viewport above the tail. */
  revealTail(viewportHeight) {
    const tailLines = this.chunk && this.chunk.isConnected ? this.chunkLines : 0;
    let uncovered = viewportHeight - tailLines * APPROX_LINE_PX;
    let revealed = false;
    while (uncovered > 0 && this.parked.length) {
      this.parked.pop().classList.remove("parked"); // last parked = nearest the bottom
      uncovered -= CHUNK_LINES * APPROX_LINE_PX;
      revealed = true;
    }
    return revealed;
  }

  /** Let every parked chunk render again (as content-visibility:auto). */
  unpark() {
    clearTimeout(this.unparkTimer);
    for (const chunk of this.parked) chunk.classList.remove("parked");
    this.parked = [];
  }
}

function renderLine(ev) {
  const line = document.createElement("div");
  const stream = ev.stream === "stderr" || ev.stream === "system" ? ev.stream : "stdout";
  line.className = `log-line ${stream}`;
  // The number is drawn by CSS (::before) so copying log text doesn't copy it.
  // setAttribute rather than dataset: no DOMStringMap wrapper per line for
  // the garbage collector to trace.
  line.setAttribute("data-seq", String(ev.seq));
  line.textContent = ev.clean ?? cleanLogText(ev.text);
  return line;
}
