// A project's settings screen: build settings, GitHub webhook, private-repository credential.
// (Build variables keep their own card in app.js.) Every change goes to the server, whose
// message for a bad value is shown next to the field it names.

import { apiJson, apiUrl, ApiError } from "./api.js";
import { formatRelative, formatAbsolute } from "./timeline.js";

const $ = (id) => document.getElementById(id);

// The names of GET/PATCH api/projects/<name>/settings (deployhub.validation.SETTING_NAMES).
export const SETTING_NAMES = [
  "branch",
  "root_directory",
  "install_command",
  "build_command",
  "output_directory",
  "node_version",
];

/** The setting a server message is about: the one named first in it, if any. */
export function fieldOfMessage(message) {
  let best = null;
  let at = Infinity;
  for (const name of SETTING_NAMES) {
    const found = new RegExp(`\\b${name}\\b`).exec(message);
    if (found && found.index < at) [best, at] = [name, found.index];
  }
  return best;
}

function projectPath(project, rest) {
  return `projects/${encodeURIComponent(project)}/${rest}`;
}

export class SettingsScreen {
  constructor() {
    this.project = null;
    this.saved = {}; // name -> value as the server has it (null: detected)
    this.hasSecret = false;
    this.edited = new Set(); // fields typed in since the screen opened: a late load keeps them
    $("settings-form").addEventListener("submit", (event) => this.save(event));
    $("settings-form").addEventListener("input", (event) => this.edited.add(event.target.name));
    $("hook-rotate").addEventListener("click", () => this.rotateSecret());
    $("cred-form").addEventListener("submit", (event) => this.saveCredential(event));
    $("cred-remove").addEventListener("click", () => this.removeCredential());
    document.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-copy]");
      if (button) copyField(button);
    });
  }

  /** Show project `name`'s settings (again: a reload after a save elsewhere is cheap). */
  async open(name) {
    const fresh = this.project !== name;
    this.project = name;
    if (fresh) {
      this.edited.clear();
      $("settings-form").reset();
      for (const field of SETTING_NAMES) this.fieldError(field, null);
      this.formError(null);
      $("settings-status").textContent = "";
      $("hook-secret-box").hidden = true;
      $("hook-secret").value = "";
      $("hook-status").textContent = "";
      showError("hook-error", null);
      showError("cred-error", null);
      $("cred-state").textContent = "";
      $("cred-form").hidden = true;
    }
    // The project name in the query: GitHub's payload need not match a repository URL.
    $("hook-url").value = `${apiUrl("hooks/github")}?project=${encodeURIComponent(name)}`;
    await Promise.all([this.loadSettings(name), this.loadCredential(name)]);
  }

  async loadSettings(name) {
    $("settings-form").setAttribute("aria-busy", "true");
    try {
      const body = await apiJson(projectPath(name, "settings"));
      if (this.project === name) this.show(body);
    } catch (err) {
      // A project made by deploying has settings; 404 is one not yet claimed by anybody.
      if (this.project === name && err.status !== 404) this.formError(err.message);
      else if (this.project === name) this.show({ settings: {}, webhook_secret_set: false });
    } finally {
      if (this.project === name) $("settings-form").setAttribute("aria-busy", "false");
    }
  }

  show(body) {
    this.saved = body?.settings ?? {};
    for (const name of SETTING_NAMES) {
      if (!this.edited.has(name)) $(`set-${name}`).value = this.saved[name] ?? "";
    }
    this.hasSecret = Boolean(body?.webhook_secret_set);
    $("hook-state").textContent = this.hasSecret
      ? "A secret is set. Rotating it makes a new one: update GitHub's webhook with it."
      : "No secret yet: set one, then paste it into GitHub's webhook form.";
    $("hook-rotate").textContent = this.hasSecret ? "Rotate secret" : "Set secret";
  }

  /** PATCH the fields that changed; an empty field goes back to detection (null). */
  async save(event) {
    event.preventDefault();
    const project = this.project;
    const changes = {};
    for (const name of SETTING_NAMES) {
      const value = $(`set-${name}`).value.trim();
      const now = value === "" ? null : value;
      if (now !== (this.saved[name] ?? null)) changes[name] = now;
      this.fieldError(name, null);
    }
    this.formError(null);
    const status = $("settings-status");
    if (!Object.keys(changes).length) {
      status.textContent = "Nothing changed.";
      return;
    }
    const button = $("settings-save");
    button.disabled = true;
    status.textContent = "Saving…";
    try {
      const body = await apiJson(projectPath(project, "settings"), { method: "PATCH", json: changes });
      if (this.project !== project) return;
      this.edited.clear(); // what was typed is what the server has now
      this.show(body);
      status.textContent = "Saved. The next deployment uses these settings.";
    } catch (err) {
      if (this.project !== project) return;
      status.textContent = "";
      const field = err.status === 400 ? fieldOfMessage(err.message) : null;
      if (field) {
        this.fieldError(field, err.message);
        $(`set-${field}`).focus();
      } else {
        this.formError(err.message);
      }
    } finally {
      button.disabled = false;
    }
  }

  fieldError(name, message) {
    const box = $(`set-${name}-error`);
    box.hidden = !message;
    box.textContent = message ?? "";
    $(`set-${name}`).setAttribute("aria-invalid", message ? "true" : "false");
  }

  formError(message) {
    showError("settings-error", message);
  }

  /** The server makes a secret and shows it this once. */
  async rotateSecret() {
    const project = this.project;
    const button = $("hook-rotate");
    if (this.hasSecret && !window.confirm("Make a new webhook secret? GitHub's webhook stops working until you paste it there.")) {
      return;
    }
    button.disabled = true;
    showError("hook-error", null);
    try {
      const body = await apiJson(projectPath(project, "settings"), {
        method: "PATCH",
        json: { webhook_secret: "generate" },
      });
      if (this.project !== project) return;
      this.show(body);
      $("hook-secret").value = body?.webhook_secret ?? "";
      $("hook-secret-box").hidden = !body?.webhook_secret;
      $("hook-status").textContent = "New secret made. Copy it now: it is not shown again.";
      $("hook-secret").focus();
      $("hook-secret").select();
    } catch (err) {
      if (this.project === project) showError("hook-error", err.message);
    } finally {
      button.disabled = false;
    }
  }

  // -- private-repository credential (GET/PUT/DELETE .../credential) -----------------

  async loadCredential(name) {
    try {
      const body = await apiJson(projectPath(name, "credential"));
      if (this.project === name) this.showCredential(body?.credential ?? null);
    } catch (err) {
      if (this.project !== name) return;
      if (err.status === 404 && !/^no project/.test(err.message)) this.credentialUnavailable();
      else showError("cred-error", err.message);
    }
  }

  credentialUnavailable() {
    $("cred-state").textContent = "Private repositories are not available on this server.";
    $("cred-form").hidden = true;
  }

  showCredential(credential) {
    $("cred-form").hidden = false;
    $("cred-remove").hidden = !credential;
    if (!credential) {
      $("cred-state").textContent = "No token: only public repositories can be cloned.";
      return;
    }
    const when = typeof credential.updated_at === "number" ? credential.updated_at : null;
    const who = credential.username ? ` for user ${credential.username}` : "";
    $("cred-state").textContent =
      `A token (${String(credential.hint ?? "")}) is set${who}` +
      (when != null ? `, updated ${formatRelative(when)}` : "") +
      ". Save another to replace it.";
    $("cred-state").title = when != null ? formatAbsolute(when) : "";
  }

  async saveCredential(event) {
    event.preventDefault();
    const project = this.project;
    const token = $("cred-token").value.trim();
    if (!token) {
      showError("cred-error", "Paste the access token first.");
      $("cred-token").focus();
      return;
    }
    const body = { token };
    const username = $("cred-username").value.trim();
    if (username) body.username = username;
    showError("cred-error", null);
    await this.credentialRequest(project, { method: "PUT", json: body });
    if (this.project === project && $("cred-error").hidden) $("cred-form").reset();
  }

  async removeCredential() {
    if (!window.confirm("Remove the token? Builds of a private repository fail without it.")) return;
    showError("cred-error", null);
    await this.credentialRequest(this.project, { method: "DELETE" });
    $("cred-token").focus();
  }

  async credentialRequest(project, options) {
    try {
      const body = await apiJson(projectPath(project, "credential"), options);
      if (this.project === project) this.showCredential(body?.credential ?? null);
    } catch (err) {
      if (this.project !== project) return;
      if (err instanceof ApiError && err.status === 404 && !/^no project/.test(err.message)) {
        this.credentialUnavailable();
      } else {
        showError("cred-error", err.message);
      }
    }
  }
}

function showError(id, message) {
  $(id).hidden = !message;
  $(id).textContent = message ?? "";
}

async function copyField(button) {
  const input = $(button.dataset.copy);
  input.select();
  try {
    await navigator.clipboard.writeText(input.value);
    button.textContent = "Copied";
  } catch {
    // No clipboard access (plain http, or denied): the text is selected for Ctrl+C.
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => (button.textContent = "Copy"), 2000);
}
