"""What the repository asks for: its package manager, its commands, its framework, its Node
version and where its output lands.

`plan(root, overrides)` decides everything before anything runs; every field of `Overrides`
(the project's own settings, later) replaces what detection would have found. `find_output`
looks for the output once the build ran. Each decision comes with a note for the build log
that says what was chosen and why.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .files import read_text
from .hosted_config import RepoSettings, build_settings, netlify_base
from .workspaces import real_dir, workspace_of

OUTPUT_DIRS = ("dist", "build", "out", ".output/public", "_site")
PACKAGE_JSON_MAX = 1024 * 1024
# Where to look for an index.html the build wrote when no known directory has output.
SEARCH_DEPTH = 2
SKIP_DIRS = frozenset({"node_modules", ".git", "src"})
APPS_SCANNED = 500  # folders looked at for an app when the repository root has none
APPS_SHOWN = 5


class BuildError(Exception):
    """The build cannot go on; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Overrides:
    """Project settings that replace a detected value; None keeps what detection finds."""

    root_directory: str | None = None  # relative to the repository
    install_command: tuple[str, ...] | None = None
    build_command: tuple[str, ...] | None = None
    output_directory: str | None = None  # relative to the root directory
    node_version: str | None = None  # a version or range, as in .nvmrc


@dataclass(frozen=True)
class Install:
    """One way to install: a manager, the lockfile it trusts and its commands."""

    manager: str  # "npm", "yarn", "pnpm" or "bun"
    version: str  # what runs, e.g. "9" for pnpm@9; "" for the machine's npm
    lockfile: str  # "" without one
    argv: list[str]
    launcher: list[str]  # prefix of `<launcher> run build`

    @property
    def label(self) -> str:
        return f"{self.manager}@{self.version}" if self.version else self.manager


@dataclass(frozen=True)
class Framework:
    name: str
    output: str  # its default output directory
    hint: str = ""  # what to do when that directory is missing
    # A file the output must hold: without it the build is a server's, which a static site
    # cannot run, and no other directory is published in its place (React Router's build/).
    entry: str = ""


@dataclass(frozen=True)
class NodeRequest:
    spec: str  # as written: "22", ">=18 <21", "lts/*"
    source: str  # where it was written: ".nvmrc", "package.json engines.node", ...


@dataclass(frozen=True)
class Plan:
    manager: str
    install: list[str]
    build: list[str]
    lockfile: str = ""
    installer: Install | None = None  # what `install` comes from; None: a project setting
    # Further lockfiles' installs, in precedence order: tried when the first lockfile is stale.
    fallbacks: tuple[Install, ...] = ()
    build_args: tuple[str, ...] = ()  # appended to `<manager> run build` (e.g. --base=/)
    # The sub-path the app is built for when it cannot be built for the root ("repo/"): the
    # site's files are served under it, and / redirects there.
    site_base: str = ""
    framework: Framework | None = None
    output: str | None = None  # the directory to take first (a setting, else the framework's)
    output_source: str = "project setting"  # where `output` was set, when not the framework's
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. PUBLIC_URL for CRA
    node: NodeRequest | None = None
    root: str = ""  # the root directory, relative to the repository ("" for its top)
    root_source: str = "project setting"  # where `root` was set
    # The netlify.toml that applies is the repository's top one, whose [build] base set `root`.
    netlify_at_top: bool = False
    notes: tuple[str, ...] = ()  # what was chosen and why, for the build log
    # Nothing to install or build: `output` (relative to the root directory, "" for it) is
    # published as it is, without its hidden files (.git, .env) and node_modules.
    static: bool = False


