"""A 10,000-item batch's results are streamed from their files, never gathered in the worker's
memory: while the SDK reads tens of megabytes of results, the worker's resident memory grows by
a small part of that, if at all.

One worker, so that the process measured is the one serving the results. Each answer is a few
kilobytes, so the whole results are far larger than the worker's ordinary growth and noise.
"""

from __future__ import annotations

import os
from pathlib import Path

from batching import Deployment, batch_requests, rss_kib, sdk, wait_ended, worker_pids
from fakebackend import AutoReply, FakeBackend

ITEMS = 10_000
ANSWER = "y" * 3000  # each item's answer text: about 3.3 kB a result line


def results_size(directory: Path) -> int:
    """The bytes of the JSONL the results route sends: each kept line and its newline."""
    return sum(
        os.path.getsize(os.path.join(root, name)) + 1
        for root, _, names in os.walk(directory)
        for name in names
        if not name.startswith(".")
    )


def test_streaming_a_10000_item_batchs_results_keeps_the_worker_small(tmp_path):
    with FakeBackend() as backend:
        backend.default = AutoReply(content=ANSWER)
        deployment = Deployment.write(
            tmp_path, backend.url, capacity=32, share=1.0, poll_interval=0.1
        )
        server = deployment.start(workers=1)
        try:
            (worker,) = worker_pids(server)
            with sdk(server, timeout=600) as client:
                created = client.messages.batches.create(requests=batch_requests(ITEMS))
                assert created.processing_status == "in_progress"
                assert created.request_counts.processing == ITEMS
                ended = wait_ended(client, created.id, timeout=1800)
                assert ended.request_counts.succeeded == ITEMS

                total = results_size(deployment.batch_dir / created.id / "results")
                before = rss_kib(worker)
                peak, count = before, 0
                for line in client.messages.batches.results(created.id):
                    assert line.result.type == "succeeded"
                    count += 1
                    if count % 250 == 0:
                        peak = max(peak, rss_kib(worker))
                after = rss_kib(worker)
            assert worker_pids(server) == [worker]  # the same process throughout
        finally:
            server.stop()
    assert count == ITEMS
    grown = (max(peak, after) - before) * 1024
    print(
        f"\nresults {total / 1e6:.1f} MB; worker RSS {before / 1024:.1f} MiB before, "
        f"{peak / 1024:.1f} MiB at most while streaming, {after / 1024:.1f} MiB after "
        f"(grew {grown / 1e6:.1f} MB)"
    )
    assert total > 30e6
    # Gathered in memory, the results would add their whole size (and more, as Python
    # objects); streamed, the worker holds a chunk of the index and a line at a time.
    assert grown < total / 5
