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
    .venv/bin/python bench/fleet.py --strategies pinned affinity least_busy --workers 4

A replica stopped mid-run (``--stop-after N --restart-after M``): replica r0 is killed
(SIGKILL, as a crash) once N turns are over (or ``--stop-delay`` seconds into turn N+1, with
requests in flight on it) and started again on its port once M turns are over, when
``--late-sessions`` new conversations join. The reference then knows the stop in advance: a
session pinned to r0 is pinned to r1 from the stop on (one full prefill each, the least a stop
can cost), and the late sessions are pinned alternately. Printed besides: the requests each
replica served before the stop, while it was down and after it came back, why the gateway
chose them (``routed``), and the errors the clients saw.

With ``--sample MS`` a thread reads, every MS milliseconds, the gateway's service-wide requests
in flight per replica (``/status``, the leases ``least_busy`` and ``affinity`` place by) and
each replica's own ``llamacpp:requests_processing`` + ``requests_deferred`` (``/metrics``),
and counts how often the two views would choose differently, and what each poll costs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support")]

from llama import BUILD_HINT, LlamaServer, llama_dir  # noqa: E402
from servers import Gunicorn  # noqa: E402

from app.config import API_KEYS_ENV, ENV_OVERRIDES  # noqa: E402

STRATEGIES = ("pinned", "failover", "weighted", "least_busy", "affinity")
PLACED = ("least_busy", "affinity")  # the strategies that take leases in the store
ADMIN = "fleet-bench-admin-token"
HIT_FACTOR = 1.5  # [routing] affinity_hit_factor's default, for the sampled bound
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


@dataclass
class Outcome:
    """One turn of one session, as its client saw it."""

    session: int
    turn: int
    follow_up: bool
    ttft: float | None = None
    error: str | None = None


