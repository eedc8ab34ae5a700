"""A repository's vercel.json and netlify.toml routing: read into the site's rules, what
cannot be followed said in the build log, and served end to end."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service
from worker.hosted_config import read

VERCEL = {
    "redirects": [
        {"source": "/old-blog/:slug", "destination": "/blog/:slug"},
        {"source": "/moved/:path*", "destination": "https://new.example/:path*", "permanent": False},
        {"source": "/only-admins", "destination": "/", "has": [{"type": "cookie", "key": "admin"}]},
    ],
    "rewrites": [{"source": "/app/(.*)", "destination": "/index.html"},
                 {"source": "/api/(.*)", "destination": "https://api.example/$1"}],
    "headers": [{"source": "/(.*)", "headers": [{"key": "X-From-Vercel", "value": "yes"},
                                                {"key": "Content-Length", "value": "1"}]}],
    "cleanUrls": True,
}
NETLIFY = """
[build]
  publish = "dist"

[[redirects]]
  from = "/docs/*"
  to = "https://docs.example/:splat"
  status = 302
  force = true

[[redirects]]
  from = "/de/*"
  to = "/de/index.html"
  status = 200
  conditions = {Language = ["de"]}

[[headers]]
  for = "/*"
  [headers.values]
    X-From-Netlify = "yes"
    Permissions-Policy = '''
      camera=(),
      microphone=()'''
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_vercel_json_becomes_rules_and_says_what_it_left_out(tmp_path: Path) -> None:
    found = read(write(tmp_path, {"vercel.json": json.dumps(VERCEL)}))
    assert [(r.source, r.target, r.status, r.force) for r in found.redirects] == [
        ("/old-blog/:slug", "/blog/:slug", 308, True),
        ("/moved/*", "https://new.example/:splat", 307, True),
        ("/app/*", "/index.html", 200, False),
    ]
    assert [(h.pattern, h.values) for h in found.headers] == [("/*", (("X-From-Vercel", "yes"),))]
    notes = "\n".join(found.notes)
    assert "vercel.json cleanUrls is not supported" in notes
    assert "vercel.json redirects #3: has / missing conditions are not supported; ignored" in notes
    assert "vercel.json rewrites #2:" in notes and "proxying to other sites is not supported" in notes
    assert "Content-Length is set by the server" in notes
    assert "Read 3 redirect and rewrite rules and 1 header rules from vercel.json" in notes


def test_netlify_toml_becomes_rules_and_says_what_it_left_out(tmp_path: Path) -> None:
    found = read(write(tmp_path, {"netlify.toml": NETLIFY}))
    assert [(r.source, r.target, r.status, r.force) for r in found.redirects] == [
        ("/docs/*", "https://docs.example/:splat", 302, True)]
    assert found.headers[0].pattern == "/*"
    assert dict(found.headers[0].values) == {"X-From-Netlify": "yes", "Permissions-Policy": "camera=(), microphone=()"}
    assert any("netlify.toml redirects #2: conditions not supported; ignored" in n for n in found.notes)


@pytest.mark.parametrize("source, destination, expected", [
    ("/", "/home", ("/", "/home")),
    ("/blog/:slug", "/posts/:slug", ("/blog/:slug", "/posts/:slug")),
    ("/docs/:path*", "/guide/:path*", ("/docs/*", "/guide/:splat")),
    ("/docs/:path(.*)", "/guide/:path", ("/docs/*", "/guide/:splat")),
    ("/(.*)", "/index.html", ("/*", "/index.html")),
    ("/assets/(.*)", "/static/$1", ("/assets/*", "/static/:splat")),
    ("/user/:id(\\d+)", "/u/:id", "uses a pattern this server does not read"),
    ("/a/:b?", "/c", "uses a pattern this server does not read"),
    ("/a/(.*)/b", "/c/$1", "uses a pattern this server does not read"),
    ("/a/:b", "/c/$2", "uses a group the source does not have"),
])
def test_vercel_sources_translate_or_say_why_not(source: str, destination: str, expected: object) -> None:
    from worker.hosted_config import _vercel_rule

    got = _vercel_rule(source, destination)
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got
    else:
        assert got == expected


@pytest.mark.parametrize("name, text, note", [
    ("vercel.json", "{not json", "vercel.json could not be read"),
    ("netlify.toml", "[[redirects]\nfrom=", "netlify.toml could not be read"),
    ("vercel.json", "[1, 2]", "vercel.json does not hold a table of settings"),
    ("vercel.json", json.dumps({"redirects": {"source": "/a"}}), "vercel.json redirects must be a list"),
    ("vercel.json", json.dumps({"redirects": ["/a"]}), "vercel.json redirects #1 is not a table"),
    ("vercel.json", json.dumps({"redirects": [{"source": 1, "destination": "/b"}]}), "must be strings"),
    ("vercel.json", json.dumps({"redirects": [{"source": "/a", "destination": "/b", "statusCode": "x"}]}),
     "status -1 is not one of"),
    ("netlify.toml", "[[redirects]]\nfrom = '/a'\nto = '/b'\nstatus = 418\n", "status 418 is not one of"),
    ("netlify.toml", "[[headers]]\nfor = '/*'\nvalues = 'x'\n", "values must be a table"),
    ("vercel.json", "x" * 300_000, "vercel.json is larger than 256 KiB"),
])
def test_config_that_cannot_be_used_is_a_warning_never_an_error(tmp_path: Path, name: str, text: str, note: str) -> None:
    found = read(write(tmp_path, {name: text}))
    assert (found.redirects, found.headers) == ([], [])
    assert any(note in n for n in found.notes), found.notes


