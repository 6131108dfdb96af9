"""The `zimage` CLI as users run it (the installed entry point, a subprocess): `generate` locally and against the
API, with an input image, a mask and a strength; `jobs list|get|watch|cancel`; and the API's refusals as one line
and exit status 2."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import BIN
from tests.api.conftest import Api, png

pytestmark = pytest.mark.timeout(180)


def zimage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "zimage"), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def as_tenant(api: Api, name: str = "a") -> dict[str, str]:
    return {"ZIMAGE_API_URL": api.url, "ZIMAGE_API_KEY": api.keys[name]}


def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A 96x64 image, and an OpenAI-style mask: transparent where to repaint (the left half)."""
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    image.write_bytes(png(96, 64))
    m = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (0, 0, 48, 64))
    m.save(mask)
    return image, mask


def one_error(out: subprocess.CompletedProcess[str], message: str) -> None:
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr  # one line, no traceback
    assert out.stderr.startswith("zimage: error: ") and message in out.stderr, out.stderr


def test_generate_against_the_api(api: Api, tmp_path: Path) -> None:
    out = zimage(
        "generate", "a red fox", "--api", api.url, "-o", str(tmp_path / "fox.png"), "--width", "96", "--height", "64",
        "-n", "2", "--seed", "7", env={"ZIMAGE_API_KEY": api.keys["a"]},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    paths = [Path(p) for p in out.stdout.split()]
    assert paths == [tmp_path / "fox-0.png", tmp_path / "fox-1.png"]
    for p in paths:
        assert Image.open(p).size == (96, 64)
    assert "16/16" in out.stderr  # the progress bar was fed by the event stream
    assert "seed 7" in out.stderr


def find_job(api: Api, prompt: str) -> dict[str, Any]:
    jobs = api.client("a").get("/v1/jobs", params={"limit": 500}).raise_for_status().json()["data"]
    [job] = [j for j in jobs if j["request"]["prompt"] == prompt]
    return job  # type: ignore[no-any-return]


@pytest.mark.parametrize("masked", [False, True], ids=["image-to-image", "inpaint"])
def test_generate_from_an_image_against_the_api(api: Api, tmp_path: Path, masked: bool) -> None:
    image, mask = inputs(tmp_path)
    prompt = f"in snow {uuid.uuid4().hex[:8]}"
    args = ["--image", str(image), "--strength", "0.5", "--seed", "3", "-o", str(tmp_path / "out.png")]
    out = zimage("generate", prompt, *args, *(["--mask", str(mask)] if masked else []), env=as_tenant(api))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "out.png")]
    assert Image.open(tmp_path / "out.png").size == (96, 64)  # the input's size
    request = find_job(api, prompt)["request"]
    assert request["task"] == ("inpaint" if masked else "image-to-image")
    assert request["strength"] == 0.5 and request["seed"] == 3 and request["inputImage"]
    assert bool(request.get("maskImage")) is masked


