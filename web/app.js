// DeployHub dashboard: deploy form, projects, deployments, live logs.
//
// Views are driven by the URL hash so a reload keeps the view:
//   #/                     nothing selected
//   #/projects/<name>      a project, newest deployment shown (and followed)
//   #/projects/<name>/settings   its settings screen
//   #/deployments/<id>     a project with that deployment shown
//   #/deployments/<id>?line=<n>   ... with log line n (its seq) highlighted

import {
  apiFetch,
  apiJson,
  checkServer,
  getToken,
  setToken,
  ApiError,
  AUTH_REQUIRED_EVENT,
  SERVER_STATE_EVENT,
} from "./api.js";
import { SettingsScreen } from "./settings.js";
import { LiveClient } from "./live.js";
import { LogLines, LogView } from "./logview.js";
import { el, externalLink, displayUrl, fill, safeHref } from "./dom.js";
import {
  clock,
  computeSteps,
  formatAbsolute,
  formatDuration,
  formatRelative,
  isFinal,
  PHASES,
  phaseDurations,
  statusKey,
  statusLabel,
} from "./timeline.js";

const $ = (id) => document.getElementById(id);

const state = {
  projects: [], // from GET api/projects
  project: null, // name of the project in view
  // Maps are keyed by String(id) so ids from JSON, hashes and data-* agree.
  deployments: new Map(), // id -> deployment, for the project in view
  selectedId: null,
  logShownFor: null, // deployment whose lines the log panel holds
  followNewest: true, // #/projects/<name>: keep showing the newest deployment
  logs: new Map(), // deployment id -> LogLines
  productionDeps: new Map(), // deployment id -> deployment, for the projects list
  variables: {}, // NAME -> {value, secret} of the project in view
  announced: new Map(), // deployment id -> last status announced to screen readers
  routeSeq: 0, // increases per navigation; stale async results are dropped
  seed: null, // deployment just created, so its view needn't wait for the network
  screen: "deployments", // of the project in view: "deployments" or "settings"
  serverAway: false, // the API is unreachable or its Redis is away (api.js probes)
};

const PHASE_STRIP_BUILDS = 20;
const TRIGGER_LABELS = { page: "Page", cli: "CLI", webhook: "Webhook" };
const HEARTBEAT_MS = 20_000; // a look at api/server, so an outage shows without a click
const settingsScreen = new SettingsScreen();

const live = new LiveClient({ onMessage: handleLiveMessage, onState: renderConnection });
const logView = new LogView($("log-scroller"), {
  onFollowChange: renderLogFollow,
  onSearchChange: renderSearchCount,
  lineHref: (seq) => (state.selectedId ? lineHash(state.selectedId, seq) : null),
});

// ---------------------------------------------------------------- routing --

function parseRoute(hash) {
  const match = /^#\/(projects|deployments)\/([^?/]+)(\/settings)?(?:\?line=(\d{1,9}))?$/.exec(hash);
  if (!match) return { view: "home" };
  let value;
  try {
    value = decodeURIComponent(match[2]);
  } catch {
    return { view: "home" };
  }
  if (match[1] === "projects") return { view: "project", name: value, settings: Boolean(match[3]) };
  return { view: "deployment", id: value, line: match[4] ? Number(match[4]) : null };
}

function projectHash(name) {
  return `#/projects/${encodeURIComponent(name)}`;
}

function settingsHash(name) {
  return `${projectHash(name)}/settings`;
}

function deploymentHash(id) {
  return `#/deployments/${encodeURIComponent(id)}`;
}

function lineHash(id, seq) {
  return `${deploymentHash(id)}?line=${seq}`;
}

async function route() {
  const seq = ++state.routeSeq;
  const target = parseRoute(location.hash);
  hideBanner();
  try {
    if (target.view === "home") {
      leaveProject();
      renderView();
    } else if (target.view === "project") {
      state.screen = target.settings ? "settings" : "deployments";
      if (target.settings) settingsScreen.open(target.name).catch((err) => showBanner(err.message));
      await openProject(target.name, null, seq);
    } else {
      const dep = await findDeployment(target.id);
      if (seq !== state.routeSeq) return; // the user navigated meanwhile
      state.screen = "deployments";
      await openProject(dep.project, dep, seq, target.line);
    }
  } catch (err) {
    if (seq !== state.routeSeq) return;
    showBanner(err.message);
  }
}

async function findDeployment(id) {
  if (state.seed && String(state.seed.id) === id) return state.seed;
  return state.deployments.get(id) ?? (await apiJson(`deployments/${encodeURIComponent(id)}`));
}

// --------------------------------------------------------------- projects --

// Startup, deep links and actions all want the list; share one request.
let projectsRequest = null;
function loadProjects() {
  projectsRequest ??= fetchProjects().finally(() => (projectsRequest = null));
  return projectsRequest;
}

