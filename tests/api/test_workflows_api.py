"""/v1/workflows in local mode: validation (400s that say what is wrong), tenant isolation, the workflow run
in-process by the operator's planner (``LocalWorkflows``), its SSE stream, cancel, and a store without workflows."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.api.conftest import Api, sse_events
from zimage_api import routes_workflows
from zimage_api.errors import ApiError

MODEL = "z-image-turbo"
GEN = {"width": 64, "height": 64, "steps": 2}


def step(name: str, **kw: Any) -> dict[str, Any]:
    params = {"prompt": f"a {name}", **GEN, **kw.pop("params", {})}
    return {"name": name, "model": MODEL, "params": params, **kw}


def wait_phase(c: httpx.Client, wid: str, phases: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = c.get(f"/v1/workflows/{wid}").json()
        if body["phase"] in phases or time.monotonic() > deadline:
            assert body["phase"] in phases, body
            return body
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"steps": [step("a", dependsOn=["b"]), step("b", params={"prompt": "{{ steps.a.text }}"})]},
            "steps",
            "dependency cycle",
        ),
        ({"steps": [step("a", dependsOn=["nope"])]}, "steps[a]", "refers to no step named 'nope'"),
        ({"steps": [step("a", params={"prompt": "{{ steps.ghost.text }}"})]}, "steps[a]", "'ghost'"),
        ({"steps": [step("a", params={"prompt": "{{ inputs.missing }}"})]}, "steps[a]", "names no input"),
        ({"steps": [step("a", params={"colour": "red"})]}, "steps[a].params.colour", "not an ImageJob field"),
        ({"steps": [step("a", params={"model": "other"})]}, "steps[a].params.model", "set by the workflow"),
        ({"steps": [step("a", retries=99)]}, "steps.0.retries", "less than or equal to 10"),
        ({"steps": [step("A b")]}, "steps.0.name", "pattern"),
        ({"steps": []}, "steps", "at least 1"),
        ({"steps": [step("a")], "colour": "red"}, "colour", "Extra inputs"),
        ({"steps": [step("a"), step("a")]}, "steps", "unique"),
        ({"steps": [step("a")], "name": "Not_A_Name"}, "name", "pattern"),
        ({"steps": [step("a", params={"inputImage": "file:///etc/passwd"})]}, "steps[a].params.inputImage", "yours"),
        ({"steps": [step("a")], "inputs": {"x": "https://elsewhere.example/a.png"}}, "inputs.x", "yours"),
    ],
)
def test_invalid_workflows_are_400_naming_the_field(api: Api, body: dict[str, Any], param: str, words: str) -> None:
    with api.client("a") as c:
        resp = c.post("/v1/workflows", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    expected = "must be one of your objects in this API's image storage" if words == "yours" else words
    assert expected in err["message"], err


def test_unknown_model_is_404(api: Api) -> None:
    with api.client("a") as c:
        resp = c.post("/v1/workflows", json={"steps": [step("a"), {**step("b"), "model": "no-such-model"}]})
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "model_not_found"
    assert resp.json()["error"]["param"] == "steps[b].model"


def test_a_workflow_runs_to_success_with_its_outputs(api: Api) -> None:
    body = {
        "inputs": {"subjects": ["fox", "owl"]},
        "steps": [
            step("bg"),
            step("each", forEach="{{ inputs.subjects }}", params={"prompt": "a {{ item }}"}, dependsOn=["bg"]),
        ],
    }
    with api.client("a") as a, api.client(None) as anon:
        resp = a.post("/v1/workflows", json=body)
        assert resp.status_code == 201, resp.text
        wf = resp.json()
        wid = wf["id"]
        assert wid.startswith("team-a-") and resp.headers["location"] == f"/v1/workflows/{wid}"
        assert wf["object"] == "image.workflow" and wf["phase"] in ("Pending", "Running")
        assert [s["name"] for s in wf["steps"]] == ["bg", "each"]
        assert wf["request"]["ttlSecondsAfterFinished"] > 0 and wf["cancelRequested"] is False
        assert wf["links"] == {
            "self": f"/v1/workflows/{wid}",
            "events": f"/v1/workflows/{wid}/events",
            "cancel": f"/v1/workflows/{wid}/cancel",
        }

        events = sse_events(a, f"/v1/workflows/{wid}/events")
        kinds = [k for k, _ in events]
        assert kinds[-1] == "succeeded" and set(kinds) <= {"pending", "running", "succeeded"}, kinds
        done: Any = events[-1][1]
        assert done == a.get(f"/v1/workflows/{wid}").json()
        assert done["reason"] == "Completed" and done["finishedAt"] and done["startedAt"]
        assert done["progress"]["stepsDone"] == 2 and done["progress"]["jobsDone"] == 3
        bg, each = done["steps"]
        assert (bg["phase"], bg["count"], each["phase"], each["count"]) == ("Succeeded", 1, "Succeeded", 2)
        for inst in [*bg["instances"], *each["instances"]]:
            assert inst["phase"] == "Succeeded" and len(inst["images"]) == 1 and len(inst["imageUrls"]) == 1
            # The step job is an ImageJob of the tenant's, and the signed link works without the key.
            assert a.get(f"/v1/jobs/{inst['job']}").json()["phase"] == "Succeeded"
            img = anon.get(inst["imageUrls"][0])
            assert img.status_code == 200 and img.content[:4] == b"\x89PNG"
        # Listed for its tenant, with a phase filter.
        listed = [w["id"] for w in a.get("/v1/workflows", params={"phase": "Succeeded", "limit": 500}).json()["data"]]
        assert wid in listed


def test_tenants_see_only_their_workflows(api: Api) -> None:
    with api.client("a") as a, api.client("b") as b:
        wid = a.post("/v1/workflows", json={"steps": [step("only")], "name": "private"}).json()["id"]
        assert wid == "team-a-private"
        for method, path in [
            ("GET", f"/v1/workflows/{wid}"),
            ("POST", f"/v1/workflows/{wid}/cancel"),
            ("GET", f"/v1/workflows/{wid}/events"),
        ]:
            resp = b.request(method, path)
            assert resp.status_code == 404, resp.text
            assert resp.json()["error"]["code"] == "workflow_not_found"
        assert wid not in [w["id"] for w in b.get("/v1/workflows", params={"limit": 500}).json()["data"]]
        assert wid in [w["id"] for w in a.get("/v1/workflows", params={"limit": 500}).json()["data"]]
        # b's workflow of the same name is b's own.
        resp = b.post("/v1/workflows", json={"steps": [step("only")], "name": "private"})
        assert resp.status_code == 201 and resp.json()["id"] == "team-b-private"
        wait_phase(a, wid, {"Succeeded"})


def test_same_name_or_key_returns_the_workflow(api: Api) -> None:
    body = {"steps": [step("once")], "name": "again"}
    with api.client("a") as a:
        first = a.post("/v1/workflows", json=body)
        assert first.status_code == 201, first.text
        second = a.post("/v1/workflows", json=body)
        assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
        other = a.post("/v1/workflows", json={**body, "steps": [step("different")]})
        assert other.status_code == 409 and other.json()["error"]["code"] == "workflow_exists"

        key = {"Idempotency-Key": f"wf-{time.time_ns()}"}
        one = a.post("/v1/workflows", json={"steps": [step("k")]}, headers=key)
        two = a.post("/v1/workflows", json={"steps": [step("k")]}, headers=key)
        assert (one.status_code, two.status_code) == (201, 200) and one.json()["id"] == two.json()["id"]
        reused = a.post("/v1/workflows", json={"steps": [step("k2")]}, headers=key)
        assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
        for wid in (first.json()["id"], one.json()["id"]):
            wait_phase(a, wid, {"Succeeded"})


def test_cancel_sets_spec_cancel_and_stops_the_workflow(api: Api) -> None:
    api.engine.gate.clear()  # the first step's job holds in the worker
    try:
        with api.client("a") as a:
            body = {"steps": [step("first"), step("second", dependsOn=["first"])]}
            wid = a.post("/v1/workflows", json=body).json()["id"]
            assert api.engine.waiting.wait(30)
            running = wait_phase(a, wid, {"Running"})
            assert running["steps"][0]["instances"][0]["phase"] == "Running"
            resp = a.post(f"/v1/workflows/{wid}/cancel")
            assert resp.status_code == 200, resp.text
            assert resp.json()["cancelRequested"] is True and resp.json()["request"]["cancel"] is True
            events = sse_events(a, f"/v1/workflows/{wid}/events")
            assert events[-1][0] == "cancelled", events
            final: Any = events[-1][1]
            assert final["reason"] == "Cancelled"
            assert [s["phase"] for s in final["steps"]] == ["Cancelled", "Skipped"]
            job = final["steps"][0]["instances"][0]["job"]
            assert a.get(f"/v1/jobs/{job}").json()["phase"] == "Cancelled"
            # Cancelling a finished workflow changes nothing.
            again = a.post(f"/v1/workflows/{wid}/cancel")
            assert again.status_code == 200 and again.json()["phase"] == "Cancelled"
    finally:
        api.engine.gate.set()


def test_missing_workflow_is_404_and_bad_id_is_400(api: Api) -> None:
    with api.client("a") as a:
        assert a.get("/v1/workflows/team-a-nothing-here").status_code == 404
        assert a.get("/v1/workflows/Not_An_Id").status_code == 400
    with api.client(None) as anon:
        assert anon.get("/v1/workflows").status_code == 401


def test_a_store_without_workflows_answers_501() -> None:
    app = SimpleNamespace(service=SimpleNamespace(store=object()))
    with pytest.raises(ApiError) as err:
        routes_workflows.workflow_store(app)  # type: ignore[arg-type]
    assert err.value.status == 501 and "`zimage workflow run`" in err.value.message