class Session:
    def __init__(self, index: int, run: str, pin: int | None) -> None:
        self.index = index
        self.pin = pin  # the replica of a pinned session, None: the fleet route
        self.sent = 0  # turns answered
        opening = f"<system-reminder>\n{memory_file(index, run)}\n</system-reminder>\nHello."
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": opening}]

    def body(self) -> dict[str, Any]:
        billing = (
            "x-anthropic-billing-header: cc_version=2.1.197.3a3; cc_entrypoint=cli; "
            f"cch={secrets.token_hex(3)[:5]};"
        )
        return {
            "model": "claude-sonnet-4-6" if self.pin is None else f"pin-{self.pin}",
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

    def turn(self, url: str, turn: int) -> Outcome:
        """One turn: its TTFT, or the error the client saw (the conversation then stays as it
        was, and its next turn asks again, as a client would)."""
        outcome = Outcome(self.index, turn, follow_up=self.sent > 0)
        headers = {"x-request-id": f"fleet-t{turn}-s{self.index}-{secrets.token_hex(2)}"}
        started = time.perf_counter()
        text: list[str] = []
        try:
            with requests.post(
                url + "/v1/messages", json=self.body(), headers=headers, stream=True, timeout=900
            ) as r:
                if r.status_code != 200:
                    outcome.error = f"HTTP {r.status_code}: {r.text[:200]}"
                    return outcome
                for line in r.iter_lines():
                    if line.startswith(b"event: error"):
                        outcome.error = "error event"
                    if outcome.ttft is None and line.startswith(b"event: content_block_delta"):
                        outcome.ttft = time.perf_counter() - started
                    if line.startswith(b"data: ") and b'"text_delta"' in line:
                        text.append(json.loads(line[6:])["delta"]["text"])
        except requests.RequestException as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        if outcome.error is None:
            self.sent += 1
            self.messages = self.messages + [
                {"role": "assistant", "content": "".join(text) or "ok"},
                {"role": "user", "content": f"Now this one:\n{source_file(self.index, turn)}"},
            ]
            if outcome.ttft is None:
                outcome.ttft = time.perf_counter() - started
        return outcome


def config(path: Path, replicas: list[LlamaServer], strategy: str) -> Path:
    lines = [f'[admin]\ntoken = "{ADMIN}"\n']
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


# --- the replicas, one of which may be stopped and started again ------------------------------


class Replicas:
    def __init__(self, home: Path, directory: Path, args: argparse.Namespace) -> None:
        self.home = home
        self.directory = directory
        self.ctx = args.ctx
        self.restarts = 0
        self.servers = [self._start(i) for i in range(2)]
        self.evaluated_before_stop = 0  # a restarted replica's counters start again at zero
        self.down: int | None = None

    def _start(self, i: int, port: int | None = None) -> LlamaServer:
        log = self.directory / f"r{i}-{self.restarts}.log"
        return LlamaServer(self.home, log, ctx=self.ctx, slots=4, extra=("-t", "1"), port=port)

    def kill(self, i: int) -> None:
        """A crash: SIGKILL to the server, its last prompt counter kept first."""
        server = self.servers[i]
        try:
            self.evaluated_before_stop += int(server.metric("prompt_tokens_total"))
        except requests.RequestException:
            pass
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        self.down = i

    def restart(self) -> None:
        if self.down is None:
            return
        i, self.down = self.down, None
        self.restarts += 1
        self.servers[i] = self._start(i, port=self.servers[i].port)

    def evaluated(self) -> int:
        return self.evaluated_before_stop + sum(
            int(s.metric("prompt_tokens_total")) for s in self.servers
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


# --- the backends' own queue against the gateway's leases -------------------------------------


@dataclass
class Sample:
    at: float  # time.time()
    leases: list[int]  # the gateway's service-wide requests in flight per replica
    own: list[int]  # each replica's requests processing + deferred, by its /metrics
    processing: list[int]
    status_ms: float
    metrics_ms: list[float]


@dataclass
class Sampler:
    gateway: str
    replicas: Replicas
    interval: float
    samples: list[Sample] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.samples.append(self._sample())
            except (requests.RequestException, KeyError, ValueError):
                pass  # a replica is down: nothing to compare

    def _sample(self) -> Sample:
        at, started = time.time(), time.perf_counter()
        status = requests.get(
            self.gateway + "/status", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
        ).json()
        status_ms = (time.perf_counter() - started) * 1000
        leases = [status["backends"][f"r{i}"].get("service_in_flight", 0) for i in range(2)]
        own, processing, metrics_ms = [], [], []
        for server in self.replicas.servers:
            started = time.perf_counter()
            text = requests.get(server.url + "/metrics", timeout=10).text
            metrics_ms.append((time.perf_counter() - started) * 1000)
            values = {
                k: int(float(v))
                for k, v in (line.split() for line in text.splitlines() if line[:1] != "#")
            }
            busy = values["llamacpp:requests_processing"]
            processing.append(busy)
            own.append(busy + values["llamacpp:requests_deferred"])
        return Sample(at, leases, own, processing, status_ms, metrics_ms)


def within_bound(loads: list[int], k: int) -> bool:
    """The load bound of app/state/store.py ``choose`` for a prefix hit on replica ``k``."""
    return loads[k] + 1 <= math.ceil(HIT_FACTOR * (sum(loads) + 1) / len(loads) - 1e-9)


def least(loads: list[int]) -> set[int]:
    return {i for i, n in enumerate(loads) if n == min(loads)}


def compare(samples: list[Sample]) -> dict[str, Any]:
    """How often the replicas' own counts would have routed otherwise than the leases: the
    least loaded replica (a new conversation, a spill) and the bound (a prefix hit)."""
    busy = [s for s in samples if sum(s.leases) or sum(s.own)]
    if not busy:
        return {"samples": len(samples)}
    n = len(busy)
    return {
        "samples": len(samples),
        "busy_samples": n,
        "counts_differ": sum(s.leases != s.own for s in busy) / n,
        "leases_ahead": sum(sum(s.leases) > sum(s.own) for s in busy) / n,
        "own_ahead": sum(sum(s.own) > sum(s.leases) for s in busy) / n,
        "mean_abs_diff": statistics.mean(
            abs(a - b) for s in busy for a, b in zip(s.leases, s.own, strict=True)
        ),
        "least_differs": sum(least(s.leases) != least(s.own) for s in busy) / n,
        "least_flips": sum(
            len(least(s.leases)) == 1 == len(least(s.own)) and least(s.leases) != least(s.own)
            for s in busy
        )
        / n,
        "bound_differs": sum(
            any(within_bound(s.leases, k) != within_bound(s.own, k) for k in range(2)) for s in busy
        )
        / n,
        "deferred_seen": sum(
            a != b for s in busy for a, b in zip(s.own, s.processing, strict=True)
        ),
        "max_own": max(max(s.own) for s in busy),
        "status_ms_median": statistics.median(s.status_ms for s in samples),
        "metrics_ms_median": statistics.median(m for s in samples for m in s.metrics_ms),
        "metrics_ms_p90": percentile([m for s in samples for m in s.metrics_ms], 0.9),
        "metrics_ms_max": max(m for s in samples for m in s.metrics_ms),
    }


# --- one strategy's run -----------------------------------------------------------------------


def phase(turn: int, args: argparse.Namespace) -> str:
    if args.stop_after is None or turn < args.stop_after:
        return "before"
    if turn < args.restart_after:
        return "down"
    return "after"


def run(home: Path, work: Path, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    directory = work / strategy
    directory.mkdir()
    replicas = Replicas(home, directory, args)
    blank = {v: "" for v in (*ENV_OVERRIDES, API_KEYS_ENV) if v != "GATEWAY_STATE_DIR"}
    env = {
        **blank,
        "GATEWAY_CONFIG": str(config(directory / "gateway.toml", replicas.servers, strategy)),
        "GATEWAY_WORKERS": str(args.workers),
    }
    gateway = Gunicorn(env, directory / "gateway.log")
    sampled = args.sample and strategy in PLACED
    sampler = Sampler(gateway.url, replicas, args.sample / 1000) if sampled else None
    try:
        if sampler is not None:
            sampler.start()
        outcomes = turns(gateway.url, replicas, strategy, args)
        if sampler is not None:
            sampler.stopping.set()
        evaluated = replicas.evaluated()
        time.sleep(0.5)  # the last access lines
        lines = [x for x in gateway.access_lines() if x["path"] == "/v1/messages"]
    finally:
        gateway.stop()
        replicas.stop()
    follow_ups = [o.ttft for o in outcomes if o.follow_up and o.ttft is not None]
    result = {
        "strategy": strategy,
        "ttft_median": statistics.median(follow_ups),
        "ttft_p90": percentile(follow_ups, 0.9),
        "evaluated": evaluated,
        "per_replica": [sum(x.get("backend") == f"r{i}" for x in lines) for i in range(2)],
        "errors": [o.error for o in outcomes if o.error],
    }
    if args.stop_after is not None:
        result["phases"] = phases(lines, args)
    if sampler is not None:
        samples = [vars(x) for x in sampler.samples]
        (directory / "samples.json").write_text(json.dumps(samples))
        result["queue"] = compare(sampler.samples)
    return result


def turns(
    url: str,
    replicas: Replicas,
    strategy: str,
    args: argparse.Namespace,
) -> list[Outcome]:
    """Every session's turns, each turn's at once; the stop and the restart between them."""
    run_id = secrets.token_hex(3)
    pinned = strategy == "pinned"
    sessions = [Session(i, run_id, i % 2 if pinned else None) for i in range(args.sessions)]
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(args.sessions + args.late_sessions) as pool:
        for turn in range(args.turns):
            if turn == args.stop_after:
                stop(replicas, sessions, args)
            if turn == args.restart_after:
                replicas.restart()
                first = len(sessions)
                sessions += [
                    Session(first + i, run_id, (first + i) % 2 if pinned else None)
                    for i in range(args.late_sessions)
                ]
            outcomes += pool.map(lambda s, t=turn: s.turn(url, t), sessions)
    return outcomes


def stop(replicas: Replicas, sessions: list[Session], args: argparse.Namespace) -> None:
    """r0 dies now, or ``--stop-delay`` seconds into this turn; the reference's sessions on it
    move to r1 for good."""
    for session in sessions:
        if session.pin == 0:
            session.pin = 1
    if args.stop_delay:
        threading.Timer(args.stop_delay, replicas.kill, (0,)).start()
    else:
        replicas.kill(0)


def phases(lines: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Requests per replica and why, before the stop, while r0 was down and after."""
    found: dict[str, Any] = {"late_first_turns": [0, 0]}
    for line in lines:
        _, turn_id, session_id, _ = line["request_id"].split("-")
        turn, session = int(turn_id[1:]), int(session_id[1:])
        entry = found.setdefault(phase(turn, args), {"per_replica": [0, 0], "routed": {}})
        backend = line.get("backend")
        if backend in ("r0", "r1"):
            entry["per_replica"][int(backend[1])] += 1
            if session >= args.sessions and turn == args.restart_after:
                found["late_first_turns"][int(backend[1])] += 1
        reason = line.get("routed") or "-"
        entry["routed"][reason] = entry["routed"].get(reason, 0) + 1
    return found


# --- the whole bench --------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4 * 1024, help="per replica, 4 slots share it")
    parser.add_argument("--stop-after", type=int, help="kill r0 once this many turns are over")
    parser.add_argument("--stop-delay", type=float, default=0.0, help="seconds into the turn")
    parser.add_argument("--restart-after", type=int, help="start r0 again once this many are")
    parser.add_argument("--late-sessions", type=int, default=0, help="new ones at the restart")
    parser.add_argument("--sample", type=float, default=0, help="ms between queue samples")
    args = parser.parse_args()
    if args.stop_after is not None and args.restart_after is None:
        args.restart_after = args.turns
    if args.restart_after is not None and args.stop_after is None:
        parser.error("--restart-after needs --stop-after")
    return args


def table(results: list[dict[str, Any]]) -> None:
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
    for r in results:
        if "phases" in r:
            shown = {
                k: v if k == "late_first_turns" else v["per_replica"]
                for k, v in r["phases"].items()
            }
            print(f"{r['strategy']}: per replica {shown}, errors {len(r['errors'])}")


def main() -> int:
    args = parse()
    home = llama_dir()
    if home is None:
        print(BUILD_HINT, file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="fleet-"))
    results = []
    for strategy in args.strategies:
        results.append(run(home, work, strategy, args))
        print(json.dumps(results[-1]), flush=True)
    table(results)
    print(f"\nlogs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
