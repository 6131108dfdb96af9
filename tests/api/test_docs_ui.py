"""/docs (Swagger UI) and /redoc are served whole by the API itself: every asset the pages load comes from the
same origin, answers 200 with its content type, and no page names another host (no CDN, no web fonts)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.api.conftest import Api

CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


class Assets(HTMLParser):
    """What a page loads: script src, link href (stylesheet, favicon), img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        url = a.get("src") if tag in ("script", "img") else a.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


@pytest.mark.parametrize(("page", "spec_url"), [("/docs", r"url: '([^']+)'"), ("/redoc", r'spec-url="([^"]+)"')])
def test_docs_pages_load_only_from_the_api(api: Api, page: str, spec_url: str) -> None:
    r = httpx.get(api.url + page)  # no key: the docs are public, as /openapi.json is
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text
    html = r.text
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html), "the page names another host"
    parser = Assets()
    parser.feed(html)
    spec = re.search(spec_url, html)
    assert spec, html
    urls = [*parser.urls, spec.group(1)]
    kinds = {urlsplit(u).path.rsplit(".", 1)[-1] for u in parser.urls}
    assert {"js", "png"} <= kinds  # the UI's bundle and the favicon at least
    if page == "/docs":
        assert "css" in kinds
    origin = urlsplit(api.url)
    for url in urls:
        full = urljoin(api.url + page, url)
        assert urlsplit(full).netloc == origin.netloc, url
        asset = httpx.get(full)
        assert asset.status_code == 200, (url, asset.status_code)
        suffix = "." + urlsplit(full).path.rsplit(".", 1)[-1]
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 100, url


def test_the_oauth2_redirect_page_is_served_too(api: Api) -> None:
    r = httpx.get(f"{api.url}/docs/oauth2-redirect")
    assert r.status_code == 200 and "<html" in r.text.lower()
    assert not re.search(r"https?://", r.text)
