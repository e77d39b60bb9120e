"""A real gunicorn running the gateway (``gunicorn -c gunicorn.conf.py wsgi:app``), and a
throwaway TLS certificate, for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import requests
from waiting import wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gunicorn:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "GATEWAY_BIND": f"127.0.0.1:{self.port}",
            "GATEWAY_WORKERS": "1",
            "GATEWAY_GRACEFUL_TIMEOUT": "5",
            "GATEWAY_STATE_DIR": str(log_path.with_suffix(".state")),
            **env,
        }
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group of its own: stop() takes the workers with it
            )
        try:
            wait_until_ready(
                lambda: requests.get(self.url + "/healthz", timeout=5).status_code == 200,
                "gunicorn",
                process=self.process,
                log=log_path,
            )
        except BaseException:
            self.stop()
            raise

    def access_lines(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().split("\n"):  # not splitlines: U+2028 is data
            if line.startswith("{") and '"request_id"' in line:
                lines.append(json.loads(line))
        return lines

    def stop(self) -> None:
        stop_process(self.process, grace=15)


def stop_process(
    process: subprocess.Popen[bytes], grace: float = 10, signum: int = signal.SIGTERM
) -> None:
    """Stop a server started with ``start_new_session=True``: ``signum`` (its graceful stop) to
    it, ``grace`` seconds, then SIGKILL to its whole process group, so that no worker of a
    gunicorn or nginx outlives the test, even when the master died first. Safe to call twice."""
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
    except (ProcessLookupError, PermissionError):
        pass  # nothing is left of it
    process.wait()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (it is its own trust anchor)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class ThrowawayCA:
    """A certificate authority made for one test run, and certificates it signs: a server
    certificate for 127.0.0.1 and localhost, and a client certificate for mutual TLS."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert, self.key = directory / "ca.pem", directory / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=gateway test CA", "-keyout", self.key, "-out", self.cert,
        )  # fmt: skip
        self.server_cert, self.server_key = self.issue(
            "server", "subjectAltName=IP:127.0.0.1,DNS:localhost"
        )
        self.client_cert, self.client_key = self.issue("client", "extendedKeyUsage=clientAuth")

    def issue(self, name: str, extension: str) -> tuple[Path, Path]:
        cert, key, request = (self.directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
        extfile = self.directory / f"{name}.ext"
        extfile.write_text(extension + "\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", key, "-out", request,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", request, "-CA", self.cert, "-CAkey", self.key,
            "-CAcreateserial", "-days", "1", "-extfile", extfile, "-out", cert,
        )  # fmt: skip
        return cert, key


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


class RedisServer:
    """A real redis-server on a free loopback port, with no persistence, for one test module
    (CI installs redis-server; locally the tests that need it skip without it)."""

    def __init__(self, directory: Path) -> None:
        import shutil

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.command = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(directory), "--protected-mode", "yes",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log_path = self.directory / "redis-server.log"
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_until_ready(self._pong, "redis-server", process=self.process, log=log_path)
        except BaseException:
            self.stop()
            raise

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None


def redis_available() -> bool:
    import shutil

    return shutil.which("redis-server") is not None or Path("/usr/bin/redis-server").exists()
