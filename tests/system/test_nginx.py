"""The shipped nginx site (deploy/nginx/anthropic-gateway.conf) in front of real gunicorn.

nginx runs without root privileges of its own: a temporary prefix, ``-p``/``-c`` and a generated
nginx.conf that ``include``s the shipped site. Only what cannot work in a test is rewritten,
each with one explicit substitution (``SITE_SUBSTITUTIONS``): listen ports become ephemeral
127.0.0.1 ports, the upstream server the test gunicorn, the certificate a throwaway self-signed
one, the access log a file in the prefix. Everything else in the file is what is tested.

Skipped only when nginx is not installed and ``CI`` is unset; .ci/run installs nginx.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import pytest
import requests
from fakebackend import FakeBackend, StreamReply, chunks
from servers import ROOT, Gunicorn, free_port, make_certificate, stop_process
from waiting import eventually, wait_until_ready

ADMIN_TOKEN = "admin-token-behind-nginx-0123456789"
SITE = ROOT / "deploy" / "nginx" / "anthropic-gateway.conf"
BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hi"}],
}


def nginx_binary() -> str | None:
    """nginx on PATH, or in /usr/sbin (not on a non-root user's PATH on Debian)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def require_nginx() -> str:
    binary = nginx_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed, but CI is set: .ci/run must install nginx")
        pytest.skip("nginx is not installed (apt-get install nginx); CI runs these tests")
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the test certificate (apt-get install openssl)")
    return binary


# --------------------------------------------------------------------------------------------
# Rendering the test configuration
# --------------------------------------------------------------------------------------------


def site_substitutions(
    *, https_port: int, http_port: int, gateway_port: int, cert: Path, key: Path, logs: Path
) -> list[tuple[str, str]]:
    """(text in the shipped site, test replacement): the only differences from production."""
    return [
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("server 127.0.0.1:8082 ", f"server 127.0.0.1:{gateway_port} "),
        ("/etc/ssl/anthropic-gateway/fullchain.pem", str(cert)),
        ("/etc/ssl/anthropic-gateway/privkey.pem", str(key)),
        ("/var/log/nginx/anthropic-gateway.access.log", str(logs / "access.log")),
    ]


def render_site(text: str, substitutions: list[tuple[str, str]]) -> str:
    for old, new in substitutions:
        assert old in text, f"{SITE.name} no longer contains {old!r}: update the test"
        text = text.replace(old, new)
    return text


def main_conf(prefix: Path, site: Path) -> str:
    """The wrapper nginx.conf: no ``user`` directive, pid, logs and temp dirs in ``prefix``."""
    temp = "\n".join(
        f"    {name}_temp_path {prefix / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{
    worker_connections 256;
}}
http {{
    access_log {prefix / "default-access.log"};
{temp}
    include {site};
}}
"""


@dataclass
class NginxConfig:
    prefix: Path
    conf: Path
    cert: Path
    https_port: int
    http_port: int

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"


def write_config(prefix: Path, gateway_port: int) -> NginxConfig:
    """Everything nginx needs in ``prefix``: certificate, rewritten site, wrapper conf."""
    cert, key = make_certificate(prefix)
    https_port, http_port = free_port(), free_port()
    substitutions = site_substitutions(
        https_port=https_port,
        http_port=http_port,
        gateway_port=gateway_port,
        cert=cert,
        key=key,
        logs=prefix,
    )
    site = prefix / "anthropic-gateway.conf"
    site.write_text(render_site(SITE.read_text(), substitutions))
    conf = prefix / "nginx.conf"
    conf.write_text(main_conf(prefix, site))
    return NginxConfig(prefix, conf, cert, https_port, http_port)


def make_prefix() -> Path:
    """A prefix directory nginx's workers can enter: as root they run as nobody, and pytest's
    tmp_path sits below a 0700 directory, where they could not buffer request bodies."""
    prefix = Path(tempfile.mkdtemp(prefix="gateway-nginx-"))
    prefix.chmod(0o711)
    return prefix


def nginx_check(binary: str, config: NginxConfig) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "-t", "-p", str(config.prefix), "-c", str(config.conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )


# --------------------------------------------------------------------------------------------
# Running nginx
# --------------------------------------------------------------------------------------------


class Nginx:
    def __init__(self, binary: str, config: NginxConfig) -> None:
        self.config = config
        self.url = f"https://127.0.0.1:{config.https_port}"
        log_path = config.prefix / "stderr.log"
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [binary, "-p", str(config.prefix), "-c", str(config.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group of its own: stop() takes the workers with it
            )
        try:
            wait_until_ready(
                self._listening, "nginx", process=self.process, log=config.prefix / "error.log"
            )
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.config.https_port), timeout=5):
            return True

    def access_lines(self) -> list[dict]:
        text = self.config.access_log.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def stop(self) -> None:
        stop_process(self.process, signum=signal.SIGQUIT)  # graceful: the master waits for workers


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    return require_nginx()


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    with FakeBackend() as fb:
        yield fb


@pytest.fixture(scope="module")
def gateway(nginx_bin: str, backend: FakeBackend, tmp_path_factory) -> Iterator[Gunicorn]:
    log_path = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    env = {"GATEWAY_UPSTREAM_URL": backend.url, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    server = Gunicorn(env, log_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nginx(nginx_bin: str, gateway: Gunicorn) -> Iterator[Nginx]:
    prefix = make_prefix()
    try:
        server = Nginx(nginx_bin, write_config(prefix, gateway.port))
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture(scope="module")
def tls(nginx: Nginx) -> ssl.SSLContext:
    """Verifies nginx's certificate for real: the throwaway certificate is the only anchor."""
    return ssl.create_default_context(cafile=str(nginx.config.cert))


