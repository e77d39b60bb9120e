"""Access log fields, /metrics, /healthz and /readyz, in process (under multi-worker gunicorn:
tests/system/test_observability_gunicorn.py; the log line itself: tests/unit/ops)."""

from __future__ import annotations

import json

import requests
from fakebackend import FakeBackend, StreamReply, chunks
from metrics import BODY, metric_sum
from waiting import eventually


def test_access_log_has_the_fields_an_operator_needs(gateway, backend, gateway_log):
    backend.reply(StreamReply(chunks(["a", "b"])))
    with requests.post(
        gateway.url + "/v1/messages",
        json={**BODY, "stream": True},
        headers={"x-api-key": "sk-client-secret", "X-Forwarded-For": "198.51.100.7"},
        timeout=10,
    ) as reply:
        assert reply.status_code == 200
    entry = next(r.msg for r in gateway_log.records if r.name == "gateway.access")
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

    def grew_in(text: str, name: str, **labels: str) -> float:
        return metric_sum(text, name, **labels) - metric_sum(before, name, **labels)

    requests.post(gateway.url + "/v1/messages", json=BODY, timeout=10)
    backend.reply(StreamReply(chunks(["x"])))
    requests.post(gateway.url + "/v1/messages", json={**BODY, "stream": True}, timeout=10)

    # A request is counted once the server has closed its answer, just after its last byte:
    # a scrape at once may come first.
    def scrape() -> requests.Response | None:
        after = requests.get(gateway.url + "/metrics", timeout=10)
        return (
            after if grew_in(after.text, "gateway_requests_total", route="default") >= 2 else None
        )

    after = eventually(scrape, "the streamed request counted")
    text = after.text
    assert after.headers["content-type"].startswith("text/plain")

    def grew(name: str, **labels: str) -> float:
        return grew_in(text, name, **labels)

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


def test_a_json_answer_is_logged_once_it_has_been_written(gateway, backend, gateway_log):
    client = gateway.app.test_client()
    reply = client.post(
        "/v1/messages", json=BODY, headers={"x-api-key": "sk-client-secret"}, buffered=False
    )
    assert reply.status_code == 200
    assert not [r for r in gateway_log.records if r.name == "gateway.access"]  # not yet written
    assert reply.get_data()
    reply.close()  # what the server does once the body is out
    entries = [r.msg for r in gateway_log.records if r.name == "gateway.access"]
    assert len(entries) == 1
    assert entries[0]["status"] == 200 and entries[0]["bytes_out"] == len(reply.get_data())


def test_probes_and_scrapes_leave_no_access_line_and_no_request_metrics(gateway, gateway_log):
    before = requests.get(gateway.url + "/metrics", timeout=10).text
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(gateway.url + path, timeout=10).headers["request-id"]
    after = requests.get(gateway.url + "/metrics", timeout=10).text
    assert metric_sum(after, "gateway_requests_total") == metric_sum(
        before, "gateway_requests_total"
    )
    assert not [r for r in gateway_log.records if r.name == "gateway.access"]
