#!/usr/bin/env python3
"""What Claude Code's attribution line costs a llama.cpp backend: time to first token of the
second of two Claude Code-shaped requests, with the gateway's normalisation (the default) and
with ``[translate] billing_header = "keep"``.

Claude Code opens its system prompt with ``x-anthropic-billing-header: ...; cch=<hex>;``,
whose ``cch`` changes on every request. Kept as is, it ends llama.cpp's prefix match a few
tokens in and the whole system prompt is evaluated again; normalised, the second request is
served from the cache but for its last token. Run by hand (not a test, no assertions), after
``scripts/llama-server`` has built the server:

    .venv/bin/python bench/prefix_cache.py                # ~2200-token prompt, 3 rounds, ~1 min
    .venv/bin/python bench/prefix_cache.py --rules 140    # ~5100 tokens, ~3 min

On 2 cores, 5143 tokens: 89 ms normalised against 24 s kept (llama.cpp evaluates a long
prompt at about 200 tokens a second on this CPU).

Everything listens on 127.0.0.1: one llama-server (SmolLM2-135M, one slot) and two gunicorn
gateways in front of it, one per mode.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support")]

from llama import BUILD_HINT, LlamaServer, llama_dir, start_gateway  # noqa: E402
from servers import Gunicorn  # noqa: E402

RULE = (
    "- Rule {i}: keep answers short, prefer editing existing files to creating new ones, never "
    "commit unless asked, and run the tests before saying a change is done."
)


def request(rules: int) -> dict:
    billing = (
        "x-anthropic-billing-header: cc_version=2.0.14; cc_entrypoint=cli; "
        f"cch={secrets.token_hex(3)[:5]};"
    )
    prompt = "You are Claude Code, Anthropic's official CLI for Claude.\n\n" + "\n".join(
        RULE.format(i=i) for i in range(1, rules + 1)
    )
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "system": [
            {"type": "text", "text": billing},
            {"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [{"role": "user", "content": "Say hello."}],
    }


def timed(url: str, body: dict) -> tuple[float, dict]:
    """Seconds to the first text delta, and the final usage (message_delta's)."""
    started = time.perf_counter()
    first = None
    usage: dict = {}
    with requests.post(url + "/v1/messages", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith(b"event: content_block_delta"):
                first = time.perf_counter() - started
            if line.startswith(b"data: ") and b'"message_delta"' in line:
                usage = json.loads(line[6:])["usage"]
    return (first if first is not None else time.perf_counter() - started), usage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rules", type=int, default=60, help="system prompt lines (~36 tokens each)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=8192, help="llama-server context (one slot)")
    args = parser.parse_args()
    home = llama_dir()
    if home is None:
        print(BUILD_HINT, file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="prefix-cache-"))
    server = LlamaServer(home, work / "llama.log", ctx=args.ctx, slots=1)
    gateways: dict[str, Gunicorn] = {}
    try:
        for mode in ("normalize", "keep"):
            gateways[mode] = start_gateway(server, work, mode, billing_header=mode)
        ttft: dict[str, list[float]] = {mode: [] for mode in gateways}
        cached: dict[str, list[int]] = {mode: [] for mode in gateways}
        prompt = 0
        for round_ in range(args.rounds):
            order = list(gateways) if round_ % 2 == 0 else list(reversed(gateways))
            for mode in order:
                timed(gateways[mode].url, request(args.rules))  # the first of the two
                seconds, usage = timed(gateways[mode].url, request(args.rules))
                ttft[mode].append(seconds)
                cached[mode].append(usage.get("cache_read_input_tokens") or 0)
                prompt = (usage.get("input_tokens") or 0) + cached[mode][-1]
        print(f"prompt: {prompt} tokens; second request of two, median of {args.rounds} rounds")
        print(f"{'billing_header':16} {'TTFT (ms)':>10} {'cached tokens':>14}")
        for mode in gateways:
            median_ms = statistics.median(ttft[mode]) * 1000
            print(f"{mode:16} {median_ms:10.1f} {statistics.median(cached[mode]):14.0f}")
        ratio = statistics.median(ttft["keep"]) / statistics.median(ttft["normalize"])
        print(f"keep / normalize: {ratio:.0f}x")
    finally:
        for gateway in gateways.values():
            gateway.stop()
        server.stop()
    print(f"logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
