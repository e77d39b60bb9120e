"""A Message Batches item is a trace of its own: the gateway runs it through its own app with
no caller's context, so each item is a root SERVER span naming its batch, with its attempt's
CLIENT span under it (the OTLP receiver of tests/system/test_tracing.py)."""

from __future__ import annotations

import anthropic
from fakebackend import FakeBackend
from servers import Gunicorn
from test_tracing import CLIENT, SERVER, Receiver, attributes, otel_env
from waiting import eventually


def test_each_batch_item_is_a_trace_of_its_own(tmp_path):
    receiver = Receiver()
    with FakeBackend() as backend:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[upstream]\nurl = "{backend.url}"\ncapacity = 4\n'
            "[batches]\nshare = 1.0\npoll_interval = 0.2\n"
        )
        env = {"GATEWAY_CONFIG": str(config), **otel_env(receiver.url)}
        gateway = Gunicorn(env, tmp_path / "gunicorn.log")
        try:
            with anthropic.Anthropic(base_url=gateway.url, api_key="k", max_retries=0) as sdk:
                params = {
                    "model": "m",
                    "max_tokens": 10,
                    "messages": [{"role": "user", "content": "hi"}],
                }
                batch = sdk.messages.batches.create(
                    requests=[{"custom_id": f"c{i}", "params": params} for i in range(2)]  # type: ignore[list-item]
                )
                eventually(
                    lambda: sdk.messages.batches.retrieve(batch.id).processing_status == "ended",
                    "the batch ended",
                )

            def items() -> list | None:
                found = [
                    s
                    for s in list(receiver.spans)
                    if s.kind == SERVER and attributes(s).get("gateway.batch_id") == batch.id
                ]
                return found if len(found) == 2 else None

            spans = eventually(items, "both items' spans")
        finally:
            gateway.stop()
            receiver.close()
    assert len({s.trace_id for s in spans}) == 2
    for server in spans:
        assert server.parent_span_id == b""
        children = [
            c for c in receiver.spans if c.kind == CLIENT and c.parent_span_id == server.span_id
        ]
        assert len(children) == 1 and children[0].trace_id == server.trace_id
