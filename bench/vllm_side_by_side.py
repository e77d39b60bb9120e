#!/usr/bin/env python3
"""The gateway in front of vLLM's chat completions against vLLM's own ``/v1/messages``: the
same requests to both, and per feature which of the two answers as Anthropic's API would,
then the time to first token each adds.

Run by hand (not a test) after ``scripts/vllm-server`` has installed vLLM (about 3 minutes,
most of it vLLM starting):

    .venv/bin/python bench/vllm_side_by_side.py [--rounds 7] [--vllm URL] [--ttft-only]

Everything listens on 127.0.0.1: one vLLM (SmolLM2-135M, started as tests/support/vllm.py
starts it, or the one at ``--vllm``) and gunicorn gateways (``dialect = "vllm"``) in front of
it. "native" is vLLM's ``/v1/messages`` asked directly, as a client pointed at vLLM would.

The time to first token is taken per phase (the response's headers, its first event, its first
token) for the gateway, the gateway without its prompt count (``quirks.tokenizer = ""``), vLLM's
/v1/messages and vLLM's chat completions, in interleaved rounds: see ``measure_ttft``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support")]

from servers import Gunicorn, free_port  # noqa: E402
from vllm import BUILD_HINT, VllmServer, start_gateway, vllm_command  # noqa: E402

MODEL = "smollm2"
COLORS = [{"role": "user", "content": "Name three colors."}]
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
OSLO = [{"role": "user", "content": "What is the weather in Oslo?"}]
HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
EVENTS = ["message_start", "content_block_start", "content_block_delta", "content_block_stop"]


def post(base: str, body: dict[str, Any], path: str = "/v1/messages") -> requests.Response:
    return requests.post(base + path, json=body, headers=HEADERS, timeout=300)


def sse(base: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """The stream's events (each ``data:`` parsed, its ``event:`` name kept) and the seconds
    to the first content_block_delta."""
    start = time.perf_counter()
    first = 0.0
    events: list[dict[str, Any]] = []
    name = ""
    with requests.post(
        base + "/v1/messages", json={**body, "stream": True}, headers=HEADERS, stream=True
    ) as response:
        for line in response.iter_lines():
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                event = json.loads(line[5:])
                event["_event"] = name
                if event.get("type") == "content_block_delta" and not first:
                    first = time.perf_counter() - start
                events.append(event)
    return events, first


def ask(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 20, "temperature": 0, "messages": COLORS, **extra}


# --- the checks: each returns (as Anthropic would?, what was seen) ---------------------------


def grammar(base: str) -> tuple[bool, str]:
    events, _ = sse(base, ask())
    kinds = [e["type"] for e in events]
    ok = kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    ok = ok and all(e["type"] == e["_event"] for e in events)
    message_id = events[0]["message"]["id"]
    ok = ok and message_id.startswith("msg_") and events[0]["message"]["content"] == []
    return ok, f"{len(events)} events, id {message_id[:16]}…"


def json_id(base: str) -> tuple[bool, str]:
    message = post(base, ask()).json()
    return message["id"].startswith("msg_"), message["id"][:20]


def stop_end_turn(base: str) -> tuple[bool, str]:
    message = post(base, ask(max_tokens=40)).json()
    return message["stop_reason"] == "end_turn", str(message["stop_reason"])


def stop_max_tokens(base: str) -> tuple[bool, str]:
    message = post(base, ask(max_tokens=3)).json()
    return message["stop_reason"] == "max_tokens", str(message["stop_reason"])


def stop_sequence(base: str) -> tuple[bool, str]:
    seen = []
    for stream in (False, True):
        body = ask(stop_sequences=["Blue"])
        if stream:
            events, _ = sse(base, body)
            delta = next(e for e in events if e["type"] == "message_delta")["delta"]
        else:
            delta = post(base, body).json()
        seen.append((delta.get("stop_reason"), delta.get("stop_sequence")))
    return all(s == ("stop_sequence", "Blue") for s in seen), f"json {seen[0]}, stream {seen[1]}"


def usage_start(base: str) -> tuple[bool, str]:
    counted = post(base, ask(), "/v1/messages/count_tokens").json().get("input_tokens")
    events, _ = sse(base, ask())
    start = events[0]["message"]["usage"]
    return start.get("input_tokens") == counted, f"message_start {start}, count {counted}"


def usage_cached(base: str) -> tuple[bool, str]:
    """The second of two equal prompts: vLLM's prefix cache serves it; Anthropic's usage would
    say so in cache_read_input_tokens (when the prompt is cached)."""
    long = [{"role": "user", "content": "Summarise: " + "the cat sat on the mat. " * 60}]
    post(base, ask(messages=long, max_tokens=2))
    usage = post(base, ask(messages=long, max_tokens=2)).json()["usage"]
    return bool(usage.get("cache_read_input_tokens")), json.dumps(usage)


def tool_streaming(base: str) -> tuple[bool, str]:
    body = ask(
        max_tokens=40,
        messages=OSLO,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    events, _ = sse(base, body)
    pieces = [
        e["delta"]["partial_json"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    ]
    starts = [e for e in events if e["type"] == "content_block_start"]
    use = [s["content_block"] for s in starts if s["content_block"]["type"] == "tool_use"]
    stop = next(e for e in events if e["type"] == "message_delta")["delta"]["stop_reason"]
    joined = "".join(pieces)
    ok = bool(use) and use[0]["input"] == {} and len(pieces) > 1 and stop == "tool_use"
    try:
        ok = ok and isinstance(json.loads(joined), dict)
    except ValueError:
        ok = False
    return (
        ok,
        f"{len(pieces)} pieces {joined!r}, stop {stop}, id {use[0]['id'][:14] if use else '-'}",
    )


def error_missing_max_tokens(base: str) -> tuple[bool, str]:
    response = post(base, {"model": MODEL, "messages": COLORS})
    body = response.json()
    ok = response.status_code == 400 and body.get("type") == "error"
    ok = ok and body.get("error", {}).get("type") == "invalid_request_error"
    return ok, f"{response.status_code} {json.dumps(body)[:90]}"


def error_overflow(base: str) -> tuple[bool, str]:
    response = post(base, ask(messages=[{"role": "user", "content": "word " * 2500}]))
    body = response.json()
    message = body.get("error", {}).get("message", "")
    ok = response.status_code == 400 and body.get("type") == "error"
    ok = ok and message.startswith("prompt is too long: 2531 tokens > 2048 maximum")
    return ok, f"{response.status_code} {message[:70]!r}"


def count_tokens(base: str) -> tuple[bool, str]:
    counted = post(base, ask(), "/v1/messages/count_tokens").json()
    exact = requests.post(
        VLLM_URL + "/tokenize", json={"model": MODEL, "messages": COLORS}, timeout=30
    ).json()["count"]
    return counted.get("input_tokens") == exact, f"{counted} (vLLM /tokenize: {exact})"


CHECKS: list[tuple[str, Callable[[str], tuple[bool, str]]]] = [
    ("event grammar, msg_ id (stream)", grammar),
    ("msg_ id (JSON)", json_id),
    ("stop_reason end_turn", stop_end_turn),
    ("stop_reason max_tokens", stop_max_tokens),
    ("stop_sequence named", stop_sequence),
    ("message_start input_tokens exact", usage_start),
    ("cache_read_input_tokens", usage_cached),
    ("tool input streamed as input_json_delta", tool_streaming),
    ("error shape (no max_tokens)", error_missing_max_tokens),
    ("overflow in Claude Code's words (exact N)", error_overflow),
    ("count_tokens exact", count_tokens),
]
VLLM_URL = ""


# --- time to first token ---------------------------------------------------------------------

Phases = dict[str, float]  # seconds from the request to each of PHASES
Side = Callable[[], Phases]
PHASES = ("headers", "first event", "first token")
NATIVE = "vLLM /v1/messages"


def timed(url: str, body: dict[str, Any], first_token: Callable[[dict[str, Any]], bool]) -> Phases:
    """One streamed request: seconds to the response's headers, to its first event and to its
    first token (the first event ``first_token`` accepts)."""
    start = time.perf_counter()
    phases: Phases = {}
    with requests.post(url, json=body, headers=HEADERS, stream=True, timeout=300) as response:
        phases["headers"] = time.perf_counter() - start
        for line in response.iter_lines():
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            now = time.perf_counter() - start
            phases.setdefault("first event", now)
            if "first token" not in phases and first_token(json.loads(line[5:])):
                phases["first token"] = now
    return phases


def anthropic_token(event: dict[str, Any]) -> bool:
    return event.get("type") == "content_block_delta"


def openai_token(chunk: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


def ttft_sides(gateway: str, uncounted: str, vllm: str) -> dict[str, Side]:
    """The same streamed prompt five ways: through the gateway (its prompt count asked of
    /tokenize beside the request, and, to isolate that count, a second gateway whose dialect
    has no tokenizer), to vLLM directly (its /v1/messages and its chat completions), and to
    vLLM's /v1/messages a second time, as a control."""
    body = {**ask(max_tokens=5), "stream": True}
    chat = {**body, "stream_options": {"include_usage": True}}
    native: Side = lambda: timed(vllm + "/v1/messages", body, anthropic_token)  # noqa: E731
    return {
        "gateway": lambda: timed(gateway + "/v1/messages", body, anthropic_token),
        "gateway, no count": lambda: timed(uncounted + "/v1/messages", body, anthropic_token),
        NATIVE: native,
        "vLLM chat": lambda: timed(vllm + "/v1/chat/completions", chat, openai_token),
        # The same as NATIVE: how far apart two identical sides come out is the run's noise.
        "vLLM /v1/messages again": native,
    }