async function fetchProjects() {
  try {
    const body = await apiJson("projects");
    state.projects = Array.isArray(body?.projects) ? body.projects : [];
    for (const project of state.projects) {
      const dep = project.production_deployment;
      if (dep && dep.id != null) state.productionDeps.set(String(dep.id), dep);
    }
    $("projects-status").hidden = true;
    renderProjects();
    renderProjectHeader();
    loadProductionDeployments();
  } catch (err) {
    $("projects-status").textContent = err.message;
    $("projects-status").hidden = false;
  }
}

/**
 * The list shows each production deployment's status, commit and age; the
 * list answer carries them (production_deployment), and a server without it
 * names only the id, so each one not yet known is fetched (once: a ready
 * deployment does not change).
 */
async function loadProductionDeployments() {
  const missing = state.projects
    .map(productionId)
    .filter((id) => id != null && !state.productionDeps.has(String(id)));
  if (!missing.length) return;
  const found = await Promise.all(
    missing.map((id) => apiJson(`deployments/${encodeURIComponent(id)}`).catch(() => null)),
  );
  for (const dep of found) if (dep && dep.id != null) state.productionDeps.set(String(dep.id), dep);
  renderProjects();
}

// Several deployments finishing together should cause one reload, not many.
let projectsReloadTimer = 0;
function reloadProjectsSoon() {
  clearTimeout(projectsReloadTimer);
  projectsReloadTimer = setTimeout(loadProjects, 300);
}

function currentProjectInfo() {
  return state.projects.find((p) => p.name === state.project) ?? null;
}

/** Project.production may be an id or a deployment object; normalise to an id. */
function productionId(project) {
  const prod = project?.production;
  if (prod && typeof prod === "object") return prod.id ?? null;
  return prod ?? null;
}

/** Show project `name`, subscribing to its live feed; select `dep` if given. */
async function openProject(name, dep, seq, line = null) {
  if (state.project !== name) {
    leaveProject();
    state.project = name;
    live.subscribe(name);
    if (!currentProjectInfo()) loadProjects(); // deep link before the list arrived
    loadVariables(name);
  }
  if (dep) {
    upsertDeployment(dep);
    state.followNewest = false;
    state.selectedId = String(dep.id);
  } else {
    state.followNewest = true;
    state.selectedId = newestId();
  }
  state.seed = null;
  renderView();
  if (line != null) {
    logView.revealSeq(line); // now or once that line arrives
    $("log-card").scrollIntoView({ block: "start" }); // on a phone it is below the fold
  }

  // The socket's snapshot brings the same list; fetching it as well makes the
  // page usable even while the socket is (re)connecting.
  const body = await apiJson(`projects/${encodeURIComponent(name)}/deployments`);
  if (seq !== state.routeSeq || state.project !== name) return;
  mergeDeployments(body?.deployments);
}

function leaveProject() {
  if (state.project) live.unsubscribe(state.project);
  state.project = null;
  state.deployments.clear();
  state.logs.clear();
  state.announced.clear();
  state.selectedId = null;
  state.followNewest = true;
  state.logShownFor = null;
  logView.show(new LogLines());
}

// -------------------------------------------------------- build variables --

async function loadVariables(name) {
  state.variables = {};
  renderVariables();
  showVarError(null);
  try {
    const body = await apiJson(`projects/${encodeURIComponent(name)}/variables`);
    if (state.project !== name) return;
    state.variables = body?.variables ?? {};
    renderVariables();
  } catch (err) {
    if (state.project === name) showVarError(err.message);
  }
}

/** PATCH one variable (null removes it); the answer is the whole set after the change. */
async function changeVariable(name, change) {
  const project = state.project;
  const body = await apiJson(`projects/${encodeURIComponent(project)}/variables`, {
    method: "PATCH",
    json: { variables: { [name]: change } },
  });
  if (state.project !== project) return;
  state.variables = body?.variables ?? {};
  renderVariables();
}

async function submitVariable(event) {
  event.preventDefault();
  const form = event.currentTarget; // null once the handler has awaited
  const name = $("var-name").value.trim();
  if (!name) {
    showVarError("Enter a variable name, such as API_URL.");
    $("var-name").focus();
    return;
  }
  const submit = form.querySelector("button[type=submit]");
  submit.disabled = true;
  showVarError(null);
  const value = $("var-value").value;
  try {
    await changeVariable(name, { value, secret: $("var-secret").checked });
    // Clear the form for the next one, unless the user already started typing it.
    if ($("var-name").value.trim() === name && $("var-value").value === value) form.reset();
    $("var-name").focus();
  } catch (err) {
    showVarError(err.message);
    $("var-name").focus();
  } finally {
    submit.disabled = false;
  }
}

async function removeVariable(button) {
  button.disabled = true;
  showVarError(null);
  try {
    await changeVariable(button.dataset.variable, null);
    $("var-name").focus(); // the button is gone; keep focus in the card
  } catch (err) {
    showVarError(err.message);
    button.disabled = false;
  }
}

