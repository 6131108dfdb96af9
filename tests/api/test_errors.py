"""One error shape on every route, and errors that say what is wrong: a body that is not JSON, a size out of range,
an unknown path or method, an unexpected exception; event streams named by the job's real phase."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conftest import wait_for
from tests.api.conftest import Api, sse_events
from zimage_api import errors
from zimage_api.openapi import schema

pytestmark = pytest.mark.timeout(120)
SMALL = {"width": 64, "height": 64}


def error_of(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/images/generations"])
@pytest.mark.parametrize("body", [b'{"prompt": "x",,}', b'{"prompt": "x"', b"prompt=x", b"\xff\xfe"])
def test_a_body_that_is_not_json_says_so(api: Api, path: str, body: bytes) -> None:
    r = api.client("a").post(path, content=body, headers={"Content-Type": "application/json"})
    error = error_of(r, 400)
    assert error["code"] == "invalid_json" and error["param"] is None, error  # not a byte offset posing as a field
    assert "not valid JSON" in str(error["message"]) and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": "x", "width": 99999, "height": 64}, "width", "less than or equal to 2048"),
        ({"prompt": "x", "width": 64, "height": 99999}, "height", "less than or equal to 2048"),
        ({"prompt": "x", "width": 48, "height": 64}, "width", "greater than or equal to 64"),
        ({"prompt": "x", "width": 100, "height": 64}, "width", "multiple of 16"),  # in range: then the multiple
    ],
)
def test_size_range_comes_before_the_multiple(api: Api, body: dict[str, object], param: str, says: str) -> None:
    error = error_of(api.client("a").post("/v1/jobs", json=body), 400)
    assert error["param"] == param and says in str(error["message"]), error
    # The OpenAI route's size goes through the same models.
    w, h = body["width"], body["height"]
    error = error_of(api.client("a").post("/v1/images/generations", json={"prompt": "x", "size": f"{w}x{h}"}), 400)
    assert error["param"] == param and says in str(error["message"]), error


def test_every_route_answers_in_the_one_shape(api: Api) -> None:
    client = api.client("a")
    assert error_of(client.get("/v1/no-such-route"), 404)["code"] == "not_found"
    assert error_of(client.put("/v1/models"), 405)["code"] == "method_not_allowed"
    assert error_of(client.get("/v1/jobs/no-such-job"), 404)["code"] == "job_not_found"
    assert error_of(client.get("/v1/jobs", params={"limit": 0}), 400)["param"] == "limit"
    assert error_of(client.post("/v1/jobs", json=[1, 2]), 400)["param"] == "body"
    assert error_of(api.client(None).get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert error_of(client.post("/v1/images/edits", data={"prompt": "x"}), 400)["param"] == "image"
    assert error_of(client.post("/v1/images/generations", json={"prompt": "x", "n": 9}), 400)["param"] == "n"


def test_an_unexpected_exception_is_a_500_in_the_shape() -> None:
    app = FastAPI()
    errors.install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("internal detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        error = error_of(client.get("/boom"), 500)
    assert error["code"] == "internal_error" and "internal detail" not in str(error["message"])


def test_the_schema_documents_the_error_shape() -> None:
    s = schema()
    assert "HTTPValidationError" not in s["components"]["schemas"]
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, item in s["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (method, path)  # validation errors are 400s
            if path.startswith("/v1/"):
                for status in ("400", "401", "404", "429"):
                    assert op["responses"][status]["content"]["application/json"]["schema"] == ref, (method, path)


def test_a_late_stream_names_its_first_event_by_the_jobs_phase(api: Api) -> None:
    client = api.client("a")
    api.engine.gate.clear()  # the job is held inside the worker: Running when the stream opens
    events: list[tuple[str, dict[str, object]]] = []
    try:
        jid = client.post("/v1/jobs", json={"prompt": "late", **SMALL, "steps": 3}).json()["id"]
        assert api.engine.waiting.wait(30)
        wait_for(lambda: client.get(f"/v1/jobs/{jid}").json()["phase"] == "Running", what="the job running")
        kind = ""
        with client.stream("GET", f"/v1/jobs/{jid}/events") as resp:
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line.removeprefix("data: "))))
                    api.engine.gate.set()  # the first event is in: let the job go on
    finally:
        api.engine.gate.set()
    kinds = [k for k, _ in events]
    assert kinds[0] == "started" and events[0][1]["phase"] == "Running", events[0]
    assert "queued" not in kinds and kinds[-1] == "succeeded", kinds
    assert kinds.count("progress") == 3
    # A finished job's stream is one event, named by how it ended.
    (only,) = sse_events(client, f"/v1/jobs/{jid}/events")
    assert only[0] == "succeeded" and only[1]["phase"] == "Succeeded"