def test_a_symlinked_config_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.json").write_text(json.dumps(VERCEL))
    (tmp_path / "vercel.json").symlink_to(tmp_path / "elsewhere.json")
    found = read(tmp_path)
    assert (found.redirects, found.headers, found.notes) == ([], [], [])


async def test_vercel_and_netlify_routing_is_served(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("hosted"), files_dir=TINY_APP,
                              files={"vercel.json": json.dumps(VERCEL), "netlify.toml": NETLIFY})
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert "Read 1 redirect and rewrite rules and 1 header rules from netlify.toml" in texts, texts[-12:]
    assert any(t.startswith("Warning: vercel.json redirects #3: has / missing") for t in texts)
    project = final["project"]
    get = functools.partial(service.site, project)  # redirects are returned, not followed
    status, headers, _ = await get("/old-blog/hello")
    assert status == 308 and headers["Location"] == "/blog/hello"
    status, headers, _ = await get("/docs/intro/setup")
    assert status == 302 and headers["Location"] == "https://docs.example/intro/setup"
    status, headers, body = await get("/app/settings/profile.json")  # a rewrite, not the shell
    _, _, index = await get("/")
    assert status == 200 and body == index
    assert headers["X-From-Vercel"] == "yes" and headers["X-From-Netlify"] == "yes"


def test_build_settings_from_vercel_json_and_netlify_toml(tmp_path: Path) -> None:
    from worker.hosted_config import build_settings

    write(tmp_path, {
        "vercel.json": json.dumps({"buildCommand": "npm run build:prod", "outputDirectory": "web/out",
                                   "installCommand": 42}),
        "netlify.toml": NETLIFY + '\n[build.environment]\n  NODE_VERSION = "18"\n  CI = false\n'
                        '  VITE_API = "https://api.example"\n  PATH = "/evil"\n  "bad name" = "x"\n'
                        '\n[build.processing]\n  skip_processing = true\n',
    })
    # NETLIFY's [build] publish = "dist" loses to vercel.json's outputDirectory.
    found = build_settings(tmp_path)
    assert found.values == {"build_command": "npm run build:prod", "output_directory": "web/out",
                            "node_version": "18"}
    assert found.sources == {"build_command": "vercel.json buildCommand",
                             "output_directory": "vercel.json outputDirectory",
                             "node_version": "netlify.toml NODE_VERSION"}
    assert found.environment == {"CI": "false", "VITE_API": "https://api.example"}
    notes = "\n".join(found.notes)
    assert "vercel.json installCommand must be a non-empty string" in notes
    assert "PATH is set by DeployHub; ignored" in notes and "'bad name' is not a variable" in notes


def test_a_project_setting_wins_over_what_the_repository_wrote(tmp_path: Path) -> None:
    from worker.detect import Overrides, plan

    write(tmp_path, {"package.json": json.dumps({"scripts": {"build": "vite build"}}),
                     "netlify.toml": '[build]\n  command = "npm run build:site"\n  publish = "site"\n'})
    chosen = plan(tmp_path)
    assert chosen.build == ["sh", "-c", "npm run build:site"] and chosen.output == "site"
    assert "Build command: sh -c npm run build:site (netlify.toml [build] command)" in chosen.notes
    assert chosen.output_source == "netlify.toml [build] publish"
    chosen = plan(tmp_path, Overrides(build_command=("sh", "-c", "make"), output_directory="public"))
    assert chosen.build == ["sh", "-c", "make"] and chosen.output == "public"
    assert "Build command: sh -c make (project setting)" in chosen.notes


async def test_a_repository_moved_from_netlify_builds_with_its_netlify_toml(
    service: Service, git_server: GitServer
) -> None:
    # An unusual output directory and command, as netlify.toml names them.
    package = {"name": "moved", "version": "1.0.0", "scripts": {"build": "node build.js"}}
    toml = ('[build]\n  command = "node build.js && mkdir -p site && cp -r dist/. site/ && echo $GREETING > site/greeting.txt"\n'
            '  publish = "site"\n[build.environment]\n  GREETING = "from netlify.toml"\n')
    url = git_server.add_repo(unique_name("moved"), files_dir=TINY_APP,
                              files={"package.json": json.dumps(package), "netlify.toml": toml})
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"])
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert final["status"] == "ready", (final["reason"], texts[-10:])
    assert "Output: site (netlify.toml [build] publish)" in texts
    assert "Build variables from netlify.toml [build.environment]: GREETING (the project's variables win)" in texts
    status, _, body = await service.site(final["project"], "/greeting.txt")
    assert status == 200 and body == b"from netlify.toml\n"


