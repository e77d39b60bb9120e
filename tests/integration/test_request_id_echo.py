"""A backend's echo of X-Request-ID, through the gateway: a backend that names another
request in its answer is refused, one that stops naming any is served as before.

The gateway sends every request's id to its backend; a backend that echoes it (vLLM with
``--enable-request-id-headers``, most proxies) lets the gateway tell an answer written for
another request (a stray second response on a kept-alive connection) from its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import pytest
import requests
from conftest import GatewayServer
from fakebackend import FakeBackend, JSONReply, StreamReply, chunks, completion

ADMIN = "admin-token-for-echo"
HI = [{"role": "user", "content": "hi"}]


def backend_status(gateway: GatewayServer) -> dict[str, Any]:
    status = requests.get(gateway.url + "/status", headers={"x-api-key": ADMIN}, timeout=5)
    return status.json()["backends"]["default"]


def ask(sdk: anthropic.Anthropic) -> str:
    return sdk.messages.create(model="m", max_tokens=16, messages=HI).content[0].text


def ask_streamed(sdk: anthropic.Anthropic) -> str:
    with sdk.messages.stream(model="m", max_tokens=16, messages=HI) as stream:
        return stream.get_final_text()


@pytest.fixture
def echoing(
    backend: FakeBackend, make_gateway: Callable[..., GatewayServer]
) -> tuple[FakeBackend, GatewayServer]:
    """A gateway whose backend has echoed one request's id, so the gateway checks its ids."""
    backend.echo_request_id = True
    gateway = make_gateway(admin={"token": ADMIN}, routing={"retries": 0, "breaker_failures": 1})
    with gateway.client() as sdk:
        assert ask(sdk) == "Hello"
    return backend, gateway


def test_a_backend_that_stops_echoing_request_ids_is_served_as_before(echoing):
    """vLLM restarted without the flag, or a load balancer over replicas set up apart: an
    answer with no id says nothing about whose answer it is, so it is served, JSON and
    streamed, and nothing counts against the backend."""
    backend, gateway = echoing
    backend.echo_request_id = False
    with gateway.client() as sdk:
        answers = [ask(sdk) for _ in range(4)] + [ask_streamed(sdk) for _ in range(4)]
    assert answers == ["Hello"] * 8
    status = backend_status(gateway)
    assert (status["breaker"], status["errors"]) == ("closed", 0)


ANOTHER = {"X-Request-ID": "req_someone_else"}


@pytest.mark.parametrize(
    "reply, call",
    [
        (JSONReply(completion("Leaked"), headers=ANOTHER), ask),
        (StreamReply(chunks(["Leaked"]), headers=ANOTHER), ask_streamed),
    ],
    ids=["json", "stream"],
)
def test_an_answer_naming_another_request_is_still_refused(echoing, reply, call):
    backend, gateway = echoing
    backend.echo_request_id = False
    backend.reply(reply)
    with gateway.client() as sdk:
        with pytest.raises(anthropic.APIStatusError) as caught:
            call(sdk)
        assert caught.value.status_code == 502
        assert "sent an answer to another request" in caught.value.body["error"]["message"]
        assert backend_status(gateway)["errors"] == 1
        assert call(sdk) == "Hello"