function renderVariables() {
  const names = Object.keys(state.variables).sort();
  $("vars-empty").hidden = names.length > 0;
  fill(
    $("var-list"),
    ...names.map((name) => {
      const { value, secret } = state.variables[name] ?? {};
      return el(
        "li",
        { className: "var-row" },
        el("code", { className: "var-name", text: name }),
        secret
          ? el("span", { className: "var-value", text: "secret (hidden)" })
          : el("code", { className: "var-value", text: value ?? "" }),
        el("button", {
          type: "button",
          className: "button button-small button-danger",
          dataset: { variable: name },
          "aria-label": `Remove ${name}`,
          text: "Remove",
        }),
      );
    }),
  );
}

function showVarError(message) {
  $("var-error").hidden = !message;
  $("var-error").textContent = message ?? "";
  $("var-name").setAttribute("aria-invalid", message ? "true" : "false");
}

// ------------------------------------------------------------ deployments --

/** Insert or update a deployment unless we already hold a newer version. */
function upsertDeployment(dep) {
  if (!dep || (typeof dep.id !== "string" && typeof dep.id !== "number")) return false;
  const key = String(dep.id);
  const existing = state.deployments.get(key);
  if (existing && (existing.updated_at ?? 0) > (dep.updated_at ?? 0)) return false;
  state.deployments.set(key, dep);
  clock.observe(dep.updated_at);
  // Only one deployment serves production. The server announces the new one
  // but need not re-send the previous one, whose copy would still say true.
  if (dep.is_production === true) setProductionFlag(key);
  return true;
}

function setProductionFlag(prodKey) {
  for (const [key, dep] of state.deployments) {
    const flag = key === prodKey;
    if (dep.is_production !== flag) state.deployments.set(key, { ...dep, is_production: flag });
  }
}

function mergeDeployments(list) {
  if (!Array.isArray(list)) return;
  for (const dep of list) if (dep && dep.project === state.project) upsertDeployment(dep);
  if (state.followNewest || !state.deployments.has(state.selectedId)) {
    state.selectedId = newestId() ?? state.selectedId;
  }
  renderView();
}

function sortedDeployments() {
  return [...state.deployments.values()].sort((a, b) => (b.created_at ?? 0) - (a.created_at ?? 0));
}

function newestId() {
  const newest = sortedDeployments()[0];
  return newest ? String(newest.id) : null;
}

function isProduction(dep) {
  if (typeof dep.is_production === "boolean") return dep.is_production;
  const prodId = productionId(currentProjectInfo());
  return prodId != null && String(prodId) === String(dep.id);
}

// ------------------------------------------------------------ live socket --

function handleLiveMessage(msg) {
  switch (msg.type) {
    case "subscribed":
      if (msg.project === state.project) mergeDeployments(msg.deployments);
      break;
    case "status":
      handleStatus(msg.deployment);
      break;
    case "logs":
      handleLogs(msg);
      break;
    case "production":
      if (msg.project === state.project && msg.production != null) {
        setProductionFlag(String(msg.production));
        renderView();
      }
      reloadProjectsSoon();
      break;
    case "error":
      showBanner(typeof msg.message === "string" ? msg.message : "Live updates error");
      break;
    case "auth-required":
      showAuth();
      break;
    default:
      break; // unknown message types are ignored so the server can add some
  }
}

function handleStatus(dep) {
  if (!dep || dep.project !== state.project) return;
  const isNew = !state.deployments.has(String(dep.id));
  if (!upsertDeployment(dep)) return;
  if (isNew && state.followNewest) state.selectedId = newestId();
  // A finished deployment may have become production: refresh project links.
  if (isFinal(dep.status)) reloadProjectsSoon();
  renderView();
}

function handleLogs(msg) {
  if (msg.project !== state.project) return;
  const id = String(msg.deployment);
  const stored = logLinesOf(id);
  stored.push(msg.events);
  const last = msg.events[msg.events.length - 1];
  if (last) clock.observe(last.ts);
  if (id === state.selectedId && state.logShownFor === id) {
    logView.appended(msg.events.length);
    renderLogCount();
  }
}

function logLinesOf(id) {
  let lines = state.logs.get(id);
  if (!lines) state.logs.set(id, (lines = new LogLines()));
  return lines;
}

// ---------------------------------------------------------------- actions --

async function submitDeploy(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const repoInput = $("repo-url");
  const body = { repo_url: repoInput.value.trim(), trigger: "page" };
  const project = $("project-name-input").value.trim();
  const branch = $("branch-input").value.trim();
  if (project) body.project = project;
  if (branch) body.branch = branch;

  if (!body.repo_url) {
    showFormError("Enter the URL of a Git repository to deploy.");
    repoInput.focus();
    return;
  }

  setDeployBusy(true);
  showFormError(null);
  try {
    const dep = await apiJson("deployments", { method: "POST", json: body });
    form.reset();
    if (dep && dep.id != null) {
      state.seed = dep;
      location.hash = deploymentHash(dep.id);
    }
    loadProjects();
  } catch (err) {
    showFormError(err.message);
    repoInput.focus();
  } finally {
    setDeployBusy(false);
  }
}