class HTTPS:
    """requests against nginx's TLS port, verifying the throwaway certificate."""

    def __init__(self, nginx: Nginx) -> None:
        self.url = nginx.url
        self.cert = str(nginx.config.cert)
        self.session = requests.Session()
        # Per request: a REQUESTS_CA_BUNDLE in the environment would win over session.verify.
        self.session.trust_env = False

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(self.url + path, timeout=30, verify=self.cert, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.session.post(self.url + path, timeout=30, verify=self.cert, **kwargs)


@pytest.fixture
def https(nginx: Nginx) -> Iterator[HTTPS]:
    client = HTTPS(nginx)
    yield client
    client.session.close()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_stream_arrives_event_by_event_over_https(nginx, tls, backend):
    pieces = [f"w{i} " for i in range(8)]
    reply = StreamReply(chunks(pieces), first_delay=0.1, delay=0.5)
    backend.reply(reply)
    conn = http.client.HTTPSConnection("127.0.0.1", nginx.config.https_port, context=tls)
    try:
        body = json.dumps({**BODY, "stream": True})
        conn.request("POST", "/v1/messages", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        assert response.getheader("Content-Length") is None
        assert response.getheader("Transfer-Encoding") == "chunked"
        arrivals = []
        while line := response.readline():
            if line.startswith(b"event: "):
                arrivals.append((time.monotonic(), line[7:].strip().decode()))
    finally:
        conn.close()
    names = [name for _, name in arrivals]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    deltas = [t for t, name in arrivals if name == "content_block_delta"]
    assert len(deltas) == len(pieces)
    # The backend spreads the answer over ~5 s. A buffering proxy would deliver nothing before
    # the backend's last event; a streaming one has delivered most of the text by then.
    last_sent = reply.sent_at[-1]
    assert deltas[0] < last_sent
    assert sum(t < last_sent for t in deltas) >= len(deltas) // 2


def test_large_image_body_passes_through_to_the_backend(https, backend):
    image = base64.b64encode(os.urandom(3_900_000)).decode()  # ~5.2 MB of base64
    assert len(image) > 5_000_000
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "text", "text": "What is in this image?"},
    ]
    seen = len(backend.requests)
    response = https.post(
        "/v1/messages", json={**BODY, "messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code == 200, response.text
    assert response.json()["content"][0]["text"] == "Hello"
    forwarded = backend.requests[seen].json
    parts = forwarded["messages"][-1]["content"]
    urls = [part["image_url"]["url"] for part in parts if part.get("type") == "image_url"]
    assert urls == [f"data:image/png;base64,{image}"]


@pytest.mark.parametrize("client_id", [None, "client-supplied-id-0123456789"])
def test_request_id_is_the_same_in_both_logs_and_the_response(https, nginx, gateway, client_id):
    headers = {"X-Request-ID": client_id} if client_id else {}
    response = https.post("/v1/messages", json=BODY, headers=headers)
    assert response.status_code == 200
    request_id = response.headers["request-id"]
    if client_id:
        assert request_id == client_id
    else:
        assert len(request_id) == 32  # nginx's $request_id: 16 random bytes in hex
    # Access lines are written when a response ends, a moment after the client saw it.
    edge = eventually(
        lambda: next((e for e in nginx.access_lines() if e["request_id"] == request_id), None),
        f"nginx access line for {request_id}",
    )
    assert edge["uri"] == "/v1/messages" and edge["status"] == 200
    assert float(edge["request_time"]) >= 0
    assert edge["upstream_addr"] == f"127.0.0.1:{gateway.port}"
    app = eventually(
        lambda: next((e for e in gateway.access_lines() if e["request_id"] == request_id), None),
        f"gateway access line for {request_id}",
    )
    assert app["path"] == "/v1/messages" and app["status"] == 200


def test_plain_http_redirects_to_https(nginx):
    conn = http.client.HTTPConnection("127.0.0.1", nginx.config.http_port, timeout=10)
    try:
        conn.request("GET", "/v1/models?limit=1")
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 301
    assert response.getheader("Location") == "https://127.0.0.1/v1/models?limit=1"


def test_tls_settings_and_hsts(https, nginx):
    response = https.get("/healthz")
    assert response.status_code == 200
    assert response.headers["strict-transport-security"] == "max-age=63072000"
    # TLS 1.2 with an ECDHE AEAD suite works; without forward secrecy it is refused.
    for ciphers, works in (("ECDHE-RSA-AES128-GCM-SHA256", True), ("AES128-GCM-SHA256", False)):
        context = ssl.create_default_context(cafile=str(nginx.config.cert))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)
        with socket.create_connection(("127.0.0.1", nginx.config.https_port), timeout=10) as raw:
            if works:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
                    assert tls_sock.version() == "TLSv1.2"
            else:
                with pytest.raises(ssl.SSLError):
                    context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_sdk_create_and_stream_through_nginx(nginx, tls, backend):
    with anthropic.Anthropic(
        base_url=nginx.url,
        api_key="sdk-key",
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(verify=tls),
    ) as sdk:
        backend.reply(StreamReply(chunks(["Hello", ", world"], dialect="vllm")))
        with sdk.messages.stream(**BODY) as stream:
            message = stream.get_final_message()
        assert message.content[0].text == "Hello, world"
        assert message.model == "claude-haiku-4-5"
        created = sdk.messages.create(**BODY)
        assert created.content[0].text == "Hello"
        count = sdk.messages.count_tokens(model=BODY["model"], messages=BODY["messages"])
        assert count.input_tokens > 0


def test_rate_limit_is_per_api_key_and_answers_429_in_anthropic_format(https):
    statuses = []
    limited = None
    for _ in range(120):  # burst 40 at 10 r/s: most of these go over
        response = https.get("/v1/models", headers={"x-api-key": "greedy-key"})
        statuses.append(response.status_code)
        if response.status_code == 429:
            limited = response
            break
    assert limited is not None, statuses
    assert statuses.count(200) >= 40
    body = limited.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert limited.headers["content-type"].startswith("application/json")
    # Same client address, another key: its own bucket.
    assert https.get("/v1/models", headers={"x-api-key": "patient-key"}).status_code == 200


def test_metrics_location_is_open_to_loopback(https):
    response = https.get("/metrics")
    assert response.status_code != 403
    assert "request-id" in response.headers  # answered by the gateway, not by nginx


def test_gateway_down_answers_an_overloaded_error(nginx_bin):
    """Nothing listens on the upstream port: nginx's 502 becomes a retryable 529 envelope."""
    prefix = make_prefix()
    try:
        down = Nginx(nginx_bin, write_config(prefix, gateway_port=free_port()))
        client = HTTPS(down)
        try:
            response = client.post(
                "/v1/messages", json=BODY, headers={"X-Request-ID": "down-request-0001"}
            )
        finally:
            client.session.close()
            down.stop()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
    assert response.status_code == 529
    assert response.json() == {
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "message": "The gateway is unavailable; retry shortly.",
        },
        "request_id": "down-request-0001",
    }


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", (414,)),
        # nginx answers 494 (headers too large) as a 400 or, where error_page 494 applies, 431
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", (400, 431)),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: -4\r\n\r\n", (400,)),
    ],
    ids=["uri_too_long", "header_too_large", "bad_request"],
)
def test_nginx_rejects_broken_http_in_anthropic_format(nginx, tls, raw, code):
    with socket.create_connection(("127.0.0.1", nginx.config.https_port), timeout=10) as plain:
        with tls.wrap_socket(plain, server_hostname="localhost") as conn:
            conn.sendall(raw)
            answer = b""
            while piece := conn.recv(65536):
                answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert int(head.split(b" ")[1]) in code, head
    assert b"application/json" in head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_the_console_signs_in_and_takes_its_forms_through_nginx_on_its_own_port(https, nginx):
    """nginx's HTTPS port here is not 443: the Host the gateway sees must keep the port, or
    the origin check refuses every form the console posts."""
    https.session.headers["Origin"] = nginx.url
    signed = https.post("/admin/sign-in", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert signed.status_code == 303, signed.text[:300]
    assert "Secure" in signed.headers["Set-Cookie"]  # X-Forwarded-Proto: https reached it
    assert https.get("/admin/keys").status_code == 200
    foreign = https.post(
        "/admin/sign-out", data={}, headers={"Origin": "https://evil.test"}, allow_redirects=False
    )
    assert foreign.status_code == 403
