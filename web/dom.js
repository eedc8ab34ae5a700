// Tiny DOM helpers. Everything that may come from the server goes in as a
// text node or an attribute value, never through innerHTML.

/**
 * el("a", {className: "x", href: "#/p", text: "hi"}, child, "text", ...)
 * Strings among children become text nodes; null/false are skipped.
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === "className") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "href") {
      const href = safeHref(value);
      if (href) node.setAttribute("href", href);
    } else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** replaceChildren() that skips null/false (replaceChildren would print "null"). */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((child) => child != null && child !== false));
  return node;
}

/**
 * Only http(s) links and in-page hash routes are allowed: a URL coming from
 * the server (or a repo name) must never become a javascript: link.
 */
export function safeHref(url) {
  if (typeof url !== "string" || !url) return null;
  if (url.startsWith("#")) return url;
  try {
    const parsed = new URL(url, document.baseURI);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

/** Set (or clear) an element's link, hiding it when the URL is unusable. */
export function setLink(anchor, url, text = url) {
  const href = safeHref(url);
  anchor.hidden = !href;
  if (href) {
    anchor.setAttribute("href", href);
    anchor.textContent = text;
  } else {
    anchor.removeAttribute("href");
    anchor.textContent = "";
  }
  return Boolean(href);
}

/** External link opened in a new tab without giving it access to this page. */
export function externalLink(url, text, className = "") {
  const href = safeHref(url);
  if (!href) return null;
  return el("a", { href, className, target: "_blank", rel: "noopener noreferrer" }, text ?? displayUrl(href));
}

/** URL without the scheme and trailing slash, for compact display. */
export function displayUrl(url) {
  return String(url)
    .replace(/^[a-z]+:\/\//i, "")
    .replace(/\/$/, "");
}
