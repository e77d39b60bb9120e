"""/metrics under real gunicorn with several workers: one scrape adds up the whole service
(the access log and the probes in process: tests/integration/test_observability.py)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fakebackend import FakeBackend, StreamReply, chunks
from metrics import BODY, metric_sum
from servers import Gunicorn
from waiting import eventually


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
            # A stream is counted once its worker has closed it, just after its last byte:
            # a scrape at once may come first.
            text = eventually(lambda: _scrape_if(server, sent + 1), "the last request counted")
        finally:
            server.stop()
    assert len(_workers(server)) > 1, "requests did not spread over workers: a vacuous check"
    assert _requests(text) == sent + 1
    assert metric_sum(text, "gateway_tokens_total", direction="output") == 5 * (sent + 1)
    assert re.search(r'gateway_streams_in_flight\{backend="default"\} 0\.0', text)


def _requests(text: str) -> float:
    return metric_sum(text, "gateway_requests_total", route="default")


def _scrape_if(server: Gunicorn, counted: int) -> str | None:
    """/metrics, once it counts ``counted`` requests."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return text if _requests(text) >= counted else None


def _post_status(server: Gunicorn) -> int:
    return requests.post(server.url + "/v1/messages", json=BODY, timeout=10).status_code


def _workers(server: Gunicorn) -> set[int]:
    return {e["worker"] for e in server.access_lines() if e.get("path") == "/v1/messages"}
