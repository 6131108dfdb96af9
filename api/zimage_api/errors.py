"""One error shape for every endpoint, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.

The OpenAI SDK reads it as is; native clients get the field at fault in ``param``. User errors are 4xx;
a 5xx means a bug or an unavailable dependency, never bad input. Whatever answers (a route's ApiError, request
validation, an unknown path or method, an unexpected exception), the body has this shape, and the OpenAPI
schema says so (``document``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
# For the answers no route chose a code for (an unknown path, a method the path does not take).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error, ...")
    param: str | None = Field(None, description="The field at fault, when one is.")
    code: str | None = Field(None, description="Machine-readable: invalid_value, model_not_found, invalid_json, ...")


class ErrorResponse(BaseModel):
    """Every error, on every route."""

    error: ErrorDetail


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    # ("body", "size") -> "size"; ("query", "limit") -> "limit"; ("header", "authorization") -> "authorization";
    # ("body",) -> "body" (the body as a whole: not an object, or missing)
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or ("body" if list(loc)[:1] == ["body"] else "request")


def invalid_json(errors: list[Any]) -> str | None:
    """The message for a body that is not JSON at all (pydantic's ``json_invalid``: its loc is a byte offset, not
    a field), else None."""
    for err in errors:
        if err.get("type") == "json_invalid":
            loc = list(err.get("loc", ()))
            where = f" at byte {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
            reason = (err.get("ctx") or {}).get("error") or err.get("msg", "JSON decode error")
            return f"body: not valid JSON ({reason}{where})"
    return None


def validation_message(errors: list[Any]) -> tuple[str, str]:
    """(message, param) for pydantic/FastAPI errors: every field at fault, the first one as param."""
    msgs = []
    for err in errors:
        msgs.append(f"{field_path(err.get('loc', ()))}: {err.get('msg', 'invalid')}")
    first = field_path(errors[0].get("loc", ())) if errors else "request"
    return "; ".join(msgs), first


def install(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        not_json = invalid_json(errors)
        if not_json:
            return JSONResponse(error_body(400, not_json, None, "invalid_json"), 400)
        message, param = validation_message(errors)
        return JSONResponse(error_body(400, message, param, "invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(exc.status_code, str(exc.detail), code=_HTTP_CODES.get(exc.status_code))
        return JSONResponse(body, exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the exception after this answer; the client learns nothing of the internals.
        return JSONResponse(error_body(500, "internal error", code="internal_error"), 500)


_STATUS_TEXT = {
    "400": "Invalid request: the field at fault in error.param",
    "401": "Missing or invalid API key",
    "404": "No such job, workflow, image or model",
    "429": "A limit was reached: retry after Retry-After seconds",
}


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """The error answers in the app's OpenAPI schema: FastAPI's generated 422 ``HTTPValidationError`` (never sent:
    a request that fails validation is a 400) goes, every /v1 operation lists 400, 401, 404 and 429, and every
    error answer has the ``ErrorResponse`` body."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}))
    components[ErrorResponse.__name__] = error
    ref = f"#/components/schemas/{ErrorResponse.__name__}"
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/"):
                for status, text in _STATUS_TEXT.items():
                    responses.setdefault(status, {"description": text})
            for status, answer in responses.items():
                if status[:1] in ("4", "5"):
                    answer.setdefault("content", {"application/json": {"schema": {"$ref": ref}}})
    return schema