@pytest.mark.parametrize("masked", [False, True], ids=["image-to-image", "inpaint"])
def test_generate_from_an_image_locally(tmp_path: Path, masked: bool) -> None:
    image, mask = inputs(tmp_path)
    images = tmp_path / "images"
    out = zimage(
        "generate", "in snow", "--image", str(image), *(["--mask", str(mask)] if masked else []), "--strength", "0.5",
        "--width", "64", "--height", "64", "--steps", "2", "-o", str(tmp_path / "out.png"), "--images-dir", str(images),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    assert ("inpaint" if masked else "image-to-image") in out.stderr
    assert "1/1" in out.stderr  # strength 0.5 of 2 steps: the progress bar counted the one step that ran
    [upload] = (images / "tenants" / "local" / "uploads").iterdir()  # where the worker's read_uri takes inputs
    assert sorted(p.name for p in upload.iterdir()) == (["image.png", "mask.png"] if masked else ["image.png"])
    if masked:  # the OpenAI-style transparent part became the white to repaint
        assert Image.open(upload / "mask.png").convert("L").getpixel((10, 10)) == 255


def test_generate_an_omni_edit_with_a_reference_locally(tmp_path: Path) -> None:
    image, reference = tmp_path / "in.png", tmp_path / "ref.png"
    image.write_bytes(png(96, 64))
    reference.write_bytes(png(64, 64, color=(0, 0, 255)))
    images = tmp_path / "images"
    out = zimage(
        "generate", "the two as one", "--variant", "omni", "--image", str(image), "--reference", str(reference),
        "--width", "64", "--height", "64", "--steps", "2", "-o", str(tmp_path / "out.png"), "--images-dir", str(images),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    assert "(omni), edit" in out.stderr
    [upload] = (images / "tenants" / "local" / "uploads").iterdir()  # the worker read both from there
    assert sorted(p.name for p in upload.iterdir()) == ["image.png", "reference-1.png"]


def test_the_api_refusing_is_one_line(api: Api) -> None:
    one_error(zimage("generate", "x", "--model", "nope", env=as_tenant(api)), "--model: no model named 'nope'")
    one_error(zimage("generate", "x", env={"ZIMAGE_API_URL": api.url, "ZIMAGE_API_KEY": ""}), "the API wants a key")
    one_error(
        zimage("jobs", "list", env={**as_tenant(api), "ZIMAGE_API_KEY": "zk_nope_0123456789abcdefghij"}),
        "the API refused the key: invalid API key",
    )
    one_error(zimage("jobs", "get", "no-such-job", env=as_tenant(api)), "no job 'no-such-job'")


def test_jobs_watch_follows_a_job_to_its_end(api: Api) -> None:
    client = api.client("a")
    api.engine.gate.clear()
    try:
        jid = client.post("/v1/jobs", json={"prompt": "watched", "width": 64, "height": 64, "steps": 3}).json()["id"]
        assert api.engine.waiting.wait(30)  # the worker holds it
        watch = subprocess.Popen(
            [str(BIN / "zimage"), "jobs", "watch", f"job/{jid}"],
            env={**os.environ, **as_tenant(api)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert watch.stderr is not None
        seen = []
        for line in watch.stderr:  # the stream is open and the job running: let it go on
            seen.append(line)
            if "Running" in line:
                break
        else:
            raise AssertionError(f"zimage jobs watch ended before the job ran: {''.join(seen)}")
    finally:
        api.engine.gate.set()
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, "".join(seen) + err
    assert "3/3" in err  # the bar followed the steps to the end
    header, row = out.splitlines()
    assert header.split() == ["ID", "MODE", "PHASE", "PROGRESS", "IMAGES", "MODEL", "AGE"]
    assert row.split()[:5] == [jid, "imagejob", "Succeeded", "3/3", "1"]

    listed = zimage("jobs", "list", "-o", "name", "--limit", "500", env=as_tenant(api))
    assert listed.returncode == 0 and f"job/{jid}" in listed.stdout.split()
    got = zimage("jobs", "get", jid, "-o", "yaml", env=as_tenant(api))
    assert got.returncode == 0 and "phase: Succeeded" in got.stdout
    again = zimage("jobs", "cancel", jid, env=as_tenant(api))
    assert again.stdout.strip() == f"job/{jid} already Succeeded, left as is"


def test_jobs_cancel_and_a_watch_of_a_cancelled_job(api: Api) -> None:
    client = api.client("a")
    api.engine.gate.clear()
    try:
        client.post("/v1/jobs", json={"prompt": "blocker", "width": 64, "height": 64})
        assert api.engine.waiting.wait(30)
        jid = client.post("/v1/jobs", json={"prompt": "never", "width": 64, "height": 64}).json()["id"]
        out = zimage("jobs", "cancel", jid, env=as_tenant(api))
        assert out.returncode == 0 and out.stdout.strip() == f"job/{jid} cancelled", out.stderr
    finally:
        api.engine.gate.set()
    watched = zimage("jobs", "watch", jid, "-o", "json", env=as_tenant(api))
    assert watched.returncode == 1  # it did not succeed
    assert '"phase": "Cancelled"' in watched.stdout
    assert watched.stderr.splitlines()[-1].startswith(f"zimage: error: job {jid} Cancelled")