def test_netlifys_next_runtime_directory_is_not_taken_for_a_static_site(tmp_path: Path) -> None:
    from worker.hosted_config import build_settings

    write(tmp_path, {"netlify.toml": '[build]\n  command = "next build"\n  publish = ".next"\n'})
    found = build_settings(tmp_path)
    assert found.values == {"build_command": "next build"}
    assert any("is .next, Next.js's server build" in n for n in found.notes)


def test_a_file_of_many_bad_rules_is_a_few_lines_of_warnings(tmp_path: Path) -> None:
    rules = [{"source": f"/a{i}/(\\d+)", "destination": "/b"} for i in range(5000)]
    found = read(write(tmp_path, {"vercel.json": json.dumps({"redirects": rules})}))
    assert found.redirects == [] and len(found.notes) == 30
    assert found.notes[-1] == "... and 4971 more warnings like these"


NETLIFY_BASE_APP = TINY_APP.parent / "netlify-base"


def test_netlify_base_is_the_root_directory_and_the_top_file_applies_there(tmp_path: Path) -> None:
    from worker.detect import plan

    shutil.copytree(NETLIFY_BASE_APP, tmp_path / "repo")
    chosen = plan(tmp_path / "repo")
    assert (chosen.root, chosen.root_source, chosen.netlify_at_top) == ("web", "netlify.toml [build] base", True)
    assert chosen.build == ["sh", "-c", "npm run build"] and chosen.env == {"TINY_LINES": "2"}
    # "web/dist", written relative to the repository as older Netlify sites did, is web/'s dist.
    assert chosen.output == "dist"
    assert chosen.output_source == ("netlify.toml [build] publish, relative to the repository "
                                    "as older Netlify sites wrote it")
    assert [r.source for r in read(tmp_path / "repo" / "web", tmp_path / "repo").redirects] == ["/old-about"]


def test_a_netlify_toml_in_the_base_replaces_the_top_one(tmp_path: Path) -> None:
    from worker.detect import plan

    shutil.copytree(NETLIFY_BASE_APP, tmp_path / "repo")
    write(tmp_path / "repo" / "web", {"netlify.toml": '[build]\n  publish = "public"\n'})
    chosen = plan(tmp_path / "repo")
    assert (chosen.root, chosen.netlify_at_top, chosen.output) == ("web", False, "public")
    assert chosen.output_source == "netlify.toml [build] publish"  # relative to the base
    assert chosen.env == {} and chosen.build[:2] != ["sh", "-c"]


def test_a_project_root_directory_wins_over_netlify_base(tmp_path: Path) -> None:
    from worker.detect import BuildError, Overrides, plan

    shutil.copytree(NETLIFY_BASE_APP, tmp_path / "repo")
    chosen = plan(tmp_path / "repo", Overrides(root_directory="server"))
    assert (chosen.root, chosen.root_source, chosen.netlify_at_top) == ("server", "project setting", False)
    for base, error in (("../elsewhere", "netlify.toml [build] base must be a path inside the repository"),
                        ("site", "The root directory site (netlify.toml [build] base) is not a directory")):
        write(tmp_path / "repo", {"netlify.toml": f'[build]\n  base = "{base}"\n'})
        with pytest.raises(BuildError, match=re.escape(error)):
            plan(tmp_path / "repo")
    write(tmp_path / "repo", {"netlify.toml": '[build]\n  base = 7\n'})
    with pytest.raises(BuildError, match="several folders hold an app: server, web"):
        plan(tmp_path / "repo")  # the base ignored (said in the log), as if there were none
    write(tmp_path / "repo", {"netlify.toml": '[build]\n  base = "/"\n'})
    with pytest.raises(BuildError, match="several folders hold an app"):
        plan(tmp_path / "repo")  # "/" is the top: no base


async def test_a_netlify_site_built_from_its_base_folder_is_served(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("netlifybase"), files_dir=NETLIFY_BASE_APP)
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"])
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert final["status"] == "ready", (final["reason"], texts[-10:])
    assert "Root directory: web (netlify.toml [build] base)" in texts
    assert ("Output: web/dist (netlify.toml [build] publish, relative to the repository as older "
            "Netlify sites wrote it)") in texts
    assert "line 2" in texts and "line 3" not in texts  # TINY_LINES from the top file
    status, headers, body = await service.site(final["project"])
    assert status == 200 and b"Hello from tiny" in body
    assert headers["X-Deployed-From"] == "netlify.toml at the top"
    status, headers, _ = await service.site(final["project"], "/old-about")
    assert status == 301 and headers["Location"] == "/about/"