def read_package_json(root: Path, where: str = "the repository root") -> dict[str, object]:
    path = root / "package.json"
    if path.is_symlink() or not path.is_file():
        raise BuildError(
            f"No package.json at {where}. DeployHub builds Node projects: add a "
            "package.json with a \"build\" script."
        )
    if path.stat().st_size > PACKAGE_JSON_MAX:
        raise BuildError("package.json is larger than 1 MiB")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is skipped, as npm does.
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildError(f"package.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BuildError("package.json must hold a JSON object")
    return data


def plan(repo: Path, overrides: Overrides | None = None) -> Plan:
    """Everything the build will run, decided from the files at `repo` (and `overrides`)."""
    overrides = given = overrides or Overrides()
    root_source, netlify_dir = "project setting", None
    base_rel = ""  # the root directory netlify.toml's [build] base chose
    base_notes: list[str] = []
    if overrides.root_directory is None:
        base, base_notes = netlify_base(repo)
        if base_rel := _relative(base, "netlify.toml [build] base"):
            root_source = "netlify.toml [build] base"
            overrides = replace(overrides, root_directory=base_rel)
            if not _regular(repo / base_rel / "netlify.toml"):  # the base's own would replace it
                netlify_dir = repo
    rel = _relative(overrides.root_directory or "", "the root directory")
    root = repo / rel if rel else repo
    if rel and not real_dir(repo, rel):
        raise BuildError(
            f"The root directory {rel} ({root_source}) is not a directory in the repository "
            "at this commit (or it, or a directory on the way, is a symlink): set the root "
            "directory to the folder that holds the app's package.json."
        )
    where = f"the root directory {rel} ({root_source})" if rel else "the repository root"
    written = build_settings(root, netlify_dir, base_rel)
    written.notes[:0] = base_notes
    overrides, sources = _with_written(overrides, written)
    has_package = _regular(root / "package.json")
    package = read_package_json(root, where) if has_package else {}
    scripts = package.get("scripts")
    build_script = scripts.get("build") if isinstance(scripts, dict) else None
    if not isinstance(build_script, str) and overrides.build_command is None:
        # As on Vercel and Netlify: a site with no build is published as it is.
        if overrides.install_command is None and (static := _static_site(root, overrides, sources, has_package)):
            site, why = static
            shown = "/".join(p for p in (rel, site) if p) + "/" if rel or site else where
            return Plan(manager="", install=[], build=[], output=site, root=rel, static=True,
                        root_source=root_source, netlify_at_top=netlify_dir is not None,
                        notes=(*written.notes, f"Static site: {why}, so nothing is installed or "
                               f"built; {shown} is published as it is (without hidden files "
                               "such as .git and .env, and without node_modules)"))
        if not has_package:
            apps = [] if rel else apps_below(repo)
            if len(apps) == 1:  # an app in a subfolder, and the only one: build it
                found = plan(repo, replace(given, root_directory=apps[0]))
                return replace(found, root_source="detected: the only package.json with a "
                               "build script; set the root directory setting to choose another")
            if apps:
                raise BuildError(
                    "No package.json at the repository root, and several folders hold an app: "
                    + ", ".join(apps[:APPS_SHOWN]) + (" and more" if len(apps) > APPS_SHOWN else "")
                    + ". Set the project's root directory to the one to deploy.")
            read_package_json(root, where)  # says what is missing
        raise BuildError(
            'package.json has no "build" script. Add one, e.g. "scripts": {"build": "vite build"}, '
            "or commit an index.html to publish the files as they are."
        )
    notes: list[str] = list(written.notes)
    installs = _installs(root, package, notes)
    turbo = ""  # the workspace root, when Turborepo builds this package and its dependencies
    if rel and not installs[0].lockfile and (workspace := workspace_of(repo, rel)) is not None:
        # A package of a monorepo: its lockfile (and packageManager) is the workspace root's,
        # and the install there (the managers find it from the package) installs them all.
        notes = [*written.notes, f"Workspace: {rel} is a workspace package of "
                 + (f"{workspace}/" if workspace else "the repository root")
                 + ", whose lockfile installs it"]
        up = "../" * (rel.count("/") - (workspace.count("/") + 1 if workspace else 0) + 1)
        top = repo / workspace if workspace else repo
        top_package = read_package_json(top)
        # npm in a workspace's folder installs that workspace alone; the root's own
        # devDependencies (a shared vite, typescript or turbo) come with it only if asked.
        installs = [replace(i, lockfile=up + i.lockfile,
                            argv=[*i.argv, "--include-workspace-root"] if i.manager == "npm" else i.argv)
                    if i.lockfile else i for i in _installs(top, top_package, notes)]
        if _regular(top / "turbo.json") and _depends_on(top_package, "turbo"):
            turbo = f"{workspace}/" if workspace else "the repository root"
    chosen = installs[0]
    install = list(overrides.install_command or chosen.argv)
    framework = detect_framework(package)
    env: dict[str, str] = dict(written.environment)  # below the project's own variables
    if written.environment:
        notes.append("Build variables from netlify.toml [build.environment]: "
                     + ", ".join(sorted(written.environment)) + " (the project's variables win)")
    args: list[str] = []
    site_base = ""
    turbo_run = TURBO_RUN.get(chosen.manager) if turbo and overrides.build_command is None else None
    if turbo_run is not None:
        env["TURBO_TELEMETRY_DISABLED"] = "1"
    if framework is not None:
        notes.append(f"Framework: {framework.name} (from package.json dependencies); "
                     f"its output directory is {framework.output}")
        if (sub := _sub_path_of(root, package, framework, env, notes)) is not None:
            if sub.flag and overrides.build_command is None and turbo_run is None:
                args = list(sub.flag)
                notes.append(f"{sub.where}, a sub-path; the site is served at the root of its "
                             f"host name, so the build runs with {' '.join(sub.flag)}")
            else:
                site_base = sub.path.strip("/") + "/"
                why = ("the build command is set" if sub.flag and overrides.build_command is not None
                       else "Turborepo runs the build" if sub.flag else sub.fixed_by)
                notes.append(f"{sub.where}, a sub-path, and {why}: the site is built for "
                             f"{sub.path}, so it is served there, and / redirects to it")
    build = build_command(chosen, args)
    if turbo_run is not None:
        # As Vercel builds a Turborepo app: `turbo run build` in the app's folder builds it
        # and, first, the workspace packages it depends on (their `^build`).
        build = [*chosen.launcher, *turbo_run]
        notes.append(f"Build command: {' '.join(build)} (Turborepo: turbo.json and turbo at "
                     f"{turbo} build {rel}'s workspace dependencies first, as on Vercel)")
    if overrides.install_command is not None:
        notes.append("Install command: " + " ".join(install) + f" ({sources['install_command']})")
    if overrides.build_command is not None:
        build = list(overrides.build_command)
        notes.append("Build command: " + " ".join(build) + f" ({sources['build_command']})")
    output = framework.output if framework else None
    if overrides.output_directory is not None:
        output = _relative(overrides.output_directory, "the output directory")
    return Plan(
        manager=chosen.manager, install=install, build=build, lockfile=chosen.lockfile,
        installer=chosen if overrides.install_command is None else None,
        fallbacks=tuple(installs[1:]) if overrides.install_command is None else (),
        build_args=tuple(args), site_base=site_base,
        framework=framework, output=output, env=env,
        output_source=sources.get("output_directory", "project setting"),
        node=node_request(root, package, overrides, sources.get("node_version"), rel), root=rel,
        root_source=root_source, netlify_at_top=netlify_dir is not None, notes=tuple(notes),
    )


def apps_below(repo: Path) -> list[str]:
    """The folders one or two levels down (`frontend`, `apps/web`) whose package.json has a
    build script, for a repository with none at its root; hidden ones, node_modules and
    symlinks are passed over, and at most APPS_SCANNED folders are looked at."""
    found: list[str] = []
    scanned = 0
    level = [""]
    for _ in range(2):
        below: list[str] = []
        for parent in level:
            try:
                entries = sorted(os.scandir(repo / parent), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if (entry.name.startswith(".") or entry.name in SKIP_DIRS - {"src"}
                        or not entry.is_dir(follow_symlinks=False)):
                    continue
                scanned += 1
                if scanned > APPS_SCANNED:
                    return found
                rel = f"{parent}/{entry.name}" if parent else entry.name
                if _regular(Path(entry.path) / "package.json"):
                    try:
                        scripts = read_package_json(Path(entry.path)).get("scripts")
                    except BuildError:
                        continue
                    if isinstance(scripts, dict) and isinstance(scripts.get("build"), str):
                        found.append(rel)
                else:
                    below.append(rel)
        level = below
    return found


def _with_written(overrides: Overrides, written: RepoSettings) -> tuple[Overrides, dict[str, str]]:
    """The project's settings, each one it leaves unset taken from the repository's
    vercel.json / netlify.toml (a command runs as `sh -c`, as a setting's does); and where
    each setting that is set came from."""
    sources: dict[str, str] = {}
    changes: dict[str, object] = {}
    for name in ("install_command", "build_command", "output_directory", "node_version"):
        if getattr(overrides, name) is not None:
            sources[name] = "project setting"
        elif name in written.values:
            value = written.values[name]
            changes[name] = ("sh", "-c", value) if name.endswith("_command") else value
            sources[name] = written.sources[name]
    return replace(overrides, **changes), sources  # type: ignore[arg-type]


def _static_site(root: Path, overrides: Overrides, sources: Mapping[str, str],
                 has_package: bool) -> tuple[str, str] | None:
    """The directory of a site without a build (relative to `root`) and why, or None when
    there is no index.html to publish: the output directory setting, else public/ (Vercel's
    choice when it exists), else `root` itself."""
    why = 'package.json has no "build" script' if has_package else "there is no package.json"
    if overrides.output_directory is not None:
        site = _relative(overrides.output_directory, "the output directory")
        if not real_dir(root, site):
            raise BuildError(f"The output directory {site} ({sources['output_directory']}) is not a directory "
                             "in the repository (or it, or a directory on the way, is a symlink).")
        return site, why
    for site in ("public", ""):
        if real_dir(root, site) and _regular(root / site / "index.html"):
            return site, why
    return None


def _relative(path: str, what: str) -> str:
    parts = [p for p in path.strip().strip("/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or "\\" in path or "\0" in path:
        raise BuildError(f"{what} must be a path inside the repository, not {path!r}")
    return "/".join(parts)


# -- package managers ----------------------------------------------------------------------

# Which lockfile wins when a repository has several: Vercel's order (@vercel/build-utils
# scanParentDirs): bun when bun's lockfile sits next to a yarn.lock (bun can write both),
# then yarn, pnpm, npm, bun.
PRECEDENCE = ("yarn", "pnpm", "npm", "bun")
LOCKFILES = {
    "yarn": ("yarn.lock",),
    "pnpm": ("pnpm-lock.yaml",),
    "npm": ("package-lock.json", "npm-shrinkwrap.json"),
    "bun": ("bun.lock", "bun.lockb"),
}
# What each manager prints when its frozen install refuses a lockfile that is out of date.
STALE_LOCKFILE = re.compile(
    r"can only install packages when your package\.json and package-lock\.json"  # npm ci
    r"|Your lockfile needs to be updated"  # yarn 1
    r"|lockfile would have been modified by this install"  # yarn berry (YN0028)
    r"|ERR_PNPM_OUTDATED_LOCKFILE|is not up to date with"  # pnpm
    r"|lockfile had changes, but lockfile is frozen",  # bun
)
UPDATE_COMMAND = {"npm": "npm install", "yarn": "yarn install", "pnpm": "pnpm install",
                  "bun": "bun install"}


def _installs(root: Path, package: Mapping[str, object], notes: list[str]) -> list[Install]:
    declared = package.get("packageManager")
    declared = declared if isinstance(declared, str) else ""
    declared_name = declared.split("@", 1)[0] if "@" in declared else ""
    found = {m: next((f for f in files if _regular(root / f)), "") for m, files in LOCKFILES.items()}
    present = [m for m in PRECEDENCE if found[m]]
    order = list(present)
    why = ""
    if found["bun"] and found["yarn"]:
        order.remove("bun")
        order.insert(0, "bun")
        why = f"{found['bun']} next to yarn.lock: bun wrote both"
    if declared_name in present and order[0] != declared_name:
        order.remove(declared_name)
        order.insert(0, declared_name)
        why = f'package.json "packageManager" names {declared}'
    elif declared_name and declared_name not in present and present:
        notes.append(f'package.json "packageManager" names {declared}, but there is no '
                     f"{LOCKFILES.get(declared_name, ('its lockfile',))[0]}: following the "
                     "lockfile instead")
    installs = [_install(root, m, found[m], declared if m == declared_name else "") for m in order]
    if not installs:
        name = declared_name if declared_name in LOCKFILES else "npm"
        installs = [_install(root, name, "", declared if name == declared_name else "")]
        notes.append(f"Package manager: {installs[0].label} (no lockfile"
                     + (f'; package.json "packageManager" names {declared})' if declared else ")"))
        return installs
    if len(installs) > 1:
        why = why or "the hosted platforms' order: yarn, pnpm, npm, bun"
        notes.append(
            f"Package manager: {installs[0].label}, from {installs[0].lockfile}. Several "
            f"lockfiles ({', '.join(i.lockfile for i in installs)}): {installs[0].lockfile} "
            f"won ({why}). Delete the ones you do not use."
        )
    else:
        notes.append(f"Package manager: {installs[0].label}, from {installs[0].lockfile}"
                     + (f' and package.json "packageManager" ({declared})' if declared_name ==
                        installs[0].manager else ""))
    return installs


def _install(root: Path, manager: str, lockfile: str, declared: str) -> Install:
    frozen = bool(lockfile)
    if manager == "pnpm":
        version = _declared_version(declared, "pnpm") or _pnpm_version(root)
        launcher = ["npx", "--yes", f"pnpm@{version}"]
        flags = ["--frozen-lockfile"] if frozen else []
        return Install("pnpm", version, lockfile, [*launcher, "install", *flags], launcher)
    if manager == "yarn":
        version = _declared_version(declared, "yarn") or _yarn_version(root, lockfile)
        if version.split(".")[0] == "1":
            launcher = ["npx", "--yes", f"yarn@{version}"]
            flags = ["--frozen-lockfile"] if frozen else []
            return Install("yarn", version, lockfile,
                           [*launcher, "install", *flags, "--non-interactive"], launcher)
        launcher = ["corepack", f"yarn@{version}"]
        flags = ["--immutable"] if frozen else []
        return Install("yarn", version, lockfile, [*launcher, "install", *flags], launcher)
    if manager == "bun":
        version = _declared_version(declared, "bun") or "1"
        launcher = ["npx", "--yes", f"bun@{version}"]
        flags = ["--frozen-lockfile"] if frozen else []
        return Install("bun", version, lockfile, [*launcher, "install", *flags], launcher)
    # npm: the machine's own (a packageManager npm version is not fetched: npm reads every
    # lockfile version since npm 7).
    return Install("npm", "", lockfile, ["npm", "ci"] if frozen else ["npm", "install"], ["npm"])


# `turbo run build` through each manager, after its launcher: turbo is installed at the
# workspace root, which the managers find from a package's folder.
TURBO_RUN = {"npm": ["exec", "--no", "--", "turbo", "run", "build"],
             "pnpm": ["exec", "turbo", "run", "build"], "yarn": ["turbo", "run", "build"]}


def _depends_on(package: Mapping[str, object], name: str) -> bool:
    return any(isinstance(deps := package.get(key), dict) and name in deps
               for key in ("dependencies", "devDependencies"))


def build_command(install: Install, args: Sequence[str] = ()) -> list[str]:
    """`<manager> run build` with `args` passed on to the script."""
    extra = ["--", *args] if args and install.manager == "npm" else list(args)
    return [*install.launcher, "run", "build", *extra]


def stale_lockfile(lines: Sequence[str]) -> bool:
    """Whether a failed install's output says its lockfile is out of date."""
    return any(STALE_LOCKFILE.search(line) for line in lines)


def stale_advice(install: Install) -> str:
    update = UPDATE_COMMAND[install.manager]
    return (f"{install.lockfile} is out of date with package.json: {install.label} refused to "
            f"install from it. Run `{update}` and commit the updated {install.lockfile}.")


# Failures whose cause is known from a line of the command's output, with what to change.
KNOWN_FAILURES = (
    (re.compile(r"Treating warnings as errors because process\.env\.CI = true"),
     "Create React App treats lint warnings as errors when CI is set, and DeployHub sets CI=1 "
     "as Vercel does: fix the warnings above, or add the build variable CI=false."),
    (re.compile(r"ERR_OSSL_EVP_UNSUPPORTED|digital envelope routines::unsupported"),
     "webpack 4 (react-scripts 4 and older) hashes with MD4, which Node 17 and later no "
     'longer have: ask for Node 16 ("engines": {{"node": "16.x"}}, an .nvmrc or the project\'s '
     "Node version setting), move to webpack 5 (react-scripts 5), or add the build variable "
     "NODE_OPTIONS=--openssl-legacy-provider."),
    (re.compile(r"JavaScript heap out of memory"),
     "Node's heap filled up before the build's memory limit did: raise the heap with the build "
     "variable NODE_OPTIONS=--max-old-space-size=<MiB>, below the memory limit."),
    (re.compile(r"^sh: \d+: (?P<command>[\w@./+-]+): not found$"),
     "{command} is not installed: add the package that provides it to package.json "
     "(devDependencies are installed too, unless the build variable NODE_ENV=production "
     "is set: then npm, yarn 1 and pnpm leave them out)."),
    (re.compile(r"\bERESOLVE\b"),
     "npm could not resolve the peer dependencies (npm 7 and later check them): align the "
     "versions, or install with legacy peer dependencies: commit an .npmrc holding "
     "legacy-peer-deps=true, or set the install command to `npm ci --legacy-peer-deps`."),
)


def failure_advice(lines: Sequence[str]) -> str:
    """What to change, for each known cause that a failed command's output shows."""
    found: list[str] = []
    for pattern, advice in KNOWN_FAILURES:
        match = next((m for line in lines if (m := pattern.search(line))), None)
        if match is not None:
            found.append(advice.format_map(match.groupdict()))
    return " ".join(found)


def _regular(path: Path) -> bool:
    """A regular file, not a symlink: a repository's symlink may point anywhere on the host."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _declared_version(declared: str, name: str) -> str:
    match = re.fullmatch(rf"{name}@(\d+(?:\.\d+){{0,2}})(?:\+.*)?", declared)
    return match.group(1) if match else ""


def _yarn_version(root: Path, lockfile: str) -> str:
    """Yarn's major from the lockfile's format: v1 has no __metadata; Berry's version says."""
    head = read_text(root / lockfile, 2000) if lockfile else ""
    if not lockfile or "# yarn lockfile v1" in head or "__metadata:" not in head:
        return "1"
    match = re.search(r"__metadata:\s*\n\s+version:\s*(\d+)", head)
    version = int(match.group(1)) if match else 8
    return "2" if version <= 5 else "3" if version <= 7 else "4"


def _pnpm_version(root: Path) -> str:
    """The pnpm major that reads this lockfile (a newer one would rewrite it and fail)."""
    head = read_text(root / "pnpm-lock.yaml", 300)
    match = re.search(r"lockfileVersion:\s*'?(\d+)(?:\.(\d+))?", head)
    if not match:
        return "9"
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    if major >= 9:
        return "9"
    if major >= 6:
        return "8"
    if major == 5 and minor >= 4:
        return "7"
    return "6"


# -- frameworks ----------------------------------------------------------------------------

# By the dependency that names them; the first match wins, so the frameworks built on Vite
# (Astro, SvelteKit) come before Vite itself.
FRAMEWORKS = (
    ("next", Framework("Next.js", "out", "set `output: 'export'` in next.config.js so "
                       "`next build` writes a static site to out/")),
    ("gatsby", Framework("Gatsby", "public")),
    ("@docusaurus/core", Framework("Docusaurus", "build")),
    ("astro", Framework("Astro", "dist")),
    ("@sveltejs/kit", Framework("SvelteKit", "build", "use @sveltejs/adapter-static, which "
                                "writes the site to build/")),
    ("@react-router/dev", Framework(
        "React Router", "build/client", "React Router's framework mode renders pages on a "
        "server unless told otherwise: set `ssr: false` in react-router.config (SPA mode) or "
        "list the pages to `prerender` there, so that `react-router build` writes a static "
        "site with an index.html to build/client", entry="index.html")),
    ("@remix-run/dev", Framework(
        "Remix", "build/client", "Remix renders pages on a server: use its SPA mode "
        "(`remix({ ssr: false })` in vite.config, Remix 2.5 and later), which writes a static "
        "site with an index.html to build/client", entry="index.html")),
    ("react-scripts", Framework("Create React App", "build")),
    ("vite", Framework("Vite", "dist")),
)
VITE_CONFIGS = ("vite.config.js", "vite.config.mjs", "vite.config.ts", "vite.config.mts",
                "vite.config.cjs", "vite.config.cts")
DOCUSAURUS_CONFIGS = ("docusaurus.config.js", "docusaurus.config.mjs", "docusaurus.config.ts",
                      "docusaurus.config.cjs", "docusaurus.config.mts")
GATSBY_CONFIGS = ("gatsby-config.js", "gatsby-config.mjs", "gatsby-config.ts")
REACT_ROUTER_CONFIGS = ("react-router.config.ts", "react-router.config.js", "react-router.config.mjs")
# `<key>: <expression>` up to the end of the property (_config_path); the string literals in it
# that look like a base (a path or a URL) are what it may be:
# `base: mode === 'production' ? '/app/' : '/'`.
# A sub-path a site may be served under: "/repo/", "/docs/v2/".
SUB_PATH_RE = re.compile(r"(/(?!\.\.?/)[A-Za-z0-9._~@+-]+)+/")
STRING_LITERAL = re.compile(r"""(['"`])(?P<text>[^'"`\n]*)\1""")
JS_COMMENT = re.compile(r"/\*.*?\*/|^\s*//[^\n]*", re.DOTALL | re.MULTILINE)


def detect_framework(package: Mapping[str, object]) -> Framework | None:
    deps: set[str] = set()
    for key in ("dependencies", "devDependencies"):
        value = package.get(key)
        if isinstance(value, dict):
            deps.update(str(k) for k in value)
    return next((fw for dep, fw in FRAMEWORKS if dep in deps), None)


@dataclass(frozen=True)
class SubPath:
    """A sub-path an app's config builds it for (a GitHub Pages project site's)."""

    path: str  # "/repo/"
    where: str  # which config says so, for the log
    flag: tuple[str, ...] = ()  # build arguments that build it for the root instead
    fixed_by: str = ""  # when there are none: why not, for the log


def _sub_path_of(
    root: Path, package: Mapping[str, object], framework: Framework, env: dict[str, str],
    notes: list[str],
) -> SubPath | None:
    """Sites are served at the root of their host name: undo a sub-path the app builds for
    where a variable or a flag can (a CRA `homepage`: PUBLIC_URL, set in `env` here), else say
    which sub-path it is built for, so the site is served under it."""
    scripts = package.get("scripts")
    script = scripts.get("build") if isinstance(scripts, dict) else None
    script = script if isinstance(script, str) else ""
    if framework.name == "Create React App":
        homepage = package.get("homepage")
        if isinstance(homepage, str) and _sub_path(homepage):
            env["PUBLIC_URL"] = "/"
            notes.append(f'package.json "homepage" is {homepage}, a sub-path; the site is served '
                         "at the root of its host name, so the build gets PUBLIC_URL=/")
        return None
    configs = {"Vite": [(n, "base") for n in VITE_CONFIGS],
               "Docusaurus": [(n, "baseUrl") for n in DOCUSAURUS_CONFIGS],
               "Gatsby": [(n, "pathPrefix") for n in GATSBY_CONFIGS],
               # Vite's base places the assets; the router's basename, the routes.
               "React Router": [(n, "base") for n in VITE_CONFIGS]
               + [(n, "basename") for n in REACT_ROUTER_CONFIGS],
               "Remix": [(n, "base") for n in VITE_CONFIGS]}.get(framework.name, [])
    for name, key in configs:
        base = _config_path(read_text(root / name, 64 * 1024), key)
        if base is None:
            continue
        if not _sub_path(base):
            return None
        where, path = f"{name} sets {key} {base!r}", _path_of(base)
        if not SUB_PATH_RE.fullmatch(path):
            notes.append(f"Warning: {where}, which is not a path this server can serve a site "
                         "under (letters, digits and ._~@+- between slashes); the site is "
                         "served at the root as it was built. Set it to '/'.")
            return None
        if framework.name == "Vite":
            if re.search(r"(^|&&|;)\s*vite build[^&;|]*$", script):
                # Vite reads no variable for its base; the CLI flag beats the config file.
                return SubPath(path, where, ("--base=/",))
            if "://" in base:  # assets on another host (a CDN) perhaps: not ours to serve
                notes.append(f"Warning: {where}, a URL, and the build script is not a plain "
                             "`vite build` (which --base=/ builds for the root): assets are "
                             "linked there. Set base to '/'.")
                return None
            return SubPath(path, where, fixed_by="the build script is not a plain `vite build` "
                           "(which --base=/ builds for the root)")
        if framework.name == "Gatsby":
            if "--prefix-paths" not in script:
                return None  # Gatsby builds for the root unless told to use it
            return SubPath(path, where, fixed_by="the build uses it (--prefix-paths)")
        return SubPath(path, where, fixed_by=f"{framework.name} has no flag that builds for the root")
    return None


def _config_path(config: str, key: str) -> str | None:
    """The base path a config file sets under `key`: its sub-path one when it names several
    (a base for production, another for the dev server), None when it sets none this can read."""
    bases: list[str] = []
    pattern = re.compile(rf"""(?<![\w$.]){key}\s*:\s*(?P<expr>[^,\n}}]*)""")
    for match in pattern.finditer(JS_COMMENT.sub("", config)):
        bases += [m.group("text") for m in STRING_LITERAL.finditer(match.group("expr"))
                  if m.group("text").startswith(("/", "./")) or "://" in m.group("text")]
    return next((b for b in bases if _sub_path(b)), bases[0] if bases else None)


def _url_path(url: str) -> str:
    """A homepage / base URL without its scheme and host."""
    return re.sub(r"^[a-z][a-z0-9+.-]*://[^/]*", "", url.strip(), flags=re.IGNORECASE)


def _path_of(url: str) -> str:
    """The path of a homepage / base URL, with slashes at both ends: "/repo/"."""
    return "/" + "/".join(p for p in _url_path(url).split("/") if p not in ("", ".")) + "/"


def _sub_path(url: str) -> bool:
    """Whether a homepage / base URL puts the app under a path other than /."""
    return _url_path(url).strip("/.") != ""


# -- Node ----------------------------------------------------------------------------------


def node_request(root: Path, package: Mapping[str, object], overrides: Overrides,
                 source: str | None = None, rel: str = "") -> NodeRequest | None:
    """The Node version the repository asks for: a setting (`source`: where it was set, when
    not the project's settings), else .node-version / .nvmrc (a version manager's pin) in the
    root directory or the nearest folder above it in the repository (`rel`: the root
    directory's path there), as nvm and fnm look for them, else engines.node (the range the
    package says it works with)."""
    if overrides.node_version:
        return NodeRequest(overrides.node_version.strip(),
                           "the project's Node version setting" if source in (None, "project setting")
                           else source)
    parts = rel.split("/") if rel else []
    for depth in range(len(parts), -1, -1):  # the root directory first, the repository last
        folder = root.parents[len(parts) - depth - 1] if depth < len(parts) else root
        for name in (".node-version", ".nvmrc"):
            if _regular(folder / name):
                lines = [ln.split("#", 1)[0].strip() for ln in read_text(folder / name, 200).splitlines()]
                if spec := next((ln for ln in lines if ln), ""):
                    return NodeRequest(spec, "/".join([*parts[:depth], name]))
    engines = package.get("engines")
    if isinstance(engines, dict) and isinstance(engines.get("node"), str) and engines["node"].strip():
        return NodeRequest(engines["node"].strip(), "package.json engines.node")
    return None


# -- output --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    path: Path
    why: str


def find_output(root: Path) -> Path:
    return locate_output(root).path


def locate_output(root: Path, plan: Plan | None = None, *, built_after: float | None = None) -> Output:
    """The directory to publish: the setting's or the framework's, else the first non-empty
    known one, else the shallowest directory holding an index.html written by the build."""
    expected = plan.output if plan else None
    if expected is not None:
        framework = plan.framework if plan and plan.framework and plan.framework.output == expected else None
        if real_dir(root, expected) and any((root / expected).iterdir()):
            if framework and framework.entry and not _regular(root / expected / framework.entry):
                raise BuildError(f"The build finished but {framework.name} wrote no "
                                 f"{expected}/{framework.entry}: {framework.hint}.")
            source = (f"{framework.name}'s output directory" if framework else
                      "the output directory setting" if plan is None or plan.output_source == "project setting"
                      else plan.output_source)
            return Output(root / expected, source)
        if framework:
            if framework.hint and (framework.entry or not any(real_dir(root, n) for n in OUTPUT_DIRS)):
                raise BuildError(
                    f"The build finished but {framework.name} wrote no {expected}/: "
                    f"{framework.hint}."
                )
        else:
            raise BuildError(
                f"The build finished but the output directory {expected} ({plan.output_source if plan else 'project setting'}) "
                "is missing or empty."
            )
    for name in OUTPUT_DIRS:
        # A symlinked output dir, or a symlinked parent of it (.output -> /etc), could point
        # anywhere on the machine: never follow one.
        if real_dir(root, name) and any((root / name).iterdir()):
            return Output(root / name, "a usual output directory")
    if built_after is not None and (found := _written_index(root, built_after)):
        return Output(found, "holds the index.html the build wrote")
    raise BuildError(
        "The build finished but produced no output directory. Looked for "
        + ", ".join(([expected] if expected else []) + list(OUTPUT_DIRS))
        + " at the repository root, and for a directory with an index.html written by the "
        "build; make the build write its files to one of them."
    )


def _written_index(root: Path, since: float) -> Path | None:
    """The shallowest directory (never a symlink, not node_modules) with a fresh index.html."""
    level = [root]
    for _ in range(SEARCH_DEPTH):
        found: list[Path] = []
        below: list[Path] = []
        for parent in level:
            try:
                entries = sorted(os.scandir(parent), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name in SKIP_DIRS or entry.name.startswith(".") or not entry.is_dir(
                    follow_symlinks=False
                ):
                    continue
                index = Path(entry.path) / "index.html"
                try:
                    info = index.lstat()
                except OSError:
                    below.append(Path(entry.path))
                    continue
                if stat.S_ISREG(info.st_mode) and info.st_mtime >= since:
                    found.append(Path(entry.path))
                below.append(Path(entry.path))
        if found:
            return found[0]
        level = below
    return None