async function runAction(button) {
  const { action, id } = button.dataset;
  const dep = state.deployments.get(id);
  if (!dep) return;
  button.disabled = true;
  hideBanner();
  try {
    if (action === "cancel") {
      const updated = await apiJson(`deployments/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      if (updated && String(updated.id) === id) upsertDeployment(updated);
    } else if (action === "redeploy") {
      // A new deployment of the branch with the project's settings as they are now.
      const body = { repo_url: dep.repo_url, project: dep.project, trigger: "page" };
      if (dep.branch) body.branch = dep.branch;
      const created = await apiJson("deployments", { method: "POST", json: body });
      if (created && created.id != null) {
        state.seed = created;
        location.hash = deploymentHash(created.id);
      }
    } else if (action === "promote") {
      const project = await apiJson(`projects/${encodeURIComponent(dep.project)}/rollback`, {
        method: "POST",
        json: { deployment: id },
      });
      applyProduction(project, id);
    }
    renderView();
  } catch (err) {
    showBanner(err.message);
  } finally {
    button.disabled = false;
  }
}

/**
 * The full log, from storage if Redis has forgotten it, as a text file:
 * GET .../logs answers NDJSON events; each line's text loses its escapes.
 */
async function downloadLog(dep) {
  let response;
  try {
    response = await apiFetch(`deployments/${encodeURIComponent(dep.id)}/logs`);
  } catch {
    throw new ApiError(0, "Cannot reach the DeployHub server to download the log.");
  }
  if (!response.ok) throw new ApiError(response.status, `Could not download the log (HTTP ${response.status})`);
  const lines = new LogLines();
  const events = [];
  for (const row of (await response.text()).split("\n")) {
    if (!row) continue;
    try {
      const ev = JSON.parse(row);
      if (ev && typeof ev.seq === "number") events.push(ev);
    } catch {
      /* a cut-off last row: keep what came before it */
    }
  }
  lines.push(events);
  const url = URL.createObjectURL(new Blob([lines.toText()], { type: "text/plain;charset=utf-8" }));
  const link = document.createElement("a");
  link.href = url; // a blob: URL we made, not one from the server
  link.download = `${dep.project}-${dep.id}.log`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** After a rollback the server may not re-send every deployment, so move the
 *  production flag locally to match the returned project. */
function applyProduction(project, fallbackId) {
  const prodId = String(productionId(project) ?? fallbackId);
  if (project && project.name) {
    const index = state.projects.findIndex((p) => p.name === project.name);
    if (index >= 0) state.projects[index] = project;
    else state.projects.unshift(project);
  }
  setProductionFlag(prodId);
  renderProjects();
  reloadProjectsSoon();
}

// ------------------------------------------------------------------- auth --

function showAuth() {
  const panel = $("auth-panel");
  if (!panel.hidden) return;
  panel.hidden = false;
  $("auth-token").focus();
}

function submitAuth(event) {
  event.preventDefault();
  const token = $("auth-token").value.trim();
  if (!token) return;
  setToken(token);
  $("auth-token").value = "";
  $("auth-panel").hidden = true;
  hideBanner();
  renderSignOut();
  live.reconnectNow(); // the socket authenticates only when it opens
  loadProjects();
  loadServerInfo();
  route();
}

function signOut() {
  setToken(null);
  renderSignOut();
  live.reconnectNow();
  loadProjects();
}

// -------------------------------------------------------------- rendering --

function renderView() {
  const hasProject = Boolean(state.project);
  $("empty-view").hidden = hasProject;
  $("project-view").hidden = !hasProject;
  renderProjects();
  if (!hasProject) {
    document.title = "DeployHub";
    return;
  }
  renderProjectHeader();
  renderTabs();
  renderDeploymentList();
  renderPhaseStrip();
  renderSelected();
}

function renderTabs() {
  const settings = state.screen === "settings";
  $("project-main").hidden = settings;
  $("project-settings").hidden = !settings;
  const tabs = [
    [$("tab-deployments"), projectHash(state.project), !settings],
    [$("tab-settings"), settingsHash(state.project), settings],
  ];
  for (const [tab, href, current] of tabs) {
    tab.setAttribute("href", href);
    if (current) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
}

/** The last builds, oldest first, as stacked bars of their phases: where the time went. */
function renderPhaseStrip() {
  const builds = sortedDeployments()
    .map((dep) => ({ dep, phases: phaseDurations(dep) }))
    .filter((build) => build.phases && build.phases.total > 0)
    .slice(0, PHASE_STRIP_BUILDS)
    .reverse();
  $("phases-card").hidden = builds.length === 0;
  if (!builds.length) return;
  const tallest = Math.max(...builds.map((build) => build.phases.total));
  $("phases-count").textContent = String(builds.length);
  $("phases-max").textContent = formatDuration(tallest);
  fill(
    $("phase-strip"),
    ...builds.map(({ dep, phases }) => {
      const words = PHASES.filter((name) => phases.phases[name] != null)
        .map((name) => `${phaseLabel(name)} ${formatDuration(phases.phases[name])}`)
        .join(", ");
      const bar = el(
        "a",
        {
          className: `phase-bar${String(dep.id) === state.selectedId ? " selected" : ""}`,
          href: deploymentHash(dep.id),
          title: `${shortId(dep.id)} (${statusLabel(dep.status)}): ${words}`,
          "aria-label": `Deployment ${shortId(dep.id)}, ${statusLabel(dep.status).toLowerCase()}, ` +
            `${formatDuration(phases.total)}: ${words}`,
        },
        ...PHASES.filter((name) => phases.phases[name]).map((name) => {
          const segment = el("span", { className: `phase phase-${name}`, dataset: { phase: name } });
          segment.style.height = `${(100 * phases.phases[name]) / tallest}%`;
          return segment;
        }),
      );
      return el("li", { className: `phase-col phase-col-${statusKey(dep.status)}` }, bar);
    }),
  );
}

function phaseLabel(name) {
  return { cloning: "clone", installing: "install", building: "build", uploading: "upload" }[name] ?? name;
}

function renderProjects() {
  const list = $("project-list");
  fill(
    list,
    ...state.projects.map((project) => {
      const current = project.name === state.project;
      return el(
        "li",
        { className: `project-entry${current ? " current" : ""}` },
        el(
          "a",
          {
            className: "project-item",
            href: projectHash(project.name),
            "aria-current": current ? "page" : null,
          },
          el("span", { className: "project-item-name", text: project.name }),
          el("span", { className: "project-item-repo", text: displayUrl(project.repo_url ?? "") }),
        ),
        projectProduction(project),
      );
    }),
  );
  $("projects-status").hidden = state.projects.length > 0;
  if (!state.projects.length) $("projects-status").textContent = "No projects yet. Deploy one above.";
}

/** Production status, age and site link of a project in the list. */
function projectProduction(project) {
  const prodId = productionId(project);
  if (prodId == null) {
    return el("p", { className: "project-prod muted", text: "No production deployment yet" });
  }
  const dep = state.productionDeps.get(String(prodId));
  const since = dep ? (dep.timestamps?.ready ?? dep.created_at) : null;
  return el(
    "p",
    { className: "project-prod" },
    dep ? statusBadge(dep.status) : null,
    since != null
      ? el("time", {
          className: "project-age",
          datetime: isoTime(since),
          title: formatAbsolute(since),
          text: formatRelative(since),
        })
      : null,
    dep?.commit ? el("code", { className: "project-sha", title: dep.commit_message ?? dep.commit,
                               text: String(dep.commit).slice(0, 7) }) : null,
    externalLink(project.url, null, "project-url"),
  );
}

function renderProjectHeader() {
  if (!state.project) return;
  const info = currentProjectInfo();
  $("project-title").textContent = state.project;

  const repo = $("project-repo");
  const repoUrl = info?.repo_url ?? sortedDeployments()[0]?.repo_url ?? "";
  repo.textContent = displayUrl(repoUrl);
  const repoHref = safeHref(repoUrl);
  if (repoHref) repo.setAttribute("href", repoHref);
  else repo.removeAttribute("href");

  // "Visit" only makes sense once something serves production.
  const production = sortedDeployments().find(isProduction);
  const hasProduction = productionId(info) != null || Boolean(production);
  const href = hasProduction ? safeHref(info?.url ?? production?.url) : null;
  const visit = $("project-visit");
  visit.hidden = !href;
  if (href) visit.setAttribute("href", href);
}

function renderDeploymentList() {
  const deps = sortedDeployments();
  $("deployments-empty").hidden = deps.length > 0;
  fill($("deployment-list"), ...deps.map(renderDeploymentRow));
}

function renderDeploymentRow(dep) {
  const selected = String(dep.id) === state.selectedId;
  return el(
    "li",
    { className: `dep-row${selected ? " selected" : ""}`, dataset: { id: String(dep.id) } },
    statusBadge(dep.status),
    el(
      "div",
      { className: "dep-main" },
      el(
        "a",
        { className: "dep-link", href: deploymentHash(dep.id), "aria-current": selected ? "true" : null },
        el("code", { text: shortId(dep.id) }),
      ),
      dep.branch ? el("span", { className: "dep-branch", text: dep.branch }) : null,
      isProduction(dep) ? el("span", { className: "tag tag-prod", text: "Production" }) : null,
      commitLine(dep),
    ),
    el(
      "div",
      { className: "dep-facts" },
      el("span", { className: "dep-duration", title: "Build time", text: buildTime(dep) }),
      el("span", { className: "dep-trigger", text: `via ${triggerLabel(dep.trigger)}` }),
      el("time", {
        className: "dep-time",
        datetime: isoTime(dep.created_at),
        title: formatAbsolute(dep.created_at),
        text: formatRelative(dep.created_at),
      }),
    ),
    el("div", { className: "dep-actions" }, ...deploymentActions(dep, true)),
  );
}

/** Short SHA and the first line of its message, once the build has cloned it. */
function commitLine(dep) {
  if (!dep.commit) return null;
  return el(
    "span",
    { className: "dep-commit", title: dep.commit_message ? `${dep.commit}\n${dep.commit_message}` : dep.commit },
    el("code", { className: "dep-sha", text: String(dep.commit).slice(0, 7) }),
    dep.commit_message ? el("span", { className: "dep-message", text: String(dep.commit_message) }) : null,
  );
}

function buildTime(dep) {
  const { total } = computeSteps(dep);
  return total == null ? "" : `${formatDuration(total)}${isFinal(dep.status) ? "" : "…"}`;
}

function triggerLabel(trigger) {
  return TRIGGER_LABELS[trigger] ?? "API";
}

/**
 * Buttons/links that apply to a deployment: visit (list rows only; the
 * detail view has its own result box with links), promote/rollback, cancel.
 */
function deploymentActions(dep, withVisit) {
  const actions = [];
  if (!withVisit) {
    actions.push(
      el("button", {
        type: "button",
        className: "button button-small",
        dataset: { action: "redeploy", id: String(dep.id) },
        title: "Deploy the same repository and branch again",
        text: "Redeploy",
      }),
    );
  }
  if (dep.status === "ready") {
    const link = withVisit ? externalLink(dep.deployment_url, "Visit", "button button-small") : null;
    if (link) {
      link.setAttribute("aria-label", `Open deployment ${shortId(dep.id)} in a new tab`);
      actions.push(link);
    }
    if (!isProduction(dep)) {
      const label = promoteLabel(dep);
      actions.push(
        el("button", {
          type: "button",
          className: "button button-small",
          dataset: { action: "promote", id: String(dep.id) },
          "aria-label": `${label} deployment ${shortId(dep.id)}`,
          text: label,
        }),
      );
    }
  } else if (!isFinal(dep.status)) {
    actions.push(
      el("button", {
        type: "button",
        className: "button button-small button-danger",
        dataset: { action: "cancel", id: String(dep.id) },
        "aria-label": `Cancel deployment ${shortId(dep.id)}`,
        text: "Cancel",
      }),
    );
  }
  return actions;
}

/** Newer than production: promote. Older: rollback. Same action server-side. */
function promoteLabel(dep) {
  const prod = sortedDeployments().find(isProduction);
  if (!prod) return "Promote";
  return (dep.created_at ?? 0) > (prod.created_at ?? 0) ? "Promote" : "Rollback";
}

function renderSelected() {
  const dep = state.deployments.get(state.selectedId);
  $("detail").hidden = !dep;
  if (!dep) {
    state.logShownFor = null;
    logView.reset();
    $("log-card").hidden = true;
    document.title = `${state.project} · DeployHub`;
    return;
  }
  $("log-card").hidden = false;
  $("detail-id").textContent = shortId(dep.id);
  $("detail-id").title = String(dep.id);
  fill($("detail-status"), statusBadge(dep.status));
  renderDetailMeta(dep);
  fill($("detail-actions"), ...deploymentActions(dep, false));
  renderTimeline(dep);
  renderResult(dep);
  renderLogsFor(dep);
  announceStatus(dep);
  document.title = `${statusLabel(dep.status)} · ${state.project} · DeployHub`;
}

function renderDetailMeta(dep) {
  fill(
    $("detail-meta"),
    dep.branch ? el("span", { className: "dep-branch", text: dep.branch }) : null,
    el("time", {
      datetime: isoTime(dep.created_at),
      title: formatAbsolute(dep.created_at),
      text: `Created ${formatRelative(dep.created_at)}`,
    }),
    isProduction(dep) ? el("span", { className: "tag tag-prod", text: "Production" }) : null,
  );
}

function renderTimeline(dep) {
  const { steps, total } = computeSteps(dep);
  fill(
    $("timeline"),
    ...steps.map((step) =>
      el(
        "li",
        {
          className: `step step-${step.state}`,
          "aria-current": step.state === "current" ? "step" : null,
        },
        el("span", { className: "step-icon", "aria-hidden": "true" }),
        el("span", { className: "step-label", text: step.label }),
        el("span", { className: "step-time", text: formatDuration(step.duration) }),
        // Screen readers get the state in words; sighted users see the icon.
        el("span", { className: "visually-hidden", text: ` (${stepStateWords(step.state)})` }),
      ),
    ),
  );
  $("timeline-total").textContent = formatDuration(total);
  $("timeline-total").parentElement.hidden = total == null;
}

function stepStateWords(stepState) {
  return {
    done: "done",
    current: "in progress",
    failed: "failed",
    canceled: "canceled",
    pending: "not started",
    skipped: "skipped",
  }[stepState];
}

function renderResult(dep) {
  const box = $("result");
  box.className = "result";
  if (dep.status === "ready") {
    box.classList.add("result-ready");
    const production = isProduction(dep);
    fill(
      box,
      el("p", { className: "result-title", text: production ? "Your site is live" : "Deployment ready" }),
      resultLink(production ? "Site" : "Production site", dep.url),
      resultLink("This deployment", dep.deployment_url),
      production
        ? null
        : el("p", { className: "result-note", text: "This deployment is not serving production." }),
    );
    box.hidden = false;
  } else if (dep.status === "failed" || dep.status === "canceled") {
    box.classList.add("result-failed");
    fill(
      box,
      el("p", {
        className: "result-title",
        text: dep.status === "failed" ? "Deployment failed" : "Deployment canceled",
      }),
      dep.reason ? el("pre", { className: "result-reason", text: String(dep.reason) }) : null,
    );
    box.hidden = false;
  } else {
    box.hidden = true;
    box.replaceChildren();
  }
}

function resultLink(label, url) {
  const link = externalLink(url, null, "result-link");
  if (!link) return null;
  return el("p", { className: "result-row" }, el("span", { className: "result-label", text: label }), link);
}

/** Re-render the log panel only when the selected deployment changed. */
function renderLogsFor(dep) {
  const id = String(dep.id);
  const lines = logLinesOf(id);
  if (state.logShownFor !== id) {
    state.logShownFor = id;
    logView.show(lines);
    runSearch(); // the query box applies to whatever log is shown
  }
  // The server replays the newest deployment's log by itself and streams a
  // running one's; an older finished one must be asked for (requestHistory
  // asks once). Checked on every render because "newest" is only known once
  // the list has arrived.
  if (!lines.length && isFinal(dep.status) && id !== newestId()) {
    live.requestHistory(state.project, dep.id);
  }
  renderLogCount();
}

function renderLogCount() {
  const dep = state.deployments.get(state.selectedId);
  const count = state.logs.get(state.selectedId)?.length ?? 0;
  $("log-download").disabled = !dep;
  $("log-count").textContent = count ? `${count.toLocaleString()} line${count === 1 ? "" : "s"}` : "";
  const empty = $("log-empty");
  empty.hidden = count > 0;
  if (!count && dep) {
    empty.textContent =
      dep.status === "queued"
        ? "Waiting in the queue…"
        : isFinal(dep.status)
          ? "No log output."
          : "Waiting for output…";
  }
}

function renderLogFollow(following, unseen) {
  const jump = $("log-jump");
  jump.hidden = following;
  jump.textContent =
    unseen > 0 ? `↓ ${unseen.toLocaleString()} new line${unseen === 1 ? "" : "s"}` : "↓ Jump to latest";
}

function runSearch() {
  const query = $("log-search").value;
  logView.search(query);
}

function renderSearchCount(current, total) {
  const query = $("log-search").value;
  const box = $("log-search-count");
  box.textContent = !query ? "" : total ? `${current + 1} of ${total.toLocaleString()}` : "No matches";
  $("log-prev").disabled = $("log-next").disabled = total === 0;
}

/** Tell screen readers about status changes, once per change. */
function announceStatus(dep) {
  const id = String(dep.id);
  const previous = state.announced.get(id);
  if (previous === dep.status) return;
  state.announced.set(id, dep.status);
  if (previous === undefined) return; // first sight is not a change
  $("status-announcer").textContent =
    `Deployment ${shortId(dep.id)} is now ${statusLabel(dep.status).toLowerCase()}.`;
}

// ------------------------------------------------------- server notices --

/** Limits the server could not enforce at start: a warning on every screen. */
async function loadServerInfo() {
  try {
    const info = await apiJson("server");
    const limits = info?.limits;
    const warn = Boolean(limits) && limits.enforced === false;
    $("limits-banner").hidden = !warn;
    if (!warn) return;
    const missing = Array.isArray(limits.missing) ? limits.missing.map(String) : [];
    // The server's message says it all in one sentence; the notice has a heading, so a list.
    fill(
      $("limits-text"),
      missing.length ? el("ul", { className: "limits-list" }, ...missing.map((why) => el("li", { text: why }))) : null,
      el("span", {
        text:
          limits.policy === "refuse"
            ? "Builds are refused until they hold (DEPLOYHUB_BUILD_WITHOUT_LIMITS=refuse)."
            : "Builds run without them (DEPLOYHUB_BUILD_WITHOUT_LIMITS=run). Make the cgroup writable " +
              "for DeployHub to enforce them.",
      }),
    );
  } catch {
    /* an older server without api/server, or signed out: no warning to give */
  }
}

function renderServerState(event) {
  const { away, reason } = event.detail;
  const wasAway = state.serverAway;
  state.serverAway = away;
  const banner = $("reconnect-banner");
  if (away) {
    fill(banner, el("strong", { text: "Reconnecting…" }), " ", `${reason} The page retries by itself.`);
  } else {
    banner.replaceChildren(); // an empty live region is not drawn
    if (wasAway) loadProjects(); // the reads that waited refill the view; the list too
  }
}

function renderConnection(connState) {
  const indicator = $("connection");
  indicator.dataset.state = connState;
  indicator.hidden = connState === "idle" || connState === "unauthorized";
  indicator.textContent =
    { connecting: "Connecting…", open: "Live", reconnecting: "Reconnecting…" }[connState] ?? "";
  $("log-conn").hidden = connState !== "reconnecting"; // not announced twice: the top bar's is live
  // The socket dropped: is the server away too? (A blip is not; the probe says which.)
  if (connState === "reconnecting") checkServer();
}

function renderSignOut() {
  $("sign-out").hidden = !getToken();
}

function statusBadge(status) {
  return el("span", { className: `badge badge-${statusKey(status)}`, text: statusLabel(status) });
}

function shortId(id) {
  const text = String(id);
  return text.length > 12 ? text.slice(0, 8) : text;
}

function isoTime(ts) {
  return typeof ts === "number" ? new Date(ts * 1000).toISOString() : null;
}

function setDeployBusy(busy) {
  const button = $("deploy-button");
  button.disabled = busy;
  button.textContent = busy ? "Deploying…" : "Deploy";
  $("deploy-form").setAttribute("aria-busy", String(busy));
}

function showFormError(message) {
  const box = $("deploy-error");
  box.hidden = !message;
  box.textContent = message ?? "";
  $("repo-url").setAttribute("aria-invalid", message ? "true" : "false");
}

function showBanner(message) {
  $("banner-text").textContent = message;
  $("banner").hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

// ------------------------------------------------------------------ setup --

function tick() {
  // The running step's duration counts up live.
  const dep = state.deployments.get(state.selectedId);
  if (dep && !isFinal(dep.status)) renderTimeline(dep);
}

function bindEvents() {
  $("deploy-form").addEventListener("submit", submitDeploy);
  $("var-form").addEventListener("submit", submitVariable);
  $("var-list").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-variable]");
    if (button) removeVariable(button);
  });
  $("auth-form").addEventListener("submit", submitAuth);
  $("sign-out").addEventListener("click", signOut);
  $("refresh-projects").addEventListener("click", loadProjects);
  $("banner-close").addEventListener("click", hideBanner);
  $("log-jump").addEventListener("click", () => logView.scrollToBottom());
  let searchTimer = 0;
  $("log-search").addEventListener("input", () => {
    clearTimeout(searchTimer); // one pass over a long log per pause in typing
    searchTimer = setTimeout(runSearch, 150);
  });
  $("log-search").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      clearTimeout(searchTimer);
      if (logView.query !== event.currentTarget.value) runSearch();
      else logView.nextMatch(event.shiftKey ? -1 : 1);
    } else if (event.key === "Escape" && event.currentTarget.value) {
      event.currentTarget.value = "";
      runSearch();
    }
  });
  $("log-search-form").addEventListener("submit", (event) => event.preventDefault());
  $("log-next").addEventListener("click", () => logView.nextMatch(1));
  $("log-prev").addEventListener("click", () => logView.nextMatch(-1));
  $("log-download").addEventListener("click", async (event) => {
    const button = event.currentTarget;
    const dep = state.deployments.get(state.selectedId);
    if (!dep) return;
    button.disabled = true;
    try {
      await downloadLog(dep);
    } catch (err) {
      showBanner(err.message);
    } finally {
      button.disabled = false;
    }
  });
  // A line number is the link to that line: put it in the address bar to
  // copy, and highlight the line, without scrolling the log under the pointer.
  $("log-scroller").addEventListener("click", (event) => {
    const link = event.target.closest("a.log-num");
    if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault();
    history.replaceState(null, "", link.getAttribute("href"));
    logView.highlightSeq(Number(link.textContent));
  });
  window.addEventListener("hashchange", route);
  window.addEventListener(SERVER_STATE_EVENT, renderServerState);
  setInterval(() => {
    if (!state.serverAway && document.visibilityState === "visible" && getToken()) checkServer();
  }, HEARTBEAT_MS);
  window.addEventListener(AUTH_REQUIRED_EVENT, showAuth);

  // One delegated listener for every action button, wherever it is rendered.
  $("project-view").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) {
      runAction(button);
      return;
    }
    // Clicking anywhere on a deployment row selects it (the id link is the
    // keyboard-accessible way to do the same).
    const row = event.target.closest(".dep-row");
    if (row && !event.target.closest("a, button")) {
      location.hash = deploymentHash(row.dataset.id);
    }
  });

  setInterval(tick, 1000);
  // Relative times ("3m ago") drift; a cheap periodic refresh keeps them honest.
  setInterval(() => state.project && renderDeploymentList(), 30_000);
}

/**
 * `deployhub serve` prints a login link ending in #token=...: keep the token in this browser
 * and take it out of the address bar (and history) before anything else reads the hash.
 */
function takeTokenFromLink() {
  const match = /^#token=([A-Za-z0-9_-]+)$/.exec(location.hash);
  if (!match) return;
  setToken(match[1]);
  history.replaceState(null, "", location.pathname + location.search);
}

takeTokenFromLink();
bindEvents();
renderSignOut();
loadProjects();
loadServerInfo();
route();
