"""Both storage backends, S3 through a moto server on loopback used exactly like MinIO (endpoint_url)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from PIL import Image

from zimage_queue import GenerationParams, JobMessage, JobQueue
from zimage_queue.server import free_port
from zimage_worker.engine import NoopEngine
from zimage_worker.loop import Worker
from zimage_worker.storage import LocalStore, S3Store, open_store, upload_key


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    name = f"images-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_local_store_round_trip_and_no_escape(tmp_path: Path) -> None:
    store = open_store((tmp_path / "imgs").as_uri())
    assert isinstance(store, LocalStore)
    uri = store.put("ns/job/uid/0.png", b"data", "image/png")
    assert uri.startswith("file://") and store.get(uri) == b"data"
    assert not list((tmp_path / "imgs").rglob(".tmp-*"))  # written via rename, no leftovers
    with pytest.raises(ValueError, match="escapes"):
        store.put("../../etc/x", b"x", "image/png")


def test_s3_store_round_trip_and_presign(bucket: str, s3_endpoint: str) -> None:
    store = open_store(f"s3://{bucket}/prefix?endpoint={s3_endpoint}")
    assert isinstance(store, S3Store)
    uri = store.put("ns/job/uid/0.png", b"\x89PNG...", "image/png")
    assert uri == f"s3://{bucket}/prefix/ns/job/uid/0.png"
    assert store.get(uri) == b"\x89PNG..."
    head = store.s3.head_object(Bucket=bucket, Key="prefix/ns/job/uid/0.png")
    assert head["ContentType"] == "image/png"
    url = store.presign(uri, expires=60)
    assert url.startswith(s3_endpoint) and ("Signature=" in url or "X-Amz-Signature=" in url)


def test_worker_stores_results_in_s3_and_reads_its_input_from_s3(bucket: str, s3_endpoint: str, redis_url: str) -> None:
    store = open_store(f"s3://{bucket}?endpoint={s3_endpoint}")
    source = store.put(upload_key("ns", "u1", "fox.png"), png((200, 50, 10)), "image/png")
    q = JobQueue.from_url(redis_url)
    params = GenerationParams(
        prompt="a red fox",
        task="image-to-image",
        input_image=source,
        width=64,
        height=64,
        steps=2,
        seed=3,
        num_images=2,
        output_format="webp",
    )
    m = JobMessage(uid=str(uuid.uuid4()), namespace="ns", name="fox", queue="ns/m", params=params)
    q.enqueue(m)
    Worker(q, NoopEngine(), store, "ns/m", "w").run(max_jobs=1, block_ms=0)
    results = q.result(m.uid)
    assert results is not None and [r.uri for r in results] == [
        f"s3://{bucket}/tenants/ns/jobs/ns/fox/{m.uid}/0.webp",
        f"s3://{bucket}/tenants/ns/jobs/ns/fox/{m.uid}/1.webp",
    ]
    with Image.open(io.BytesIO(store.get(results[0].uri))) as img:
        assert img.format == "WEBP" and img.size == (64, 64)


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("tenants/team-a/uploads/missing/in.png", "No such file"),
        ("tenants/team-b/uploads/u1/in.png", "not in tenant team-a's storage"),  # exists, another tenant's
        ("/etc/hostname", "not in tenant team-a's storage"),  # outside the store
    ],
)
def test_unreadable_or_foreign_input_fails_without_retries(
    redis_url: str, tmp_path: Path, where: str, reason: str
) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("tenants/team-b/uploads/u1/in.png", png((1, 2, 3)), "image/png")
    source = Path(where) if where.startswith("/") else store.root / where
    q = JobQueue.from_url(redis_url)
    params = GenerationParams(
        prompt="x", task="image-to-image", input_image=source.as_uri(), width=64, height=64, steps=1, seed=1
    )
    m = JobMessage(
        uid=str(uuid.uuid4()), namespace="ns", name="bad", tenant="team-a", queue="ns/m", params=params, max_retries=3
    )
    q.enqueue(m)
    Worker(q, NoopEngine(), store, "ns/m", "w").run(max_jobs=1, block_ms=0)
    [(dead, error)] = q.dead_letters()
    assert dead.uid == m.uid and "InvalidInput" in error and reason in error, error
    assert not (store.root / "tenants" / "team-a" / "jobs").exists()


# -- retention ---------------------------------------------------------------------------------------------


class FakeLease:
    """The one part of the Runtime the retention loop uses besides settings: held() and the fencing check."""

    def __init__(self) -> None:
        self.holding = True
        self.checks = 0

    def held(self) -> bool:
        return self.holding

    def check(self) -> None:
        self.checks += 1


def retention_loop(store: object, clock: list[float], **settings: object) -> object:
    from types import SimpleNamespace

    from zimage_operator.retention import ImageRetention
    from zimage_operator.settings import OperatorSettings

    cfg = OperatorSettings(redis_url="redis://unused", **settings)  # type: ignore[arg-type]
    rt = SimpleNamespace(settings=cfg, lease=FakeLease())
    return ImageRetention(rt, store=store, clock=lambda: clock[0])  # type: ignore[arg-type]


def fill(store: LocalStore | S3Store) -> dict[str, str]:
    keys = {
        "image": "tenants/t1/jobs/ns/fox/uid-1/0.png",
        "image2": "tenants/t2/jobs/ns/owl/uid-2/0.webp",
        "upload": "tenants/t1/uploads/abc/image.png",
        "foreign": "backups/db.dump",  # not ours: never touched
    }
    for key in keys.values():
        store.put(key, b"x", "image/png")
    return keys


def run_sweep(loop: object) -> None:
    import asyncio

    while True:
        asyncio.run(loop.once())  # type: ignore[attr-defined]
        if loop.listing is None:  # type: ignore[attr-defined]
            return


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_retention_deletes_images_and_uploads_past_their_age_only(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import time

    if backend == "s3":
        store: LocalStore | S3Store = S3Store(
            request.getfixturevalue("bucket"), "zimage", endpoint_url=request.getfixturevalue("s3_endpoint")
        )
    else:
        store = LocalStore(tmp_path / "images")
    keys = fill(store)
    now = [time.time()]
    day = 86400
    loop = retention_loop(store, now, image_retention_seconds=3 * day, upload_retention_seconds=day)
    loop.PASS_OBJECTS = 2  # type: ignore[attr-defined]  # a sweep over several passes
    run_sweep(loop)
    assert loop.last.deleted == 0 and loop.last.scanned == 3  # type: ignore[attr-defined]  # foreign: not listed

    now[0] += 2 * day  # past the uploads' retention, not the images'
    loop.next_sweep = 0  # type: ignore[attr-defined]
    run_sweep(loop)
    left = {o.key for o in store.scan("")}
    assert left == {keys["image"], keys["image2"], keys["foreign"]}

    now[0] += 2 * day
    loop.next_sweep = 0  # type: ignore[attr-defined]
    run_sweep(loop)
    assert {o.key for o in store.scan("")} == {keys["foreign"]}
    assert loop.rt.lease.checks >= 2  # type: ignore[attr-defined]  # fenced before each delete
    if backend == "file":  # the emptied folders went with their files
        assert not (tmp_path / "images" / "tenants").exists()


def test_retention_waits_for_the_lease_and_its_interval(tmp_path: Path) -> None:
    import time

    store = LocalStore(tmp_path / "images")
    fill(store)
    now = [time.time() + 30 * 86400]  # everything is old
    loop = retention_loop(store, now, retention_interval_seconds=3600)
    loop.rt.lease.holding = False  # type: ignore[attr-defined]
    run_sweep(loop)
    assert len(list(store.scan("tenants/"))) == 3  # a standby deletes nothing
    loop.rt.lease.holding = True  # type: ignore[attr-defined]
    run_sweep(loop)
    assert list(store.scan("tenants/")) == []
    store.put("tenants/t1/jobs/ns/late/u/0.png", b"x", "image/png")
    run_sweep(loop)  # the next sweep is an interval away
    assert len(list(store.scan("tenants/"))) == 1
    now[0] += 3601
    run_sweep(loop)
    assert list(store.scan("tenants/")) == []


def test_retention_off_and_kinds(tmp_path: Path) -> None:
    from zimage_operator.retention import kind_of

    assert kind_of("tenants/a/jobs/ns/n/u/0.png") == "image"
    assert kind_of("tenants/a/uploads/x/mask.png") == "upload"
    assert kind_of("tenants/a/other/x/y") is None and kind_of("tenants//jobs/x") is None
    assert kind_of("jobs/ns/n/u/0.png") is None
    loop = retention_loop(LocalStore(tmp_path), [0.0], image_retention_seconds=None, upload_retention_seconds=None)
    assert not loop.enabled  # type: ignore[attr-defined]
