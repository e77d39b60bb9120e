"""Two gateways (two gunicorns, as two hosts would run them) on one Redis and one shared batch
directory: a batch created on one is worked by both, and both serve its results."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anthropic
import pytest
from batching import results
from fakebackend import FakeBackend, JSONReply, completion
from servers import Gunicorn, RedisServer, redis_available
from waiting import eventually

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


def test_two_gateways_on_one_redis_share_a_batch_and_both_serve_its_results(
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis")
    backend = FakeBackend().start()
    backend.default = JSONReply(completion("shared"), delay=0.05)
    shared = tmp_path / "shared-batches"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[upstream]\nurl = "{backend.url}"\ncapacity = 4\n'
        f'[state]\nredis_url = "{redis.url}"\n'
        f'[batches]\ndirectory = "{shared}"\nshare = 1.0\npoll_interval = 0.1\n'
    )
    gateways: list[Gunicorn] = []
    try:
        for name in ("host-a", "host-b"):
            gateways.append(
                Gunicorn(
                    {"GATEWAY_CONFIG": str(config), "GATEWAY_WORKERS": "2"},
                    tmp_path / f"{name}.log",
                )
            )
        a, b = (anthropic.Anthropic(base_url=g.url, api_key="k", max_retries=0) for g in gateways)
        params = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        requests_ = [{"custom_id": f"item-{i}", "params": params} for i in range(60)]
        batch = a.messages.batches.create(requests=requests_)  # type: ignore[arg-type]
        assert b.messages.batches.retrieve(batch.id).processing_status == "in_progress"
        eventually(
            lambda: b.messages.batches.retrieve(batch.id).processing_status == "ended",
            what="the batch ended",
            timeout=120,
        )
        for sdk in (a, b):
            lines = results(sdk.messages.batches, batch.id)
            assert Counter(r.custom_id for r in lines) == Counter(f"item-{i}" for i in range(60))
            assert {r.result.type for r in lines} == {"succeeded"}
        workers = {
            (gateway.url, line["worker"])
            for gateway in gateways
            for line in gateway.access_lines()
            if line.get("batch") == batch.id
        }
        hosts = {url for url, _ in workers}
        assert len(hosts) == 2, f"the items ran on {sorted(workers)}"
    finally:
        for gateway in gateways:
            gateway.stop()
        backend.stop()
        redis.stop()
