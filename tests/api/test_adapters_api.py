"""LoRA adapters through the REST API on the embedded stack (what ``zimage serve --adapter`` runs): a job with
two adapters succeeds and reports them with the default scale resolved, the OpenAI route takes ``loras`` too,
/v1/models lists them, and an unknown adapter or too many are a 400 naming the field, before anything is queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import wait_for
from zimage_api.local import DEV_KEY, local_api, serve_in_thread
from zimage_queue.message import AdapterSpec

pytest.importorskip("peft")

from zimage_worker.tiny import build_tiny_lora


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("adapters")
    specs = [
        AdapterSpec(name="ink", source=str(root / "ink")),
        AdapterSpec(name="felt", source=str(root / "felt"), default_scale=0.5),
        AdapterSpec(name="neon", source=str(root / "neon")),
        AdapterSpec(name="moss", source=str(root / "moss")),
    ]
    for seed, s in enumerate(specs):
        build_tiny_lora(s.source, seed=seed)
    with (
        # polling for results is not what these tests limit: a slow machine polls more often than the burst allows
        local_api(images_dir=root / "images", adapters=specs, rate_per_second=1000, rate_burst=1000) as la,
        serve_in_thread(la.app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=120) as c,
    ):
        yield c


def finished(c: httpx.Client, job: str) -> dict[str, object] | None:
    body: dict[str, object] = c.get(f"/v1/jobs/{job}").json()
    return body if body["phase"] in ("Succeeded", "Failed", "Cancelled") else None


def test_a_job_with_two_adapters_succeeds_and_reports_them(client: httpx.Client) -> None:
    small = {"prompt": "a red fox", "width": 64, "height": 64, "seed": 3}
    r = client.post("/v1/jobs", json={**small, "loras": [{"name": "ink", "scale": 0.8}, {"name": "felt"}]})
    assert r.status_code == 202, r.text
    plain = client.post("/v1/jobs", json=small).json()["id"]
    done = wait_for(lambda: finished(client, r.json()["id"]), timeout=120, what="the adapter job")
    assert done["phase"] == "Succeeded", done
    assert done["adapters"] == [{"name": "ink", "scale": 0.8}, {"name": "felt", "scale": 0.5}]
    base = wait_for(lambda: finished(client, plain), timeout=120, what="the plain job")
    assert base["phase"] == "Succeeded" and base["adapters"] is None
    assert done["images"][0]["sha256"] != base["images"][0]["sha256"]  # type: ignore[index]


def test_openai_generations_take_loras(client: httpx.Client) -> None:
    r = client.post(
        "/v1/images/generations",
        json={"prompt": "a boat", "size": "64x64", "loras": [{"name": "neon", "scale": 1.5}], "response_format": "url"},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


def test_models_list_the_adapters(client: httpx.Client) -> None:
    [model] = [m for m in client.get("/v1/models").json()["data"] if not m.get("alias_of")]
    assert model["adapters"] == ["ink", "felt", "neon", "moss"]


@pytest.mark.parametrize(
    ("loras", "code", "words"),
    [
        ([{"name": "sepia"}], "unknown_adapter", "no adapter 'sepia'"),
        ([{"name": n} for n in ("ink", "felt", "neon", "moss")], "too_many_adapters", "allows 3 per job"),
        ([{"name": "ink"}, {"name": "ink"}], "invalid_value", "each adapter at most once"),
        ([{"name": "ink", "scale": 99}], "invalid_value", "less than or equal to 8"),
    ],
)
def test_bad_loras_are_a_400_naming_the_field(
    client: httpx.Client, loras: list[dict[str, object]], code: str, words: str
) -> None:
    before = len(client.get("/v1/jobs").json()["data"])
    r = client.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "loras": loras})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"] and error["param"].startswith("loras")
    assert len(client.get("/v1/jobs").json()["data"]) == before  # nothing created or queued


def test_zimage_serve_takes_adapters(tmp_path: Path) -> None:
    from zimage_api.cli import adapter_arg

    assert adapter_arg("ink=loras/ink") == AdapterSpec(name="ink", source="loras/ink")
    with pytest.raises(SystemExit, match="NAME=SOURCE"):
        adapter_arg("ink")
