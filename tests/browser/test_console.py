"""The web console, in headless Chromium, against the embedded stack with the tiny model (tests/browser/harness).

Each test saves screenshots of its steps (``out/console/*.png``, or ``$ZIMAGE_TEST_OUTPUT``); every test ends by
checking that the page asked nothing of any other origin and logged no error (a CSP violation logs one).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import BIN, wait_for
from tests.browser.harness import PHONE, Browser, Stack, browser, chromium, console_stack

pytestmark = pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
pytest.importorskip("playwright")

from playwright.sync_api import expect  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with console_stack(tmp_path_factory.mktemp("console")) as s:
        yield s


@pytest.fixture
def web(stack: Stack) -> Iterator[Browser]:
    stack.engine.delay = 0.0
    with browser(stack.url) as b:
        yield b
        assert b.blocked == [], f"requests to other origins: {b.blocked}"
        assert all(u.startswith(stack.url) or u.startswith(("blob:", "data:")) for u in b.requested), b.requested
        assert b.problems == [], b.problems


def api(stack: Stack, key: str = "dev") -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.keys[key]}"}, timeout=60)


def generate(web: Browser, prompt: str, **fields: str) -> str:
    """Fill the Create form, submit, return the new job's id (its card is the first of the started jobs)."""
    page = web.page
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Size").select_option(fields.pop("size", "256x256"))
    for label, value in fields.items():
        page.get_by_label(label, exact=True).fill(value)
    before = page.locator(".watch").count()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator(".watch")).to_have_count(before + 1)
    return str(page.locator(".watch").first.get_attribute("data-job"))


def test_a_wrong_key_is_refused(web: Browser) -> None:
    web.sign_in("zk_nobody_not-a-key-of-this-api-at-all")
    alert = web.page.get_by_role("alert")
    expect(alert).to_contain_text("invalid API key")
    expect(web.page.get_by_label("API key")).to_be_visible()
    web.shot("01-sign-in-refused")
    # the key is not kept anywhere a script could read it back after the refusal
    assert web.page.evaluate("sessionStorage.length") == 0
    assert web.page.context.cookies() == []


def test_the_content_security_policy_refuses_inline_scripts(stack: Stack) -> None:
    with browser(stack.url) as web:
        web.page.goto(stack.url + "/ui/")
        expect(web.page.get_by_label("API key")).to_be_visible()
        web.page.evaluate(
            "() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
            " document.body.append(s) }"
        )
        assert web.page.evaluate("window.injected") is None
        assert any("Content Security Policy" in p for p in web.problems), web.problems


