"""The web console in a real browser: Debian's Chromium driven by Playwright, against the embedded stack.

The stack is what ``zimage serve`` runs (``local_api``: real Redis, a real worker loop, the tiny random-weight
pipeline), in this process so a test can pace the engine (a job slow enough to watch, or to cancel). The page
may talk to that API and nothing else: every request to another origin is aborted and recorded, and the tests
assert none was made. Each step saves a screenshot into ``ZIMAGE_TEST_OUTPUT`` (default ``out/console``); with
``ZIMAGE_TEST_OUTPUT=docs/console`` the same run makes the screenshots docs/console.md shows.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from zimage_api.apikeys import entry_json, new_key
from zimage_api.local import DEV_KEY, LocalApi, local_api, serve_in_thread
from zimage_queue import GenerationParams
from zimage_worker.engine import Engine, load_engine

REPO = Path(__file__).resolve().parents[2]
OUTPUT = Path(os.environ.get("ZIMAGE_TEST_OUTPUT") or REPO / "out" / "console")
VIEWPORT = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def chromium() -> str | None:
    """Debian's ``chromium`` (CI apt-installs it); Playwright downloads no browser of its own here."""
    return os.environ.get("ZIMAGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class PacedEngine:
    """An engine whose steps take at least ``delay`` seconds while it is set: a job slow enough to watch."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.variant = inner.variant
        self.delay = 0.0

    def generate(self, params: GenerationParams, **kw: Callable[..., Any]) -> list[Image.Image]:
        on_step = kw["on_step"]

        def paced(step: int, total: int) -> None:
            on_step(step, total)
            if self.delay:
                time.sleep(self.delay)

        return self.inner.generate(params, **{**kw, "on_step": paced})  # type: ignore[arg-type]


@dataclass
class Stack:
    url: str
    local: LocalApi
    engine: PacedEngine
    images: Path
    keys: dict[str, str]  # dev (admin, tenant dev) and other (tenant team-other)


@contextmanager
def console_stack(tmp: Path, variant: str = "turbo") -> Iterator[Stack]:
    keys_dir = tmp / "keys"
    keys_dir.mkdir(parents=True)
    other = new_key("other")
    (keys_dir / "other").write_text(entry_json(other, "team-other"))
    engine = PacedEngine(load_engine("tiny-random", variant=variant))
    images = tmp / "images"
    with (
        local_api(engine=engine, variant=variant, images_dir=images, keys_dir=str(keys_dir), dev_admin=True) as la,
        serve_in_thread(la.app) as url,
    ):
        yield Stack(url, la, engine, images, {"dev": DEV_KEY, "other": other})


@dataclass
class Browser:
    """One page of one browser context, with what it asked for and what went wrong on it."""

    page: Any
    origin: str
    requested: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # console errors (CSP violations among them), page errors

    def shot(self, name: str, full_page: bool = True) -> Path:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        path = OUTPUT / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def sign_in(self, key: str) -> None:
        self.page.goto(self.origin + "/")
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()

    def route(self, path: str) -> None:
        self.page.evaluate("p => { location.hash = p }", path)


@contextmanager
def browser(origin: str, viewport: dict[str, int] = VIEWPORT, color_scheme: str = "light") -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            context = b.new_context(viewport=viewport, color_scheme=color_scheme)  # type: ignore[arg-type]
            context.set_default_timeout(30_000)
            page = context.new_page()
            seen = Browser(page, origin)
            here = urlsplit(origin).netloc

            def guard(route: Any) -> None:
                url = route.request.url
                seen.requested.append(url)
                if urlsplit(url).scheme in ("http", "https", "ws", "wss") and urlsplit(url).netloc != here:
                    seen.blocked.append(url)
                    route.abort()
                else:
                    route.continue_()

            context.route("**/*", guard)
            # An HTTP error the console shows is logged as "Failed to load resource": not a problem of the page.
            page.on(
                "console",
                lambda m: (
                    m.type == "error"
                    and not m.text.startswith("Failed to load resource")
                    and seen.problems.append(f"console: {m.text}")
                ),
            )
            page.on("pageerror", lambda e: seen.problems.append(f"page error: {e}"))
            yield seen
        finally:
            b.close()
