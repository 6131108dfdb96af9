"""A locked Redis: a password (``requirepass``) and TLS with a private CA, on a real redis-server.

Without the password a client is refused; with it (from each component's settings, never from the URL) the queue
works, for the sync JobQueue, the async client the API reads events with, the API itself and a worker process.
Over TLS the server's certificate is checked against the CA bundle (a file or the PEM itself), host name included.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Processes, start_worker, wait_for
from tests.unit.test_chart import helm
from zimage_api.local import DEV_KEY, local_model, serve_in_thread
from zimage_api.settings import ApiSettings
from zimage_operator.settings import OperatorSettings
from zimage_queue import GenerationParams, JobMessage, JobQueue, keys
from zimage_queue.clients import Credentials, connect, connect_async
from zimage_queue.server import RedisServer
from zimage_worker.settings import WorkerSettings

__all__ = ["helm"]  # the fixture, shared with tests/unit/test_chart.py
PASSWORD = "s3cret-" + uuid.uuid4().hex
Q = "ns/m"


def job() -> JobMessage:
    params = GenerationParams(prompt="a red fox", width=64, height=64, steps=1, seed=1)
    return JobMessage(uid=str(uuid.uuid4()), namespace="ns", name="fox", queue=Q, params=params)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(directory: Path, hosts: list[str]) -> tuple[str, str, str]:
    """A self-signed CA and a server certificate it signed for ``hosts`` (names or IP addresses):
    (certificate, key, CA) file paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("zimage test CA"))
        .issuer_name(_name("zimage test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return str(paths[0]), str(paths[1]), str(paths[2])


@pytest.fixture(scope="module")
def locked() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as srv:
        yield srv


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    pki = make_pki(tmp_path_factory.mktemp("pki"), ["127.0.0.1"])
    with RedisServer(password=PASSWORD, tls=pki) as srv:
        yield srv


def roundtrip(q: JobQueue) -> None:
    m = job()
    q.enqueue(m)
    [d] = q.take(Q, "c1", count=1, block_ms=100)
    assert d.message.uid == m.uid


def test_without_the_password_a_client_is_refused(locked: RedisServer) -> None:
    assert "s3cret" not in locked.url
    with pytest.raises(redis.AuthenticationError):  # NOAUTH
        JobQueue.from_url(locked.url).r.ping()
    with pytest.raises(redis.AuthenticationError):
        JobQueue.from_url(locked.url, Credentials(password="wrong")).r.ping()

    async def unauthenticated() -> None:
        client = connect_async(locked.url)
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(redis.AuthenticationError):
        asyncio.run(unauthenticated())


def test_with_the_password_the_queue_works(locked: RedisServer, tmp_path: Path) -> None:
    roundtrip(JobQueue.from_url(locked.url, Credentials(password=PASSWORD)))
    # The setting wins over a password in the URL.
    wrong = locked.url.replace("redis://", "redis://default:wrong@")
    assert JobQueue.from_url(wrong, Credentials(password=PASSWORD)).r.ping()
    assert JobQueue.from_url(wrong.replace("wrong", PASSWORD)).r.ping()  # and a URL's alone still works


def test_every_components_settings_carry_the_password(
    locked: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZIMAGE_REDIS_URL", locked.url)
    monkeypatch.setenv("ZIMAGE_REDIS_PASSWORD", PASSWORD)
    for settings in (OperatorSettings(), WorkerSettings(), ApiSettings()):
        creds = settings.redis_credentials
        assert creds.password == PASSWORD and PASSWORD not in repr(settings) and PASSWORD not in repr(creds)
        roundtrip(JobQueue.from_url(settings.redis_url, creds))
    # A password file (a mounted Secret) instead of the variable.
    monkeypatch.delenv("ZIMAGE_REDIS_PASSWORD")
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.setenv("ZIMAGE_REDIS_PASSWORD_FILE", str(secret))
    assert connect(locked.url, OperatorSettings().redis_credentials).ping()
    assert ApiSettings().redis_credentials.password == WorkerSettings().redis_credentials.password == PASSWORD


def test_the_api_reads_and_enqueues_with_the_password(
    locked: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zimage_api.app import create_app
    from zimage_api.store import MemoryJobStore

    monkeypatch.setenv("ZIMAGE_REDIS_URL", locked.url)
    for password, ready in ((None, 503), (PASSWORD, 200)):
        with monkeypatch.context() as m:
            if password:
                m.setenv("ZIMAGE_REDIS_PASSWORD", password)
            settings = ApiSettings(namespace="local", dev_key=DEV_KEY, storage_url=tmp_path.as_uri())
        store = MemoryJobStore("local", [local_model("z-image-turbo", "turbo")])
        with serve_in_thread(create_app(settings, store)) as url:
            assert httpx.get(f"{url}/readyz").status_code == ready  # the async client pings
            if ready != 200:
                continue
            body = {"model": "z-image-turbo", "prompt": "a fox", "width": 64, "height": 64, "steps": 1}
            r = httpx.post(f"{url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {DEV_KEY}"})
            assert r.status_code in (200, 201, 202), r.text
    q = JobQueue.from_url(locked.url, Credentials(password=PASSWORD))
    assert q.stats(keys.queue_name("local", "z-image-turbo")).queued >= 1


def test_a_worker_process_takes_jobs_with_the_password(
    locked: RedisServer, tmp_path: Path, processes: Processes
) -> None:
    q = JobQueue.from_url(locked.url, Credentials(password=PASSWORD))
    m = job()
    q.enqueue(m)
    worker = start_worker(
        processes, locked.url, Q, tmp_path / "images", ZIMAGE_MODEL_SOURCE="noop", ZIMAGE_REDIS_PASSWORD=PASSWORD
    )
    wait_for(lambda: q.result(m.uid), 60, what="the job, through the locked Redis")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert PASSWORD not in processes.logs()


# -- TLS ---------------------------------------------------------------------------------------------------
def test_tls_with_the_ca_file_and_with_the_pem(tls: RedisServer) -> None:
    assert tls.url.startswith("rediss://")
    ca_file = tls.credentials.ca_file
    assert ca_file
    roundtrip(JobQueue.from_url(tls.url, Credentials(password=PASSWORD, ca_file=ca_file)))

    async def enqueue_and_read(creds: Credentials) -> bytes:
        """What the API's event hub does: XREAD a stream (here one it wrote itself)."""
        client = connect_async(tls.url, creds)
        try:
            await client.xadd("zimage:test:tls", {"v": b"async"})
            got: Any = await client.xread({"zimage:test:tls": "0"}, count=1)
            [(_stream, [(_id, fields)])] = got
            return bytes(fields[b"v"])
        finally:
            await client.aclose()

    pem = Path(ca_file).read_text()
    assert asyncio.run(enqueue_and_read(Credentials(password=PASSWORD, ca_data=pem))) == b"async"


def test_tls_without_the_ca_or_under_another_name_is_refused(tls: RedisServer) -> None:
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        JobQueue.from_url(tls.url, Credentials(password=PASSWORD)).r.ping()  # the system's trust store
    ca_file = tls.credentials.ca_file
    other_name = tls.url.replace("127.0.0.1", "localhost")  # the certificate is for 127.0.0.1 only
    with pytest.raises(redis.ConnectionError, match=r"certificate verify failed|match"):
        connect(other_name, Credentials(password=PASSWORD, ca_file=ca_file)).ping()
    with pytest.raises(redis.ConnectionError):  # plain text to a TLS port
        connect(tls.url.replace("rediss://", "redis://"), Credentials(password=PASSWORD)).ping()
    with pytest.raises(ValueError, match="rediss"):  # a CA with a plain URL is a mistake, not a silent downgrade
        connect(tls.url.replace("rediss://", "redis://"), Credentials(ca_file=ca_file))
    with pytest.raises(redis.AuthenticationError):  # TLS is no substitute for the password
        connect(tls.url, Credentials(ca_file=ca_file)).ping()


def test_a_worker_process_over_tls_with_the_ca_from_its_environment(
    tls: RedisServer, tmp_path: Path, processes: Processes
) -> None:
    """As in a worker pod: the password and the CA's PEM are environment variables (secretKeyRef there)."""
    ca_file = tls.credentials.ca_file
    assert ca_file
    q = JobQueue.from_url(tls.url, tls.credentials)
    m = job()
    q.enqueue(m)
    worker = start_worker(
        processes,
        tls.url,
        Q,
        tmp_path / "images",
        ZIMAGE_MODEL_SOURCE="noop",
        ZIMAGE_REDIS_PASSWORD=PASSWORD,
        ZIMAGE_REDIS_CA_CERT=Path(ca_file).read_text(),
    )
    wait_for(lambda: q.result(m.uid), 60, what="the job, over TLS")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


# -- the chart's bundled Redis, as rendered -----------------------------------------------------------------
def test_the_charts_locked_redis_runs_and_its_clients_connect(helm: list[str], tmp_path: Path) -> None:
    """redis-server with the StatefulSet's own arguments (paths and port moved to the test's), the generated
    password and certificates: our clients connect with what the chart hands them, its readiness probe passes."""
    import base64
    import os
    import subprocess

    import yaml

    from tests.unit.test_chart import CHART, run
    from zimage_queue.server import find_server_binary, free_port

    out = run([*helm, "template", "rel", str(CHART), "-n", "zimage", "-f", str(CHART / "ci" / "redis-tls-values.yaml")])
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    secrets = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret"}
    [sts] = [d for d in docs if d["kind"] == "StatefulSet"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    password = base64.b64decode(secrets["rel-zimage-operator-redis-auth"]["redis-password"]).decode()
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for key, value in secrets["rel-zimage-operator-redis-tls"].items():
        (tls_dir / key).write_bytes(base64.b64decode(value))
    port = str(free_port())

    def here(arg: str) -> str:  # the kubelet's $(VAR) expansion, and the pod's paths and port moved here
        arg = arg.replace("$(REDISCLI_AUTH)", password).replace("/tls/", f"{tls_dir}/").replace("/data", str(tmp_path))
        return port if arg == "6379" else arg

    args = [here(a) for a in container["args"]]
    proc = subprocess.Popen([find_server_binary(), *args, "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
    try:
        creds = Credentials(password=password, ca_data=(tls_dir / "ca.crt").read_text())
        url = f"rediss://127.0.0.1:{port}/0"  # the certificate names 127.0.0.1 besides the Service
        q = JobQueue.from_url(url, creds)
        wait_for(lambda: _pings(q), 10, what="the chart's redis-server")
        roundtrip(q)
        with pytest.raises(redis.AuthenticationError):
            JobQueue.from_url(url, Credentials(ca_data=creds.ca_data)).r.ping()
        probe = [here(a) for a in container["readinessProbe"]["exec"]["command"]]
        probe[-1] = probe[-1].replace("redis-cli ", f"redis-cli -p {port} ")
        env = {**os.environ, "REDISCLI_AUTH": password}
        assert subprocess.run(probe, env=env, capture_output=True).returncode == 0
        assert subprocess.run(probe, env={**env, "REDISCLI_AUTH": "wrong"}, capture_output=True).returncode != 0
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(q: JobQueue) -> bool:
    try:
        return bool(q.r.ping())
    except redis.ConnectionError:
        return False


def test_a_locked_cluster_takes_the_password_from_the_settings() -> None:
    from redis.exceptions import RedisClusterException

    from zimage_queue.clients import is_cluster
    from zimage_queue.cluster import LocalCluster

    with LocalCluster(password=PASSWORD) as cluster:
        assert "s3cret" not in cluster.url
        with pytest.raises(RedisClusterException, match="authenticated"):  # the nodes refuse discovery
            connect(cluster.url)
        q = JobQueue.from_url(cluster.url, Credentials(password=PASSWORD))
        assert is_cluster(q.r)
        roundtrip(q)

        async def read() -> int:
            client = connect_async(cluster.url, Credentials(password=PASSWORD))
            try:
                return len(await client.keys("*"))
            finally:
                await client.aclose()

        assert asyncio.run(read()) >= 1