def test_create_watch_gallery_detail_and_again(web: Browser, stack: Stack) -> None:
    page = web.page
    web.sign_in(stack.keys["dev"])
    expect(page.get_by_test_id("tenant")).to_have_text("dev · admin")
    web.shot("02-create")
    assert "zk_" not in page.url  # never in a URL
    stack.engine.delay = 0.25  # a job slow enough to see mid-way
    job = generate(web, "a red fox in the snow", Steps="8", Seed="1234")
    card = page.locator(f'.watch[data-job="{job}"]')
    expect(card.get_by_test_id("steps")).to_have_text(re.compile(r"step [1-7]/8 · \d+%"))  # live, mid-way
    web.shot("03-progress")
    expect(card).to_have_attribute("data-phase", "Succeeded", timeout=60_000)
    expect(card.get_by_test_id("steps")).to_have_text("step 8/8 · 100%")
    expect(card.locator(".thumbs img")).to_have_count(1)
    web.shot("04-succeeded")

    page.get_by_role("link", name="Jobs").click()
    tile = page.locator(f'.card[data-job="{job}"]')
    expect(tile).to_have_attribute("data-phase", "Succeeded")
    img = tile.locator("img")
    expect(img).to_be_visible()
    wait_for(lambda: img.evaluate("i => i.complete && i.naturalWidth") == 256, what="the gallery image loaded")
    web.shot("05-gallery")

    tile.locator(".thumb").click()
    detail = page.locator(f'.detail[data-job="{job}"]')
    expect(detail).to_be_visible()
    rows = {r.locator("th").inner_text(): r.locator("td").inner_text() for r in detail.locator("tbody tr").all()}
    assert rows["Prompt"] == "a red fox in the snow" and rows["Seed"] == "1234" and rows["Steps"] == "8"
    assert rows["Worker"].startswith("local-worker") and rows["Attempts"] == "1"
    assert rows["Run time"].endswith("s") and rows["Queue time"].endswith("s")
    link = detail.get_by_role("link", name="Download")
    assert link.get_attribute("download") == f"{job}-0.png"
    assert httpx.get(str(link.get_attribute("href"))).content[:8] == b"\x89PNG\r\n\x1a\n"  # signed: no key needed
    web.shot("06-detail")

    page.get_by_role("button", name="Use these settings again").click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red fox in the snow")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("1234")
    page.go_back()
    page.get_by_role("button", name="Vary seed").click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red fox in the snow")
    seed = page.get_by_label("Seed", exact=True).input_value()
    assert seed.isdigit() and seed != "1234"
    page.get_by_role("button", name="Roll a random seed").click()
    rolled = page.get_by_label("Seed", exact=True).input_value()
    assert rolled.isdigit() and rolled != seed
    page.get_by_label("Seed", exact=True).fill(seed)
    stack.engine.delay = 0.0
    again = generate(web, "a red fox in the snow")
    expect(page.locator(f'.watch[data-job="{again}"]')).to_have_attribute("data-phase", "Succeeded", timeout=60_000)
    with api(stack) as c:
        assert c.get(f"/v1/jobs/{again}").json()["seed"] == int(seed)

    # compare the two
    page.get_by_role("link", name="Jobs").click()
    for j in (job, again):
        page.locator(f'.card[data-job="{j}"]').get_by_label("Compare").check()
    page.get_by_role("button", name="Compare (2)").click()
    expect(page.locator(".compare-grid figure")).to_have_count(2)
    expect(page.locator(".compare-grid .differs dt")).to_have_text(["seed", "seed"])
    web.shot("07-compare")


def test_validation_messages_are_the_apis(web: Browser, stack: Stack) -> None:
    page = web.page
    web.sign_in(stack.keys["dev"])
    page.get_by_label("Prompt", exact=True).fill("too wide")
    page.get_by_label("Size").select_option("custom")
    page.get_by_label("Width").fill("100")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("width")
    expect(page.get_by_label("Width")).to_have_attribute("aria-invalid", "true")
    with api(stack) as c:
        r = c.post("/v1/jobs", json={"prompt": "too wide", "width": 100, "height": 1024})
    assert r.status_code == 400 and alert.inner_text() == r.json()["error"]["message"]
    web.shot("08-validation")


def test_cancel_a_running_job(web: Browser, stack: Stack) -> None:
    page = web.page
    web.sign_in(stack.keys["dev"])
    stack.engine.delay = 0.5
    job = generate(web, "a slow lighthouse", Steps="40")
    card = page.locator(f'.watch[data-job="{job}"]')
    expect(card.get_by_test_id("steps")).to_have_text(re.compile(r"step [1-9]/40"))
    card.get_by_role("button", name="Cancel").click()
    expect(card).to_have_attribute("data-phase", "Cancelled", timeout=30_000)
    web.shot("09-cancelled")
    with api(stack) as c:
        assert c.get(f"/v1/jobs/{job}").json()["phase"] == "Cancelled"


