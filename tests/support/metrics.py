"""Reading the gateway's /metrics text in tests, in process and under gunicorn alike."""

from __future__ import annotations

# The smallest Messages request, for tests about what a request leaves behind (its metrics,
# its access line) rather than what it asks.
BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry all of ``labels`` (any others too): a counter
    is split by labels a test does not care about, and by worker under gunicorn."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