def measure_ttft(sides: dict[str, Side], rounds: int) -> dict[str, list[Phases]]:
    """Interleaved: each round asks every side once, in an order that rotates, so that a
    machine that slows down or speeds up (others share it) weighs on every side alike. Timed
    one side after the other instead (all of one side's requests, then the other's), two
    sides that are the same server differed by up to 700 ms on the shared 2-core machine."""
    names = list(sides)
    for name in names:
        sides[name]()  # warm: the prefix cache and the connections
    seen: dict[str, list[Phases]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seen[name].append(sides[name]())
    return seen


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def report_ttft(seen: dict[str, list[Phases]], access_ttft: list[float]) -> None:
    rounds = len(next(iter(seen.values())))
    print()
    print(f"time to first token (ms), median of {rounds} interleaved rounds:")
    print()
    print("| side | headers | first event | first token | first token − vLLM's, per round |")
    print("|---|---|---|---|---|")
    native = seen[NATIVE]
    for name, rows in seen.items():
        medians = [ms(statistics.median(r[k] for r in rows)) for k in PHASES]
        gaps = [r["first token"] - n["first token"] for r, n in zip(rows, native, strict=True)]
        gap = f"{statistics.median(gaps) * 1000:+.0f}" if name != NATIVE else "-"
        print(f"| {name} | {' | '.join(medians)} | {gap} |")
    if access_ttft:
        print()
        print(f"the gateway's access log, ttft_ms median: {statistics.median(access_ttft):.0f}")


class RunningVllm:
    """A vLLM started elsewhere (``--vllm``): used as it is, left running."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.v1 = self.url + "/v1"

    def stop(self) -> None:
        pass


def start_vllm(directory: Path) -> VllmServer:
    port = free_port()
    command = vllm_command(port)
    if command is None:
        sys.exit(BUILD_HINT)
    return VllmServer(command, port, directory / "vllm.log")


def compare(sides: dict[str, str]) -> None:
    print(f"| feature | {' | '.join(sides)} |")
    print("|---|---|---|")
    for name, check in CHECKS:
        cells = []
        for base in sides.values():
            try:
                ok, seen = check(base)
            except Exception as exc:  # noqa: BLE001 - a broken answer is a finding
                ok, seen = False, f"{type(exc).__name__}: {exc}"[:90]
            cells.append(f"{'yes' if ok else 'NO'}: {seen}")
        print(f"| {name} | {' | '.join(cells)} |")


def main() -> None:
    global VLLM_URL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each side once)")
    parser.add_argument(
        "--vllm", metavar="URL", help="a vLLM already serving smollm2 (else one is started)"
    )
    parser.add_argument("--ttft-only", action="store_true", help="skip the feature table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        vllm = RunningVllm(args.vllm) if args.vllm else start_vllm(Path(tmp))
        gateways: list[Gunicorn] = []
        try:
            VLLM_URL = vllm.url
            gateway = start_gateway(vllm, Path(tmp), "gateway")
            gateways.append(gateway)
            if not args.ttft_only:
                compare({"gateway (chat)": gateway.url, "vLLM /v1/messages": vllm.url})
            uncounted = start_gateway(vllm, Path(tmp), "uncounted", quirks={"tokenizer": ""})
            gateways.append(uncounted)
            before = len(gateway.access_lines())
            seen = measure_ttft(ttft_sides(gateway.url, uncounted.url, vllm.url), args.rounds)
            time.sleep(0.5)  # the last access line is written as its stream closes
            lines = gateway.access_lines()[before + 1 :]  # after the warm-up request
            report_ttft(seen, [line["ttft_ms"] for line in lines if "ttft_ms" in line])
        finally:
            for server in gateways:
                server.stop()
            vllm.stop()


if __name__ == "__main__":
    main()
