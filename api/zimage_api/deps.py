"""What every route needs, as FastAPI dependencies: the wired-up app parts and the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from zimage_api.apikeys import KeyRing, Principal
from zimage_api.errors import ApiError
from zimage_api.history import History, disabled
from zimage_api.images import ImageAccess
from zimage_api.service import JobService
from zimage_api.settings import ApiSettings
from zimage_api.signing import UrlSigner


@dataclass
class Parts:
    settings: ApiSettings
    service: JobService
    keys: KeyRing
    signer: UrlSigner
    images: ImageAccess
    history: History | None = None  # ZIMAGE_API_HISTORY_URL: usage, finished jobs past their TTL


def parts(request: Request) -> Parts:
    p: Parts = request.app.state.parts
    return p


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key> (what the OpenAI SDK sends)")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Or the key in X-API-Key")


def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> str | None:
    return bearer.credentials if bearer else header


async def principal(
    key: Annotated[str | None, Depends(presented_key)], app: Annotated[Parts, Depends(parts)]
) -> Principal:
    """The caller, authenticated and within its rate limit."""
    found = app.keys.authenticate(key) if key else None
    if found is None:
        raise ApiError(
            401,
            "missing or invalid API key (Authorization: Bearer <key>)" if key is None else "invalid API key",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    await app.service.check_rate(found)
    return found


def history(app: Annotated[Parts, Depends(parts)]) -> History:
    """The history store; 404 ``history_disabled`` when the API has none."""
    if app.history is None:
        raise disabled()
    return app.history


def base_url(request: Request, app: Annotated[Parts, Depends(parts)]) -> str:
    return (app.settings.public_url or str(request.base_url)).rstrip("/")


Caller = Annotated[Principal, Depends(principal)]
App = Annotated[Parts, Depends(parts)]
BaseUrl = Annotated[str, Depends(base_url)]
HistoryStore = Annotated[History, Depends(history)]


def admin(caller: Caller) -> Principal:
    """The caller, when its key is an admin key; 403 ``admin_only`` otherwise."""
    if not caller.admin:
        raise ApiError(403, "admin keys only (zimage keys create --admin)", code="admin_only")
    return caller


AdminCaller = Annotated[Principal, Depends(admin)]
