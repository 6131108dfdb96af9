"""The console's server side: where it is served, its headers, its assets (all in the package, none fetched from
elsewhere), the vendored bundle's checksum, turning it off, and the chart's values for it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import get_args

import httpx
import pytest

from tests.api.conftest import Api
from tests.unit.test_chart import helm
from tests.unit.test_chart_history import API, env_of, settings
from tests.unit.test_chart_redis import containers, docs_for
from zimage_api import console
from zimage_api.local import local_api, serve_in_thread
from zimage_api.schemas import ModelView
from zimage_queue.message import GenerationParams, Task
from zimage_worker.engine import NoopEngine

__all__ = ["helm"]


def test_slash_and_ui_lead_to_the_console_page(api: Api) -> None:
    with httpx.Client(base_url=api.url) as c:
        for path in ("/", "/ui"):
            r = c.get(path)
            assert r.status_code == 307 and r.headers["location"] == "/ui/"
        page = c.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="assets/app.js">' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"


def test_every_asset_is_served_from_the_package_and_names_no_other_host(api: Api) -> None:
    files = sorted(p for p in console.ASSETS.rglob("*") if p.is_file() and p.suffix in {".js", ".css", ".html", ".svg"})
    assert {p.name for p in files} >= {"index.html", "app.js", "api.js", "style.css", "preact-htm.js"}
    with httpx.Client(base_url=api.url) as c:
        for p in files:
            rel = p.relative_to(console.ASSETS).as_posix()
            r = c.get(f"/ui/assets/{rel}")
            assert r.status_code == 200 and r.content == p.read_bytes(), rel
            if p.suffix == ".js":
                assert "javascript" in r.headers["content-type"], rel  # module scripts need a JavaScript type
            # a URL with a host is a request to somewhere else, except XML namespaces (names, never fetched)
            hosts = re.findall(r"(?:https?:)?//([a-z0-9.-]+\.[a-z]{2,})", p.read_text())
            assert set(hosts) <= {"www.w3.org"}, (rel, hosts)
            if p.suffix == ".html":  # no inline script or handler: the CSP would refuse them anyway
                assert "<script>" not in r.text and not re.search(r"\son[a-z]+=", r.text), rel


def test_the_vendored_bundle_is_the_one_recorded() -> None:
    vendor = console.ASSETS / "vendor"
    recorded = re.search(r"sha256: ([0-9a-f]{64})", (vendor / "README.md").read_text())
    assert recorded is not None
    assert hashlib.sha256((vendor / "preact-htm.js").read_bytes()).hexdigest() == recorded.group(1)


def test_the_console_can_be_turned_off(tmp_path: Path) -> None:
    with (
        local_api(engine=NoopEngine(), images_dir=tmp_path, console=False) as la,
        serve_in_thread(la.app) as url,
        httpx.Client(base_url=url) as c,
    ):
        assert c.get("/ui/").status_code == 404
        assert c.get("/ui/assets/app.js").status_code == 404
        assert c.get("/healthz").status_code == 200


def test_the_chart_turns_it_off_and_names_image_origins(
    helm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = containers(docs_for(helm, tmp_path, {}))[API]
    assert settings(api, monkeypatch).console is True
    values = {"api": {"console": {"enabled": False, "imageOrigins": ["https://s3.example.com"]}}}
    api = containers(docs_for(helm, tmp_path, values))[API]
    read = settings(api, monkeypatch)
    assert read.console is False and read.console_image_origins == ["https://s3.example.com"]
    assert "ZIMAGE_API_CONSOLE" in env_of(api)
    assert "https://s3.example.com" in console.content_security_policy(read.console_image_origins)


def test_the_create_form_offers_the_tasks_the_models_list_states() -> None:
    """The form reads a model's tasks and reference images from GET /v1/models under the names that list gives
    them, and offers exactly the contract's tasks (those a model does, by its ``tasks``)."""
    js = (console.ASSETS / "create.js").read_text()
    for name in ("tasks", "max_reference_images", "adapters"):
        assert name in ModelView.model_fields and re.search(rf"\.{name}\b", js), name
    block = re.search(r"export const TASKS = \[(.*?)\n\];", js, re.S)
    assert block is not None
    assert re.findall(r'\["([a-z-]+)", "', block.group(1)) == list(get_args(Task))
    fields = GenerationParams.model_json_schema(by_alias=True)["properties"]
    assert "body.referenceImages" in js and "referenceImages" in fields
