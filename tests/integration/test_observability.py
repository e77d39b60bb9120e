"""Access log fields, /metrics, /healthz and /readyz, in process and under multi-worker gunicorn."""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fakebackend import FakeBackend, StreamReply, chunks
from servers import Gunicorn

from app.ops import access_log as observability

BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_access_log_has_the_fields_an_operator_needs(gateway, backend, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    backend.reply(StreamReply(chunks(["a", "b"])))
    with requests.post(
        gateway.url + "/v1/messages",
        json={**BODY, "stream": True},
        headers={"x-api-key": "sk-client-secret", "X-Forwarded-For": "198.51.100.7"},
        timeout=10,
    ) as reply:
        assert reply.status_code == 200
    entry = next(r.msg for r in caplog.records if r.name == "gateway.access")
    for key in (
        "request_id",
        "client",
        "route",
        "backend",
        "model",
        "backend_model",
        "status",
        "stop_reason",
        "input_tokens",
        "output_tokens",
        "ttft_ms",
        "duration_ms",
        "bytes_out",
        "client_disconnected",
        "forwarded_for",
    ):
        assert key in entry, key
    assert entry["client"].startswith("key_") and "sk-client-secret" not in json.dumps(entry)
    assert entry["forwarded_for"] == "198.51.100.7"
    assert entry["request_id"] == reply.headers["request-id"]


def test_metrics_count_requests_tokens_and_errors(gateway, backend):
    before = requests.get(gateway.url + "/metrics", timeout=10).text
    requests.post(gateway.url + "/v1/messages", json=BODY, timeout=10)
    backend.reply(StreamReply(chunks(["x"])))
    requests.post(gateway.url + "/v1/messages", json={**BODY, "stream": True}, timeout=10)
    after = requests.get(gateway.url + "/metrics", timeout=10)
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text

    def grew(name: str, **labels: str) -> float:
        return metric_sum(text, name, **labels) - metric_sum(before, name, **labels)

    assert grew("gateway_requests_total", route="default", status="200", stream="false") == 1
    assert grew("gateway_requests_total", route="default", status="200", stream="true") == 1
    assert grew("gateway_tokens_total", direction="output") == 10
    assert grew("gateway_request_duration_seconds_count", route="default") == 2
    assert grew("gateway_time_to_first_token_seconds_count", route="default") == 1
    assert "gateway_streams_in_flight" in text


def test_healthz_and_readyz(make_gateway, backend):
    gateway = make_gateway()
    assert requests.get(gateway.url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(gateway.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["backends"] == {"default": True}


def test_readyz_is_503_when_no_backend_is_reachable(make_gateway):
    dead = FakeBackend().start()
    url = dead.url
    dead.stop()
    gateway = make_gateway({"url": url})
    ready = requests.get(gateway.url + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "backends": {"default": False}}


def test_a_json_answer_is_logged_once_it_has_been_written(gateway, backend, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    client = gateway.app.test_client()
    reply = client.post(
        "/v1/messages", json=BODY, headers={"x-api-key": "sk-client-secret"}, buffered=False
    )
    assert reply.status_code == 200
    assert not [r for r in caplog.records if r.name == "gateway.access"]  # not yet written
    assert reply.get_data()
    reply.close()  # what the server does once the body is out
    entries = [r.msg for r in caplog.records if r.name == "gateway.access"]
    assert len(entries) == 1
    assert entries[0]["status"] == 200 and entries[0]["bytes_out"] == len(reply.get_data())


@pytest.mark.parametrize("workers", [3])
def test_metrics_add_up_across_gunicorn_workers(tmp_path, workers):
    with FakeBackend() as backend:
        env = {"GATEWAY_UPSTREAM_URL": backend.url, "GATEWAY_WORKERS": str(workers)}
        server = Gunicorn(env, tmp_path / "gunicorn.log")
        try:
            sent = 0
            # Concurrent new connections until more than one worker has answered (bounded).
            while sent < 300 and len(_workers(server)) < 2:
                with ThreadPoolExecutor(10) as pool:
                    statuses = list(pool.map(lambda _: _post_status(server), range(30)))
                assert statuses == [200] * 30
                sent += 30
            backend.reply(StreamReply(chunks(["s"])))
            reply = requests.post(
                server.url + "/v1/messages", json={**BODY, "stream": True}, timeout=10
            )
            assert reply.status_code == 200
            text = requests.get(server.url + "/metrics", timeout=10).text
        finally:
            server.stop()
    assert len(_workers(server)) > 1, "requests did not spread over workers: a vacuous check"
    assert metric_sum(text, "gateway_requests_total", route="default") == sent + 1
    assert metric_sum(text, "gateway_tokens_total", direction="output") == 5 * (sent + 1)
    assert re.search(r'gateway_streams_in_flight\{backend="default"\} 0\.0', text)


def _post_status(server: Gunicorn) -> int:
    return requests.post(server.url + "/v1/messages", json=BODY, timeout=10).status_code


def _workers(server: Gunicorn) -> set[int]:
    return {e["worker"] for e in server.access_lines() if e.get("path") == "/v1/messages"}


def test_probes_and_scrapes_leave_no_access_line_and_no_request_metrics(gateway, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    before = requests.get(gateway.url + "/metrics", timeout=10).text
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(gateway.url + path, timeout=10).headers["request-id"]
    after = requests.get(gateway.url + "/metrics", timeout=10).text
    assert metric_sum(after, "gateway_requests_total") == metric_sum(
        before, "gateway_requests_total"
    )
    assert not [r for r in caplog.records if r.name == "gateway.access"]


@pytest.fixture
def gateway_logger(tmp_path):
    """The gateway's logging as a worker configures it, with its stderr handler writing to a
    file instead; the previous logging state comes back afterwards."""
    logger = logging.getLogger("gateway")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    observability.configure_logging("info")
    sink = open(tmp_path / "stderr", "w")  # noqa: SIM115 - closed below
    logger.handlers[0].setStream(sink)
    yield logger, tmp_path / "stderr"
    sink.close()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(saved[0])
    for handler in saved[1]:
        logger.addHandler(handler)
    logger.propagate = saved[2]


def test_access_line_is_written_whole_to_the_gateway_handler(gateway_logger):
    logger, path = gateway_logger
    observability.log_access({"request_id": "req_x", "status": 200, "path": "/v1/messages"}, 0.0)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["request_id"] == "req_x" and entry["status"] == 200 and "duration_ms" in entry


def test_access_lines_are_off_below_info(gateway_logger):
    logger, path = gateway_logger
    logger.setLevel("WARNING")
    observability.log_access({"request_id": "req_y", "status": 200}, 0.0)
    assert path.read_text() == ""


def test_another_handler_on_the_way_gets_ordinary_log_records(gateway_logger):
    logger, path = gateway_logger
    seen: list[logging.LogRecord] = []
    extra = logging.Handler()
    extra.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(extra)
    try:
        observability.log_access({"request_id": "req_z", "status": 200}, 0.0)
    finally:
        logger.removeHandler(extra)
    assert [r.msg["request_id"] for r in seen] == ["req_z"]
    assert json.loads(path.read_text())["request_id"] == "req_z"  # and still one line


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        ("nginx-0123456789abcdef", True),
        ("abcdefgh\n", False),  # it goes into the backend request's head as it is
        ("abcdefgh\r\nX-Evil: 1", False),
        ("short", False),
        ("x" * 129, False),
        (None, False),
    ],
)
def test_only_a_sane_incoming_request_id_is_kept(header, kept):
    request_id = observability.request_id_from(header)
    assert (request_id == header) is kept
    assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", request_id)
