"""The web console: a small browser app served by the API itself, at ``/ui/`` (``/`` redirects there).

Its assets ship in this package (``console/``: HTML, CSS, ES modules, and htm's Preact bundle vendored in
``console/vendor``), so it works air-gapped and needs no build step. It is a client of the public API and
nothing else: it signs in with an API key kept in the tab's session storage and sends it as a bearer token on
each call, with that key's tenant, limits and role; there is no private route behind it.

Every page carries a content security policy that allows scripts, styles and fetches from this origin only
(no inline script, no ``eval``); images also from ``ZIMAGE_API_CONSOLE_IMAGE_ORIGINS``, where an object store's
presigned links point. ``ZIMAGE_API_CONSOLE=false`` (chart: ``api.console.enabled``) turns it off.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

PATH = "/ui"
ASSETS = Path(str(files("zimage_api") / "console"))


def content_security_policy(image_origins: list[str]) -> str:
    images = " ".join(["'self'", "blob:", "data:", *image_origins])
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {images}",
            "connect-src 'self'",
            "font-src 'self'",
            "manifest-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def install(app: FastAPI, image_origins: list[str]) -> None:
    policy = content_security_policy(image_origins)
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
    }

    @app.middleware("http")
    async def secure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if request.url.path == PATH or request.url.path.startswith(PATH + "/"):
            response.headers.update(headers)
            # The page is tiny and changes with each release; the modules it loads revalidate (ETag).
            response.headers.setdefault("Cache-Control", "no-cache")
        return response

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/", status_code=307)

    @app.get(PATH, include_in_schema=False)
    async def bare() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/", status_code=307)

    @app.get(f"{PATH}/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(ASSETS / "index.html", media_type="text/html; charset=utf-8")

    app.mount(f"{PATH}/assets", StaticFiles(directory=ASSETS), name="console")