def painted(mask: Image.Image) -> tuple[float, float]:
    """The share of white in the left and the right half of a mask."""
    grey = mask.convert("L")
    w, h = grey.size
    halves = grey.crop((0, 0, w // 2, h)), grey.crop((w // 2, 0, w, h))
    left, right = (sum(half.histogram()[128:]) / (half.width * half.height) for half in halves)
    return left, right


def test_inpaint_with_a_painted_mask(web: Browser, stack: Stack, tmp_path: Path) -> None:
    page = web.page
    web.sign_in(stack.keys["dev"])
    photo = tmp_path / "photo.png"
    Image.new("RGB", (256, 256), (40, 120, 200)).save(photo)
    page.get_by_label("Inpaint").check()
    page.get_by_label("Input image").set_input_files(str(photo))
    canvas = page.get_by_test_id("mask")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    assert box is not None
    # strokes over the left half only
    for y in (0.2, 0.4, 0.6, 0.8):
        page.mouse.move(box["x"] + box["width"] * 0.08, box["y"] + box["height"] * y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * y, steps=8)
        page.mouse.up()
    web.shot("10-inpaint-mask")
    job = generate(web, "a boat on the lake", size="custom")
    card = page.locator(f'.watch[data-job="{job}"]')
    expect(card).to_have_attribute("data-phase", "Succeeded", timeout=60_000)
    web.shot("11-inpaint-done")
    with api(stack) as c:
        request = c.get(f"/v1/jobs/{job}").json()["request"]
    assert request["task"] == "inpaint" and (request["width"], request["height"]) == (256, 256)
    stored = stack.local.app.state.parts.images.local_path(request["maskImage"])
    left, right = painted(Image.open(io.BytesIO(Path(stored).read_bytes())))
    assert left > 0.2 and right == 0.0, (left, right)


def test_edit_with_reference_images_on_an_omni_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The form offers what the model does (GET /v1/models: tasks): an omni model does text-to-image and edit, and
    an edit takes the image to edit and up to max_reference_images reference images."""
    files = tmp_path_factory.mktemp("edit-files")
    for name, colour in (("photo", (40, 120, 200)), ("hat", (200, 30, 30)), ("scarf", (30, 200, 30))):
        Image.new("RGB", (64, 64), colour).save(files / f"{name}.png")
    with console_stack(tmp_path_factory.mktemp("omni"), variant="omni") as omni, browser(omni.url) as web:
        page = web.page
        web.sign_in(omni.keys["dev"])
        tasks = page.get_by_role("group", name="Task").get_by_role("radio")
        expect(tasks).to_have_count(2)
        expect(page.get_by_label("Text to image")).to_be_checked()
        expect(page.get_by_label("Inpaint")).to_have_count(0)
        page.get_by_label("Edit", exact=True).check()
        page.get_by_label("Image to edit").set_input_files(str(files / "photo.png"))
        expect(page.get_by_label("Strength")).to_have_count(0)  # an edit goes as the prompt says
        page.get_by_label(re.compile(r"^Reference images \(up to 3\)")).set_input_files(
            [str(files / "hat.png"), str(files / "scarf.png")]
        )
        web.shot("16-omni-edit")
        job = generate(web, "the photo with the hat and the scarf", size="custom", Steps="2")
        card = page.locator(f'.watch[data-job="{job}"]')
        expect(card).to_have_attribute("data-phase", "Succeeded", timeout=60_000)
        web.shot("17-omni-edit-done")
        with api(omni) as c:
            request = c.get(f"/v1/jobs/{job}").json()["request"]
        assert request["task"] == "edit" and (request["width"], request["height"]) == (64, 64)
        assert len(request["referenceImages"]) == 2 and "strength" not in request
        assert web.blocked == [] and web.problems == []


def test_another_tenants_jobs_are_never_shown(web: Browser, stack: Stack) -> None:
    page = web.page
    with api(stack, "other") as c:
        r = c.post("/v1/jobs", json={"prompt": "team other's secret", "width": 256, "height": 256})
        assert r.status_code == 202, r.text
        theirs = r.json()["id"]
        wait_for(lambda: c.get(f"/v1/jobs/{theirs}").json()["phase"] == "Succeeded", what="their job")
    web.sign_in(stack.keys["dev"])
    expect(page.get_by_test_id("tenant")).to_be_visible()
    web.route("/jobs")
    expect(page.locator(".gallery")).to_have_attribute("aria-busy", "false")
    assert page.locator(f'[data-job="{theirs}"]').count() == 0
    assert "team other's secret" not in page.content()
    web.route(f"/jobs/{theirs}")
    expect(page.get_by_role("alert")).to_contain_text("no job")
    web.shot("12-other-tenant-hidden")
    # the other tenant, signed in, sees it and has no Operate page (not an admin)
    page.get_by_role("button", name="Sign out").click()
    web.sign_in(stack.keys["other"])
    web.route("/jobs")
    expect(page.locator(f'.card[data-job="{theirs}"]')).to_be_visible()
    expect(page.get_by_role("link", name="Operate")).to_have_count(0)
    web.route("/operate")
    expect(page.get_by_role("alert")).to_contain_text("admin")


def test_operate_shows_the_deployment(web: Browser, stack: Stack) -> None:
    page = web.page
    small = {"width": 256, "height": 256}
    after = {"dependsOn": ["sketch"]}
    steps = [
        {"name": "sketch", "model": "z-image-turbo", "params": {"prompt": "a lighthouse", **small}},
        {"name": "dusk", "model": "z-image-turbo", "params": {"prompt": "at dusk", **small}, **after},
        {"name": "storm", "model": "z-image-turbo", "params": {"prompt": "in a storm", **small}, **after},
    ]
    with api(stack) as c:
        r = c.post("/v1/jobs", json={"prompt": "for the throughput", **small})
        wf = c.post("/v1/workflows", json={"steps": steps}).json()["id"]
        wait_for(lambda: c.get(f"/v1/jobs/{r.json()['id']}").json()["phase"] == "Succeeded", what="a job")
        wait_for(lambda: c.get(f"/v1/workflows/{wf}").json()["phase"] == "Succeeded", timeout=60, what="workflow")
    web.sign_in(stack.keys["dev"])
    page.get_by_role("link", name="Operate").click()
    row = page.locator('tr[data-deployment="z-image-turbo"]')
    expect(row).to_be_visible()
    recent = row.get_by_test_id("recent").inner_text()
    assert int(recent.split()[0]) >= 1, recent
    expect(row.get_by_test_id("queue")).to_have_text("0")
    page.get_by_role("button", name=wf).click()
    graph = page.get_by_label(f"steps of {wf}")
    expect(graph.locator(".layer")).to_have_count(2)  # sketch, then dusk and storm side by side
    expect(graph.locator(".layer").nth(1).locator(".step")).to_have_count(2)
    expect(graph.locator('[data-step="storm"] .after')).to_have_text("after sketch")
    expect(graph.locator(".step.phase-succeeded")).to_have_count(3)
    web.shot("13-operate")


def test_phone_width_and_dark(stack: Stack) -> None:
    with browser(stack.url, viewport=PHONE, color_scheme="dark") as web:
        web.sign_in(stack.keys["dev"])
        page = web.page
        expect(page.get_by_role("button", name="Generate")).to_be_visible()
        # nothing wider than the phone's screen
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(17, 18, 22)", background
        web.shot("14-phone-dark")
        # the theme switch overrides the system's preference, and "System" follows it again
        for theme, colour in (("Light", "rgb(247, 247, 249)"), ("Dark", "rgb(17, 18, 22)"), ("System", background)):
            page.get_by_label("Theme").select_option(label=theme)
            assert page.evaluate("getComputedStyle(document.body).backgroundColor") == colour, theme
        web.route("/jobs")
        expect(page.locator(".gallery")).to_have_attribute("aria-busy", "false")
        web.shot("15-phone-jobs")
        assert web.blocked == [] and web.problems == []


def up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz").status_code == 200
    except httpx.TransportError:
        return False


def test_zimage_serve_serves_the_console(tmp_path: Path) -> None:
    """The command the README names: ``zimage serve``, then ``/`` in a browser is the console, signed in with
    the key it prints."""
    from zimage_queue.server import free_port

    port = free_port()
    env = {**os.environ, "ZIMAGE_MODEL_SOURCE": "tiny-random"}
    proc = subprocess.Popen(
        [str(BIN / "zimage"), "serve", "--port", str(port), "--images-dir", str(tmp_path)],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        printed = ""
        while "API key:" not in printed:
            line = proc.stderr.readline()
            assert line, f"zimage serve exited: {printed}"
            printed += line
        key = printed.split("API key:")[1].split()[0]
        url = f"http://127.0.0.1:{port}"
        assert f"{url}/ui/" in printed
        wait_for(lambda: up(url), what="zimage serve")
        with browser(url) as web:
            web.sign_in(key)
            expect(web.page.get_by_role("heading", name="Create")).to_be_visible()
            assert web.page.url.startswith(url + "/ui/")
            assert web.blocked == [] and web.problems == []
    finally:
        proc.terminate()
        proc.wait(30)
