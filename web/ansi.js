// ANSI escape sequences -> styled segments -> DOM nodes, for build logs.
//
// Written here rather than taken from a library because the page loads
// nothing from outside the server and has no build step; what build tools
// print is small: SGR colours (16, 256 and 24-bit), bold, dim, italic,
// underline, inverse and resets, plus "\r" progress bars. Every other escape
// (cursor moves, erase line, OSC titles and hyperlinks) is dropped.
// Text only ever reaches the DOM as text nodes: log output is untrusted.

// One escape sequence: CSI (ESC [ params final), OSC (ESC ] ... BEL or ST),
// or a two-byte escape.
// eslint-disable-next-line no-control-regex
const ESCAPE_RE = /\x1b\[([0-?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?/g;
// C0 controls other than tab would show as boxes; "\r" is handled apart.
// eslint-disable-next-line no-control-regex
const CONTROL_RE = /[\x00-\x08\x0a-\x0c\x0e-\x1f\x7f]/g;
// eslint-disable-next-line no-control-regex
const PLAIN_RE = /^[^\x00-\x08\x0a-\x1f\x7f]*$/;

const DEFAULT = Object.freeze({
  fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, inverse: false,
});

/**
 * Parse one log line into [{text, style}], where style has fg/bg (0-15: a
 * palette index styled by CSS; "#rrggbb": an exact colour) and flags.
 * Consecutive text with the same style is one segment.
 */
export function parseAnsi(raw) {
  const text = String(raw ?? "");
  if (PLAIN_RE.test(text)) return text ? [{ text, style: DEFAULT }] : [];
  let segments = [];
  let style = DEFAULT;
  let overwrite = false; // a "\r" was seen: the next text starts the line again
  let last = 0;

  const emit = (chunk) => {
    // A progress bar redraws with "\r"; only what it finally shows is kept.
    const parts = chunk.replace(/\r\n/g, "\n").split("\r");
    parts.forEach((part, i) => {
      if (i > 0) overwrite = true;
      const clean = part.replace(CONTROL_RE, "");
      if (!clean) return;
      if (overwrite) {
        segments = [];
        overwrite = false;
      }
      const prev = segments[segments.length - 1];
      if (prev && prev.style === style) prev.text += clean;
      else segments.push({ text: clean, style });
    });
  };

  ESCAPE_RE.lastIndex = 0;
  for (let m = ESCAPE_RE.exec(text); m; m = ESCAPE_RE.exec(text)) {
    if (m.index > last) emit(text.slice(last, m.index));
    last = ESCAPE_RE.lastIndex;
    if (m[2] === "m") style = applySgr(style, m[1]);
  }
  if (last < text.length) emit(text.slice(last));
  return segments;
}

/** The text a line shows, without any styling (for search and download). */
export function plainText(raw) {
  const text = String(raw ?? "");
  if (PLAIN_RE.test(text)) return text; // most lines: no copy kept twice
  return parseAnsi(text)
    .map((segment) => segment.text)
    .join("");
}

function applySgr(style, params) {
  // Only digits and ";" (or ":" in 38:2::r:g:b) are SGR; anything else is
  // a private sequence we do not know.
  if (/[^0-9;:]/.test(params)) return style;
  const codes = params === "" ? [0] : params.split(/[;:]/).map((p) => (p === "" ? 0 : Number(p)));
  const next = { ...style };
  for (let i = 0; i < codes.length; i += 1) {
    const code = codes[i];
    if (code === 0) Object.assign(next, DEFAULT);
    else if (code === 1) next.bold = true;
    else if (code === 2) next.dim = true;
    else if (code === 3) next.italic = true;
    else if (code === 4) next.underline = true;
    else if (code === 7) next.inverse = true;
    else if (code === 22) next.bold = next.dim = false;
    else if (code === 23) next.italic = false;
    else if (code === 24) next.underline = false;
    else if (code === 27) next.inverse = false;
    else if (code >= 30 && code <= 37) next.fg = code - 30;
    else if (code >= 90 && code <= 97) next.fg = code - 90 + 8;
    else if (code === 39) next.fg = null;
    else if (code >= 40 && code <= 47) next.bg = code - 40;
    else if (code >= 100 && code <= 107) next.bg = code - 100 + 8;
    else if (code === 49) next.bg = null;
    else if (code === 38 || code === 48) {
      const [color, used] = extendedColor(codes, i + 1);
      i += used;
      if (color !== undefined) next[code === 38 ? "fg" : "bg"] = color;
    }
  }
  return sameStyle(next, style) ? style : Object.freeze(next);
}

/** 38;5;n or 38;2;r;g;b: [colour, how many codes it used]. */
function extendedColor(codes, at) {
  if (codes[at] === 5 && at + 1 < codes.length) {
    const n = codes[at + 1];
    return [n >= 0 && n <= 255 ? xterm256(n) : undefined, 2];
  }
  if (codes[at] === 2 && at + 3 < codes.length) {
    const rgb = codes.slice(at + 1, at + 4);
    return [rgb.every((c) => c >= 0 && c <= 255) ? hex(rgb) : undefined, 4];
  }
  return [undefined, codes.length - at]; // malformed: ignore the rest
}

function xterm256(n) {
  if (n < 16) return n; // the themed palette
  if (n >= 232) {
    const level = 8 + (n - 232) * 10;
    return hex([level, level, level]);
  }
  const steps = [0, 95, 135, 175, 215, 255];
  const i = n - 16;
  return hex([steps[Math.floor(i / 36)], steps[Math.floor(i / 6) % 6], steps[i % 6]]);
}

function hex(rgb) {
  return `#${rgb.map((c) => c.toString(16).padStart(2, "0")).join("")}`;
}

function sameStyle(a, b) {
  for (const key of Object.keys(DEFAULT)) if (a[key] !== b[key]) return false;
  return true;
}

/** CSS classes and inline colours for a style (inverse swaps fg and bg). */
function styleProps(style) {
  let { fg, bg } = style;
  if (style.inverse) [fg, bg] = [bg ?? "fg", fg ?? "bg"];
  const classes = [];
  const css = {};
  if (typeof fg === "number") classes.push(`ansi-fg-${fg}`);
  else if (fg === "bg") classes.push("ansi-fg-inverse");
  else if (fg) css.color = fg;
  if (typeof bg === "number") classes.push(`ansi-bg-${bg}`);
  else if (bg === "fg") classes.push("ansi-bg-inverse");
  else if (bg) css.backgroundColor = bg;
  if (style.bold) classes.push("ansi-bold");
  if (style.dim) classes.push("ansi-dim");
  if (style.italic) classes.push("ansi-italic");
  if (style.underline) classes.push("ansi-underline");
  return { classes, css };
}

/**
 * Append a line's segments to `parent`. `marks` are [start, end) ranges of
 * the plain text to wrap in <mark> (search hits); `currentMark` is the index
 * of the one to show as current.
 */
export function renderSegments(parent, segments, marks = [], currentMark = -1) {
  let offset = 0;
  let m = 0;
  for (const segment of segments) {
    const { text } = segment;
    const end = offset + text.length;
    let pos = 0; // within this segment
    while (pos < text.length) {
      while (m < marks.length && marks[m][1] <= offset + pos) m += 1;
      const mark = marks[m];
      let stop = text.length;
      let marked = false;
      if (mark && mark[0] <= offset + pos) {
        marked = true;
        stop = Math.min(text.length, mark[1] - offset);
      } else if (mark && mark[0] < end) {
        stop = mark[0] - offset;
      }
      let node = styledNode(segment.style, text.slice(pos, stop));
      if (marked) {
        const wrap = document.createElement("mark");
        if (m === currentMark) wrap.className = "current";
        wrap.append(node);
        node = wrap;
      }
      parent.append(node);
      pos = stop;
    }
    offset = end;
  }
}

function styledNode(style, text) {
  if (style === DEFAULT) return document.createTextNode(text);
  const { classes, css } = styleProps(style);
  if (!classes.length && !css.color && !css.backgroundColor) return document.createTextNode(text);
  const span = document.createElement("span");
  if (classes.length) span.className = classes.join(" ");
  if (css.color) span.style.color = css.color;
  if (css.backgroundColor) span.style.backgroundColor = css.backgroundColor;
  span.textContent = text;
  return span;
}

/** [start, end) of every case-insensitive occurrence of `needle` in `text`. */
export function findAll(text, needle) {
  const ranges = [];
  if (!needle) return ranges;
  const hay = text.toLowerCase();
  const lower = needle.toLowerCase();
  for (let i = hay.indexOf(lower); i >= 0; i = hay.indexOf(lower, i + lower.length)) {
    ranges.push([i, i + lower.length]);
  }
  return ranges;
}
