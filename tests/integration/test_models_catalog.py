"""``GET /v1/models`` lists what is served, the backends' own names included, and
``GET /v1/models/{id}`` answers for every name ``POST /v1/messages`` would serve: through the
official SDK, against the fake backend, in process (under real gunicorn:
tests/system/test_models_catalog_gunicorn.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import pytest
import requests
from fakebackend import FakeBackend
from inprocess import GatewayServer
from model_lists import LISTED, MODELS_PATH, fails_to_list, ids_of, list_requests, lists

from app.config import build_settings
from app.serving import catalog
from app.serving.catalog import Catalog
from app.serving.web import build_dispatcher

HI = [{"role": "user", "content": "hi"}]
# --- the list: configured names and the backend's own ------------------------------------------


def test_with_only_an_upstream_url_the_backend_models_are_listed(make_gateway, backend):
    lists(backend, LISTED)
    with make_gateway().client() as client:
        models = list(client.models.list())
    assert [m.id for m in models] == ["qwen3-8b", "Qwen/Qwen3-32B"]
    assert models[0].type == "model" and models[0].display_name == "qwen3-8b"
    assert models[0].created_at.isoformat() == "2025-10-09T08:53:20+00:00"  # from "created"


def test_aliases_come_first_then_the_backend_models(make_gateway, backend):
    lists(backend, [*LISTED, {"id": "claude-haiku-4-5", "object": "model"}])
    gateway = make_gateway(models={"claude-haiku-4-5": "qwen3-8b", "claude-opus-4-7": "qwen3-32b"})
    with gateway.client() as client:
        assert ids_of(client) == [
            "claude-haiku-4-5",
            "claude-opus-4-7",
            "qwen3-8b",
            "Qwen/Qwen3-32B",
        ]
        alias = client.models.retrieve("claude-haiku-4-5")
    assert alias.display_name == "claude-haiku-4-5 (qwen3-8b)"  # the alias, not the backend's


def test_a_default_route_with_a_fixed_model_does_not_list_the_backend(make_gateway, backend):
    """Every name goes to the fixed model there: the backend's other names would mislead."""
    lists(backend, LISTED)
    with make_gateway({"model": "qwen3-32b"}).client() as client:
        assert ids_of(client) == ["qwen3-32b"]
    assert list_requests(backend) == []


def test_a_glob_route_lists_only_the_backend_names_it_matches():
    with FakeBackend() as local:
        lists(local, [{"id": "qwen3-8b"}, {"id": "llama-3.1-8b"}, {"id": "qwen3-32b"}])
        gateway = GatewayServer(
            {
                "backends": [{"name": "local", "url": local.url}],
                "routes": [
                    {"name": "aliases", "match": "claude-haiku-4-5", "backend": "local",
                     "model": "qwen3-8b"},
                    {"name": "qwen", "match": "qwen*", "backend": "local"},
                ],
            }
        )  # fmt: skip
        try:
            with gateway.client() as client:
                assert ids_of(client) == ["claude-haiku-4-5", "qwen3-8b", "qwen3-32b"]
        finally:
            gateway.close()


def test_the_backend_is_asked_once_while_its_list_is_fresh(make_gateway, backend):
    lists(backend, LISTED)
    with make_gateway().client() as client:
        for _ in range(3):
            assert ids_of(client) == ["qwen3-8b", "Qwen/Qwen3-32B"]
    assert len(list_requests(backend)) == 1


def test_a_backend_that_cannot_list_leaves_the_configured_names(make_gateway, backend):
    fails_to_list(backend)
    with make_gateway(models={"claude-haiku-4-5": "qwen3-8b"}).client() as client:
        assert ids_of(client) == ["claude-haiku-4-5"]


def test_a_backend_without_a_model_list_gives_an_empty_list_not_an_error(make_gateway, backend):
    """The fake backend answers 404 off the chat path, as some servers do for /v1/models."""
    raw = requests.get(make_gateway().url + MODELS_PATH, timeout=10)
    assert raw.status_code == 200
    assert raw.json() == {"data": [], "has_more": False, "first_id": None, "last_id": None}


def test_an_unreachable_backend_gives_the_configured_names_not_an_error():
    with FakeBackend() as gone:
        url = gone.url
    gateway = GatewayServer(
        {"upstream": {"url": url, "connect_timeout": 1}, "models": {"claude-haiku-4-5": "q"}}
    )
    try:
        raw = requests.get(gateway.url + MODELS_PATH, timeout=10)
    finally:
        gateway.close()
    assert raw.status_code == 200
    assert [m["id"] for m in raw.json()["data"]] == ["claude-haiku-4-5"]


# --- caching, with the worker's clock in the test's hands ----------------------------------------


@pytest.fixture
def clocked(backend: FakeBackend) -> Iterator[tuple[Catalog, list[float]]]:
    """A catalog on the fake backend, as a worker builds it, with a clock the test moves."""
    settings = build_settings({"upstream": {"url": backend.url}}, {})
    dispatcher = build_dispatcher(settings)
    now = [1000.0]
    yield Catalog(settings, dispatcher.clients, clock=lambda: now[0]), now
    for client in dispatcher.clients.values():
        client.close()


def page_ids(page: dict[str, Any]) -> list[str]:
    return [m["id"] for m in page["data"]]


