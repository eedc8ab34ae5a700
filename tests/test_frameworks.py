"""Frameworks and their output, end to end: a site without a build, a Next-style static export, a custom output
directory, a Vite app with a sub-path base and a VITE_ variable, a CRA app with a sub-path
homepage and a REACT_APP_ variable, React Router's SPA mode (and its server mode, refused)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.caches import session_caches, shared_caches  # noqa: F401  (fixtures)
from tests.support.infra import FIXTURES_DIR, TINY_APP, GitServer, unique_name
from tests.support.service import Service

pytestmark = [pytest.mark.usefixtures("shared_caches"), pytest.mark.timeout(240)]


async def deploy(service: Service, git_server: GitServer, variables: dict[str, str] | None = None,
                 timeout: float = 200, **repo: Any) -> tuple[dict[str, Any], list[str]]:
    name = unique_name("fw")
    if variables:
        body = {"variables": {k: {"value": v} for k, v in variables.items()}}
        async with service.http.patch(f"{service.url}/api/projects/{name}/variables", json=body) as r:
            assert r.status == 200
    dep = await service.deploy(git_server.add_repo(name, **repo), project=name)
    final = await service.wait_final(dep["id"], timeout=timeout)
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert final["status"] == "ready", (final["reason"], texts[-15:])
    return final, texts


async def test_a_site_without_a_build_is_published_without_its_hidden_files(
    service: Service, git_server: GitServer
) -> None:
    private = {".env": "API_SECRET=do-not-publish\n", ".github/workflows/ci.yml": "on: push\n",
               "node_modules/left-pad/index.js": "module.exports = 'left-pad';\n"}
    final, texts = await deploy(service, git_server, files_dir=FIXTURES_DIR / "static-site",
                                files=private)
    assert any(t.startswith("Static site: there is no package.json, so nothing is installed") for t in texts)
    assert "Output: the repository root (a static site, published as it is)" in texts
    assert not any(t.startswith("$ ") for t in texts if "git clone" not in t)  # nothing ran
    left_out = next(t for t in texts if t.startswith("Not published (hidden, or node_modules): "))
    for name in (".env", ".git", ".github", "node_modules"):
        assert name in left_out
    project = final["project"]
    for path, expected in (("/", b"Hello from a static site"), ("/about/", b"About this static site"),
                           ("/css/site.css", b"font-family"), ("/.well-known/security.txt", b"Contact:")):
        status, _, body = await service.site(project, path)
        assert status == 200 and expected in body, (path, status, body[:200])
    for path, secret in (("/.env", b"do-not-publish"), ("/.git/config", b"[core]"), ("/.git/HEAD", b"ref:"),
                         ("/.github/workflows/ci.yml", b"on: push"),
                         ("/node_modules/left-pad/index.js", b"module.exports")):
        status, _, body = await service.site(project, path)
        assert secret not in body, (path, status)


async def test_next_static_export_publishes_out(service: Service, git_server: GitServer) -> None:
    final, texts = await deploy(service, git_server, files_dir=FIXTURES_DIR / "next-export")
    assert "Framework: Next.js (from package.json dependencies); its output directory is out" in texts
    assert "Output: out (Next.js's output directory)" in texts
    status, _, body = await service.site(final["project"])
    assert status == 200 and b"Hello from next export" in body


async def test_any_directory_with_a_built_index_html_is_the_output(service: Service, git_server: GitServer) -> None:
    package = json.loads((TINY_APP / "package.json").read_text())
    package["scripts"]["build"] = "node build.js && mv dist public_html"
    files = {"package.json": json.dumps(package), "public/index.html": "committed, not built"}
    final, texts = await deploy(service, git_server, files_dir=TINY_APP, files=files)
    assert "Output: public_html (holds the index.html the build wrote)" in texts
    status, _, body = await service.site(final["project"])
    assert status == 200 and b"Hello from tiny" in body


async def test_vite_base_sub_path_served_at_root_with_vite_variable(service: Service, git_server: GitServer) -> None:
    final, texts = await deploy(service, git_server, {"VITE_GREETING": "hello-from-a-variable"},
                                files_dir=FIXTURES_DIR / "vite-env")
    assert any("sets base '/vite-env/'" in t and "--base=/" in t for t in texts)
    assert "$ npm run build -- --base=/" in texts
    status, _, html = await service.site(final["project"])
    script = re.search(rb'src="(/assets/[^"]+\.js)"', html)
    assert status == 200 and script, html
    status, _, bundle = await service.site(final["project"], script.group(1).decode())
    assert status == 200 and b"hello-from-a-variable" in bundle


async def test_vite_built_for_a_sub_path_by_its_own_script_is_served_there(
    service: Service, git_server: GitServer
) -> None:
    package = json.loads((FIXTURES_DIR / "vite-env" / "package.json").read_text())
    package["scripts"]["build"] = "vite build && node -e \"console.log('post-build step')\""
    final, texts = await deploy(service, git_server, {"VITE_GREETING": "hello-under-a-sub-path"},
                                files_dir=FIXTURES_DIR / "vite-env", files={"package.json": json.dumps(package)})
    assert any("sets base '/vite-env/', a sub-path, and the build script is not a plain" in t for t in texts)
    assert any(t.startswith("Deployed ") and t.endswith(".localhost:" + str(service.server.port) + "/vite-env/")
               for t in texts), texts[-5:]
    project = final["project"]
    status, headers, _ = await service.site(project)
    assert status == 302 and headers["Location"] == "/vite-env/"
    status, _, html = await service.site(project, "/vite-env/")
    script = re.search(rb'src="(/vite-env/assets/[^"]+\.js)"', html)
    assert status == 200 and script, html
    status, _, bundle = await service.site(project, script.group(1).decode())
    assert status == 200 and b"hello-under-a-sub-path" in bundle
    assert (await service.site(project, "/vite-env/some/client/route"))[2] == html


async def test_cra_homepage_sub_path_gets_public_url_root_and_react_app_variable(
    service: Service, git_server: GitServer
) -> None:
    final, texts = await deploy(service, git_server, {"REACT_APP_API": "https://api.example"},
                                files_dir=FIXTURES_DIR / "cra-homepage")
    assert any("a sub-path" in t and "PUBLIC_URL=/" in t for t in texts)
    assert "Creating an optimized production build... (CI=1; warnings are errors)" in texts
    status, _, html = await service.site(final["project"])
    assert status == 200 and b'src="/static/js/main.5e6f7a8b.js"' in html
    status, _, bundle = await service.site(final["project"], "/static/js/main.5e6f7a8b.js")
    assert status == 200 and b"https://api.example" in bundle


async def test_react_router_spa_mode_publishes_build_client(service: Service, git_server: GitServer) -> None:
    final, texts = await deploy(service, git_server, files_dir=FIXTURES_DIR / "react-router-spa")
    assert ("Framework: React Router (from package.json dependencies); its output directory is "
            "build/client") in texts
    assert "Output: build/client (React Router's output directory)" in texts
    for path in ("/", "/about"):  # a client-side route gets the app's index.html
        status, _, body = await service.site(final["project"], path)
        assert status == 200 and b"React Router SPA fixture" in body, (path, status, body[:200])
    script = re.search(rb'import\("(/assets/entry\.client-[\w-]+\.js)"\)', body)
    assert script, body[:400]
    assert (await service.site(final["project"], script.group(1).decode()))[0] == 200


async def test_react_router_rendering_on_a_server_fails_saying_how_to_build_a_static_site(
    service: Service, git_server: GitServer
) -> None:
    name = unique_name("fw")
    url = git_server.add_repo(name, files_dir=FIXTURES_DIR / "react-router-spa",
                              files={"react-router.config.js": "export default { ssr: true };\n"})
    final = await service.wait_final((await service.deploy(url, project=name))["id"], timeout=200)
    assert final["status"] == "failed"
    assert final["reason"].startswith("The build finished but React Router wrote no "
                                      "build/client/index.html: "), final["reason"]
    assert "set `ssr: false` in react-router.config" in final["reason"]
    # Its server build (build/server) is not published in the site's place either.
    assert (await service.site(name))[0] == 404


def test_ci_is_set_as_hosted_platforms_set_it_unless_the_project_says_otherwise(tmp_path: Path) -> None:
    from redis.asyncio import Redis

    from deployhub.status import Status
    from deployhub.store import Deployment
    from tests.support.service import make_settings
    from worker.build import Build

    dep = Deployment(id="d1", project="p", repo_url="http://127.0.0.1/x", branch="", status=Status.QUEUED,
                     reason="", created_at=0, updated_at=0, timestamps={})
    build = Build(make_settings(tmp_path, None), Redis(), None, dep)  # type: ignore[arg-type]
    assert build._build_env()["CI"] == "1"
    build.variables = {"CI": "false", "VITE_X": "1"}
    assert build._build_env()["CI"] == "false" and build._build_env()["VITE_X"] == "1"
