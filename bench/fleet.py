#!/usr/bin/env python3
"""Routing strategies over two llama.cpp replicas of one model: what each costs Claude
Code-shaped sessions in time to first token and in prompt tokens evaluated again.

Eight sessions (a shared system prompt with Claude Code's attribution line, a per-project
memory file, a file's content added each turn) send each of their turns at the same time, turn
after turn, through real gunicorn (two gevent workers) to a route of two llama-servers
(SmolLM2-135M, one thread each, four slots). Per strategy, and for the reference with each
session pinned to one replica: follow-up turns' TTFT (median, p90), the prompt tokens the
replicas evaluated (their own ``llamacpp:prompt_tokens_total``) and the requests each replica
served. The replicas are started afresh for each strategy. Run by hand after
``scripts/llama-server`` (not a test, no assertions):

    .venv/bin/python bench/fleet.py                       # ~10 minutes on 2 cores
    .venv/bin/python bench/fleet.py --strategies affinity least_busy --workers 4
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support")]

from llama import BUILD_HINT, LlamaServer, llama_dir  # noqa: E402
from servers import Gunicorn  # noqa: E402

from app.config import API_KEYS_ENV, ENV_OVERRIDES  # noqa: E402

STRATEGIES = ("pinned", "failover", "weighted", "least_busy", "affinity")
SYSTEM = "You are Claude Code, Anthropic's official CLI for Claude.\n\n" + "\n".join(
    f"- Rule {i}: keep answers short, prefer editing existing files to creating new ones, "
    "never commit unless asked, and run the tests before saying a change is done."
    for i in range(1, 9)
)


def memory_file(session: int, run: str) -> str:
    return f"# CLAUDE.md of project {session}-{run}\n" + "\n".join(
        f"- project {session} convention {i}: module_{session}_{i} uses style {i % 3}"
        for i in range(6)
    )


def source_file(session: int, turn: int) -> str:
    return f"# file src/part_{turn}.py of project {session}\n" + "\n".join(
        f"value_{session}_{turn}_{i} = compute({i}, {session * turn})" for i in range(8)
    )


class Session:
    def __init__(self, index: int, run: str, model: str) -> None:
        self.index = index
        self.model = model
        opening = f"<system-reminder>\n{memory_file(index, run)}\n</system-reminder>\nHello."
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": opening}]

    def body(self) -> dict[str, Any]:
        billing = (
            "x-anthropic-billing-header: cc_version=2.1.197.3a3; cc_entrypoint=cli; "
            f"cch={secrets.token_hex(3)[:5]};"
        )
        return {
            "model": self.model,
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "system": [
                {"type": "text", "text": billing},
                {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}},
            ],
            "messages": self.messages,
            "metadata": {"user_id": json.dumps({"session_id": f"session-{self.index}"})},
        }

    def turn(self, url: str, turn: int) -> float:
        """One turn: its TTFT; the answer and the next file join the conversation."""
        started = time.perf_counter()
        first = None
        text = []
        with requests.post(url + "/v1/messages", json=self.body(), stream=True, timeout=900) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if first is None and line.startswith(b"event: content_block_delta"):
                    first = time.perf_counter() - started
                if line.startswith(b"data: ") and b'"text_delta"' in line:
                    text.append(json.loads(line[6:])["delta"]["text"])
        self.messages = self.messages + [
            {"role": "assistant", "content": "".join(text) or "ok"},
            {"role": "user", "content": f"Now this one:\n{source_file(self.index, turn)}"},
        ]
        return first if first is not None else time.perf_counter() - started


def config(path: Path, replicas: list[LlamaServer], strategy: str) -> Path:
    lines = []
    for i, replica in enumerate(replicas):
        lines += [
            "[[backends]]",
            f'name = "r{i}"',
            f'url = "{replica.v1}"',
            'dialect = "llamacpp"',
            "read_timeout = 900",
        ]
    targets = ", ".join(f'{{ backend = "r{i}" }}' for i in range(len(replicas)))
    if strategy == "pinned":
        for i in range(len(replicas)):
            lines += ["[[routes]]", f'name = "pin{i}"', f'match = "pin-{i}"', f'backend = "r{i}"']
    else:
        lines += [
            "[[routes]]",
            'name = "fleet"',
            'match = "*"',
            f'strategy = "{strategy}"',
            f"targets = [{targets}]",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def run(home: Path, work: Path, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    directory = work / strategy
    directory.mkdir()
    extra = ("-t", "1")
    replicas = [
        LlamaServer(home, directory / f"r{i}.log", ctx=4 * 1024, slots=4, extra=extra)
        for i in range(2)
    ]
    blank = {v: "" for v in (*ENV_OVERRIDES, API_KEYS_ENV) if v != "GATEWAY_STATE_DIR"}
    env = {
        **blank,
        "GATEWAY_CONFIG": str(config(directory / "gateway.toml", replicas, strategy)),
        "GATEWAY_WORKERS": str(args.workers),
    }
    gateway = Gunicorn(env, directory / "gateway.log")
    try:
        run_id = secrets.token_hex(3)
        sessions = [
            Session(i, run_id, f"pin-{i % 2}" if strategy == "pinned" else "claude-sonnet-4-6")
            for i in range(args.sessions)
        ]
        follow_ups: list[float] = []
        with ThreadPoolExecutor(len(sessions)) as pool:
            for turn in range(args.turns):
                ttfts = list(pool.map(lambda s, t=turn: s.turn(gateway.url, t), sessions))
                if turn:
                    follow_ups += ttfts
        evaluated = sum(int(r.metric("prompt_tokens_total")) for r in replicas)
        time.sleep(0.5)  # the last access lines
        served = [x.get("backend") for x in gateway.access_lines() if x["path"] == "/v1/messages"]
    finally:
        gateway.stop()
        for replica in replicas:
            replica.stop()
    return {
        "strategy": strategy,
        "ttft_median": statistics.median(follow_ups),
        "ttft_p90": percentile(follow_ups, 0.9),
        "evaluated": evaluated,
        "per_replica": [served.count(f"r{i}") for i in range(2)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    home = llama_dir()
    if home is None:
        print(BUILD_HINT, file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="fleet-"))
    results = []
    for strategy in args.strategies:
        results.append(run(home, work, strategy, args))
        print(json.dumps(results[-1]), flush=True)
    reference = next((r for r in results if r["strategy"] == "pinned"), None)
    print()
    print("| strategy | follow-up TTFT median | p90 | prompt tokens evaluated | per replica |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = ""
        if reference is not None and r is not reference:
            ttft = r["ttft_median"] / reference["ttft_median"]
            tokens = r["evaluated"] / reference["evaluated"]
            ratio = f" ({ttft:.2f}x / {tokens:.2f}x)"
        print(
            f"| {r['strategy']}{ratio} | {r['ttft_median']:.2f} s | {r['ttft_p90']:.2f} s "
            f"| {r['evaluated']:,} | {' / '.join(map(str, r['per_replica']))} |"
        )
    print(f"\nlogs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
