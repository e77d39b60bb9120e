"""How much slower this machine runs a small piece of Python when it runs once per millisecond,
with the core idle in between, than when it runs in a tight loop.

A relayed chunk that arrives alone is such a piece of work: the worker sleeps, wakes for it,
and sleeps again. Caches, branch predictors and (on a virtual machine) the host's scheduling
all start cold, and the same instructions take several times as long as they do hot. The
factor printed here says how much of the gap between the (c) paced and back-to-back figures
belongs to the machine rather than to the gateway. Standard library only.

    python bench/cold_factor.py        -> {"hot_us": ..., "paced_us": ..., "factor": ...}
"""

from __future__ import annotations

import json
import statistics
import sys
import time

# A chunk's worth of work in the shape of the relay's: parse an OpenAI chunk, build an event,
# serialise it and frame it for chunked transfer encoding.
CHUNK = (
    b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1795597426,'
    b'"model":"claude-bench","choices":[{"index":0,"delta":{"content":"tk1 "},'
    b'"finish_reason":null}]}'
)


def work() -> bytes:
    chunk = json.loads(CHUNK)
    text = chunk["choices"][0]["delta"]["content"]
    event = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }
    data = b"event: content_block_delta\ndata: " + json.dumps(event).encode() + b"\n\n"
    return b"%X\r\n%s\r\n" % (len(data), data)


def timed(runs: int, gap: float) -> float:
    """Median seconds per ``work()``, with ``gap`` seconds of sleep before each."""
    samples = []
    for _ in range(runs):
        if gap:
            time.sleep(gap)
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    timed(runs, 0)  # warm up
    hot = timed(runs, 0)
    paced = timed(runs, 0.001)
    print(json.dumps({"hot_us": hot * 1e6, "paced_us": paced * 1e6, "factor": paced / hot}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
