"""A function pool's worker as the operator renders it: ``zimage-worker`` with ZIMAGE_ENGINE=function and
ZIMAGE_FUNCTION=<entryPoint>, real Redis, inputs under the tenant's uploads in the worker's store."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from conftest import Processes, start_worker, wait_for
from zimage_queue import GenerationParams, JobMessage, JobQueue
from zimage_worker.storage import open_store, upload_key

Q = "ns/cpu"
RED, BLUE = (255, 0, 0), (0, 0, 255)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def upload(images: Path, name: str, image: Image.Image) -> str:
    return open_store(images.as_uri()).put(upload_key("ns", uuid.uuid4().hex, name), png(image), "image/png")


def run_job(q: JobQueue, **params: Any) -> tuple[str, JobMessage]:
    m = JobMessage(
        uid=str(uuid.uuid4()),
        namespace="ns",
        name="step",
        queue=Q,
        params=GenerationParams(prompt="zimage", seed=1, steps=8, **params),
    )
    q.enqueue(m)
    wait_for(lambda: q.state(m.uid) in ("succeeded", "failed"), timeout=60, what="the job to finish")
    return str(q.state(m.uid)), m


def stored(q: JobQueue, m: JobMessage, images: Path) -> list[Image.Image]:
    """The job's result images, read back from the worker's store."""
    out = []
    for result in q.result(m.uid) or []:
        with Image.open(io.BytesIO(open_store(images.as_uri()).get(result.uri))) as img:
            assert (img.width, img.height) == (result.width, result.height)
            out.append(img.convert("RGB"))
    return out


def test_compose_worker_pastes_the_overlay_and_fails_bad_arguments_at_once(
    redis_url: str, tmp_path: Path, processes: Processes
) -> None:
    images = tmp_path / "images"
    q = JobQueue.from_url(redis_url)
    start_worker(processes, redis_url, Q, images, ZIMAGE_ENGINE="function", ZIMAGE_FUNCTION="builtin:compose")
    background = upload(images, "bg.png", Image.new("RGB", (96, 64), BLUE))
    overlay = upload(images, "logo.png", Image.new("RGB", (16, 16), RED))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 16, 8))  # the overlay's top half
    state, m = run_job(
        q,
        task="inpaint",
        input_image=background,
        mask_image=upload(images, "mask.png", mask),
        args={"overlay": overlay, "x": 40, "y": 10},
    )
    assert state == "succeeded"
    [out] = stored(q, m, images)
    assert out.size == (96, 64)
    assert out.getpixel((45, 12)) == RED and out.getpixel((45, 22)) == BLUE and out.getpixel((5, 5)) == BLUE

    # Bad arguments: failed without retries, with the step's message.
    state, bad = run_job(q, task="image-to-image", input_image=background, args={"overlay": overlay, "x": "left"})
    [final] = q.finals([bad.uid]).values()
    assert state == "failed" and final.event.reason == "InvalidInput" and "args.x" in (final.event.message or "")
    assert final.event.attempt == 1  # the first attempt was the only one
    # Another tenant's upload is not read.
    theirs = open_store(images.as_uri()).put(upload_key("other", "u", "x.png"), png(Image.new("RGB", (8, 8))), "")
    state, refused = run_job(q, task="image-to-image", input_image=background, args={"overlay": theirs})
    [final] = q.finals([refused.uid]).values()
    assert state == "failed" and final.event.reason == "InvalidInput"


def test_resize_worker_and_a_user_entry_point(redis_url: str, tmp_path: Path, processes: Processes) -> None:
    images = tmp_path / "images"
    q = JobQueue.from_url(redis_url)
    start_worker(processes, redis_url, Q, images, ZIMAGE_ENGINE="function", ZIMAGE_FUNCTION="builtin:resize")
    source = upload(images, "wide.png", Image.new("RGB", (200, 100), RED))
    state, m = run_job(q, task="image-to-image", input_image=source, width=128, height=128, args={"mode": "fill"})
    assert state == "succeeded" and [i.size for i in stored(q, m, images)] == [(128, 128)]
    processes.stop_all()

    code = tmp_path / "steps"
    code.mkdir()
    (code / "mysteps.py").write_text(
        "from PIL import Image\n"
        "def flip(params, inputs, args):\n"
        "    img = inputs['image'].transpose(Image.Transpose.FLIP_LEFT_RIGHT)\n"
        "    return [img] * int(args.get('copies', 1))\n"
    )
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)
    start_worker(
        processes, redis_url, Q, images, ZIMAGE_ENGINE="function", ZIMAGE_FUNCTION="mysteps:flip", PYTHONPATH=path
    )
    half = Image.new("RGB", (64, 64), BLUE)
    half.paste(RED, (0, 0, 32, 64))
    state, m = run_job(q, task="image-to-image", input_image=upload(images, "half.png", half), args={"copies": 2})
    assert state == "succeeded"
    first, second = stored(q, m, images)
    assert first.getpixel((60, 32)) == RED and first.getpixel((4, 32)) == BLUE and second.tobytes() == first.tobytes()