def test_a_stale_list_is_fetched_again_when_next_asked_for(clocked, backend):
    catalog_, now = clocked
    lists(backend, LISTED[:1])
    assert page_ids(catalog_.page({})) == ["qwen3-8b"]
    lists(backend, LISTED)
    now[0] += catalog.FRESH_FOR - 1
    assert page_ids(catalog_.page({})) == ["qwen3-8b"]  # still fresh
    now[0] += 2
    assert page_ids(catalog_.page({})) == ["qwen3-8b", "Qwen/Qwen3-32B"]
    assert len(list_requests(backend)) == 2


def test_a_failed_refresh_keeps_the_last_good_list_and_tries_again_soon(clocked, backend):
    catalog_, now = clocked
    lists(backend, LISTED)
    assert page_ids(catalog_.page({})) == ["qwen3-8b", "Qwen/Qwen3-32B"]
    fails_to_list(backend, status=503)
    now[0] += catalog.FRESH_FOR + 1
    assert page_ids(catalog_.page({})) == ["qwen3-8b", "Qwen/Qwen3-32B"]
    assert page_ids(catalog_.page({})) == ["qwen3-8b", "Qwen/Qwen3-32B"]
    assert len(list_requests(backend)) == 2  # not asked on every request while it fails
    lists(backend, LISTED[1:])
    now[0] += catalog.RETRY_AFTER + 1
    assert page_ids(catalog_.page({})) == ["Qwen/Qwen3-32B"]


# --- retrieve: whatever /v1/messages would serve ------------------------------------------------


def test_retrieve_answers_any_name_the_default_route_serves(make_gateway, backend):
    lists(backend, LISTED)
    with make_gateway().client() as client:
        listed = client.models.retrieve("Qwen/Qwen3-32B")
        unlisted = client.models.retrieve("claude-sonnet-4-6")
        served = client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HI)
    assert listed.id == "Qwen/Qwen3-32B" and listed.created_at.year == 2025
    assert unlisted.id == "claude-sonnet-4-6" and unlisted.display_name == "claude-sonnet-4-6"
    assert served.model == "claude-sonnet-4-6"


@pytest.fixture
def glob_gateway() -> Iterator[Callable[[], GatewayServer]]:
    """A gateway with no default: only ``qwen*`` and one alias are served."""
    with FakeBackend() as local:
        lists(local, [{"id": "qwen3-8b"}, {"id": "llama-3.1-8b"}])
        gateway = GatewayServer(
            {
                "backends": [{"name": "local", "url": local.url}],
                "routes": [
                    {"name": "haiku", "match": "claude-haiku-4-5", "backend": "local",
                     "model": "qwen3-8b"},
                    {"name": "qwen", "match": "qwen*", "backend": "local"},
                ],
            }
        )  # fmt: skip
        try:
            yield gateway
        finally:
            gateway.close()


def test_retrieve_answers_a_name_a_glob_route_serves(glob_gateway):
    with glob_gateway.client() as client:
        model = client.models.retrieve("qwen2.5-coder-7b")
        served = client.messages.create(model="qwen2.5-coder-7b", max_tokens=10, messages=HI)
    assert model.id == "qwen2.5-coder-7b"
    assert served.model == "qwen2.5-coder-7b"


@pytest.mark.parametrize("name", ["llama-3.1-8b", "claude-opus-4-7"])
def test_retrieve_is_404_exactly_where_messages_refuses_the_name(glob_gateway, name):
    """Even a name the backend lists is refused when no route takes it."""
    with glob_gateway.client() as client:
        with pytest.raises(anthropic.NotFoundError):
            client.models.retrieve(name)
        with pytest.raises(anthropic.NotFoundError) as refused:
            client.messages.create(model=name, max_tokens=10, messages=HI)
    raw = requests.get(f"{glob_gateway.url}{MODELS_PATH}/{name}", timeout=10)
    assert raw.status_code == 404
    body = raw.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert body["request_id"] == raw.headers["request-id"]
    assert refused.value.body["error"]["message"] == body["error"]["message"]


# --- pagination over the merged list ------------------------------------------------------------

MANY = [{"id": f"local-{i}", "object": "model"} for i in range(5)]
ALIASES = {"claude-haiku-4-5": "local-0", "claude-opus-4-7": "local-4"}
MERGED = ["claude-haiku-4-5", "claude-opus-4-7", *(m["id"] for m in MANY)]


def test_the_sdk_pages_through_the_merged_list(make_gateway, backend):
    lists(backend, MANY)
    with make_gateway(models=ALIASES).client() as client:
        first = client.models.list(limit=3)
        assert [m.id for m in first.data] == MERGED[:3] and first.has_more
        assert ids_of(client, limit=3) == MERGED  # the auto-pager follows after_id to the end


@pytest.mark.parametrize(
    ("query", "ids", "has_more"),
    [
        ("limit=3", MERGED[:3], True),
        ("limit=3&after_id=local-0", ["local-1", "local-2", "local-3"], True),
        ("limit=3&after_id=local-2", ["local-3", "local-4"], False),
        ("limit=2&before_id=local-1", ["claude-opus-4-7", "local-0"], True),
        ("limit=5&before_id=local-1", MERGED[:3], False),
        ("limit=10", MERGED, False),
    ],
)
def test_pages_cut_the_merged_list_as_the_api_does(make_gateway, backend, query, ids, has_more):
    lists(backend, MANY)
    page = requests.get(f"{make_gateway(models=ALIASES).url}{MODELS_PATH}?{query}", timeout=10)
    body = page.json()
    assert [m["id"] for m in body["data"]] == ids
    assert body["has_more"] is has_more
    assert (body["first_id"], body["last_id"]) == (ids[0], ids[-1])
