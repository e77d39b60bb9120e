#!/usr/bin/env python3
"""Benchmark the gateway against a fake OpenAI backend, run by hand (see bench/README.md).

Starts the fake backend (bench/fake_backend.mjs, pinned to core 1) and gunicorn with one gevent
worker (pinned to core 0), then drives the same work through the gateway and straight to the
backend with bench/loadgen.mjs (pinned to core 1), interleaved, over several rounds, and prints
a table of medians. Results go to bench/results/<timestamp>.json and .txt; gunicorn's stderr
(with the access log) to bench/results/<timestamp>-gateway.log.

    .venv/bin/python bench/run.py               # quick: about two minutes
    .venv/bin/python bench/run.py --long        # 5 rounds, three times the work per round
    .venv/bin/python bench/run.py --rev HEAD~3  # benchmark another revision (git archive)
    .venv/bin/python bench/run.py --profile 15  # py-spy profile of the worker under the (e) load

Standard library only; needs Linux (/proc, taskset), node (18+), a C compiler for the C floor
figures (optional) and, for --profile, py-spy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
HOST = "127.0.0.1"
# The client key the load generator sends: the gateway runs with client keys and limits on.
BENCH_KEY = "sk-bench-0123456789abcdef"

# Targets from the issue. (figure key, label, comparison, limit)
TARGETS = {
    "e_cpu_s_per_1000": ("<=", 0.8),
    "a_added_latency_ms": ("<=", 0.8),
    "b128_p99_over_p50": ("<=", 3.0),
    "c_cpu_us_per_chunk": ("<=", 25.0),
    "c_ttft_added_ms": ("<=", 1.0),
    "d_all_completed": ("==", True),
    "d_total_ratio": ("<=", 1.10),
    "d_rss_kb_per_stream": ("<=", 50.0),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        RESULTS.mkdir(exist_ok=True)
        self.gateway_log = RESULTS / f"{self.stamp}-gateway.log"
        self.backend_log = RESULTS / f"{self.stamp}-backend.log"
        self.procs: list[subprocess.Popen] = []
        self.tmpdir: str | None = None
        self.core_gw, self.core_load = args.cores
        self.node = shutil.which("node") or sys.exit("bench: node (18+) is needed")
        self.taskset = shutil.which("taskset") if not args.no_pin else None
        if not args.no_pin and not self.taskset:
            sys.exit("bench: taskset is needed (util-linux), or pass --no-pin")
        self.loadgen_busy: list[dict] = []
        self.floors: dict[str, dict] | None = None  # name -> pid, port (see start_floors)
        self.floor_dir: str | None = None
        self.idle_rss_kb: int | None = None

    # ------------------------------------------------------------------ processes
    def pin(self, core: int, cmd: list[str]) -> list[str]:
        return [self.taskset, "-c", str(core), *cmd] if self.taskset else cmd

    def app_dir(self) -> Path:
        if not self.args.rev:
            return Path(self.args.app_dir).resolve()
        self.tmpdir = tempfile.mkdtemp(prefix="gateway-bench-")
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", self.args.rev], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", self.tmpdir], input=archive, check=True)
        log(f"benchmarking {self.args.rev} exported to {self.tmpdir}")
        return Path(self.tmpdir)

    def start(self) -> None:
        # 500 streams need ~1000 descriptors in the worker and in the load generator.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        self.backend_port = self.args.backend_port or free_port()
        self.gateway_port = self.args.gateway_port or free_port()

        backend_err = open(self.backend_log, "wb")
        self.backend = subprocess.Popen(
            self.pin(
                self.core_load,
                [self.node, str(BENCH / "fake_backend.mjs"), "--port", str(self.backend_port)],
            ),
            stdout=subprocess.PIPE,
            stderr=backend_err,
        )
        self.procs.append(self.backend)
        line = self.backend.stdout.readline().decode()
        if not line.startswith("listening"):
            sys.exit(f"bench: the fake backend did not start (see {self.backend_log})")

        app_dir = self.app_dir()
        venv = Path(self.args.venv).resolve()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            GATEWAY_WORKERS="1",
            GATEWAY_BIND=f"{HOST}:{self.gateway_port}",
            GATEWAY_UPSTREAM_URL=f"http://{HOST}:{self.backend_port}/v1",
            GATEWAY_LOG_LEVEL=self.args.log_level,
            GATEWAY_WORKER_CONNECTIONS=str(self.args.worker_connections),
        )
        if not self.args.no_auth:
            env["GATEWAY_CONFIG"] = str(self.write_config())
        # The state store (limits, usage): its own SQLite directory per run, or a Redis of
        # the bench's own on the loopback (a revision before the store ignores both).
        env["GATEWAY_STATE_DIR"] = tempfile.mkdtemp(prefix="gateway-bench-state-")
        if self.args.state == "redis":
            env["GATEWAY_REDIS_URL"] = self.start_redis()
        env.update(item.split("=", 1) for item in self.args.env)
        self.gateway_err = open(self.gateway_log, "wb")
        self.master = subprocess.Popen(
            self.pin(
                self.core_gw,
                [str(venv / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            ),
            cwd=app_dir,
            env=env,
            stdout=self.gateway_err,
            stderr=self.gateway_err,
        )
        self.procs.append(self.master)
        deadline = time.monotonic() + 20
        while True:
            if self.master.poll() is not None:
                sys.exit(f"bench: gunicorn exited at start (see {self.gateway_log})")
            try:
                with urllib.request.urlopen(self.url("/healthz"), timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"bench: the gateway did not answer /healthz (see {self.gateway_log})")
            time.sleep(0.1)
        workers = children_of(self.master.pid)
        if len(workers) != 1:
            sys.exit(f"bench: expected one gunicorn worker, found {workers}")
        self.worker = workers[0]
        log(
            f"backend pid {self.backend.pid} on :{self.backend_port}, gunicorn master "
            f"{self.master.pid}, worker {self.worker} on :{self.gateway_port}"
        )

    def start_floors(self) -> dict[str, dict]:
        """Start the two byte forwarders on the gateway's core: bench/floor_proxy.c (built
        with cc; left out, with a log line, without one) and bench/floor_gevent.py (on the
        venv's gevent). Name -> {"pid", "port"}."""
        self.floors = {}
        venv_python = str(Path(self.args.venv).resolve() / "bin" / "python")
        commands = {"gevent": [venv_python, str(BENCH / "floor_gevent.py")]}
        exe = self.build_floor_proxy()
        if exe:
            commands = {"C": [exe], **commands}
        for name, command in commands.items():
            port = free_port()
            proc = subprocess.Popen(
                self.pin(self.core_gw, [*command, str(port), str(self.backend_port)]),
                stdout=subprocess.PIPE,
            )
            self.procs.append(proc)
            if proc.stdout.readline().decode().strip() != "listening":
                log(f"the {name} forwarder did not start: its floor figures are left out")
                continue
            self.floors[name] = {"pid": proc.pid, "port": port}
        return self.floors

    def build_floor_proxy(self) -> str | None:
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            log("no C compiler: the C floor figures are left out")
            return None
        self.floor_dir = tempfile.mkdtemp(prefix="gateway-bench-floor-")
        exe = str(Path(self.floor_dir) / "floor_proxy")
        made = subprocess.run(
            [cc, "-O2", "-o", exe, str(BENCH / "floor_proxy.c")], capture_output=True
        )
        if made.returncode != 0:
            log(
                "floor_proxy.c did not build, the C floor is left out: "
                + made.stderr.decode()[-300:]
            )
            return None
        return exe

    def write_config(self) -> Path:
        """Every feature on: a client key that every gateway request must carry, with a rate
        limit and a concurrency limit set far above what the bench sends, so that they are
        checked on every request and never refuse one. ``--token-limits`` adds token limits
        and budgets, as high (not understood by revisions before the state store)."""
        path = RESULTS / f"{self.stamp}-gateway.toml"
        digest = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
        tokens = (
            "input_tokens_per_minute = 6000000000\n"
            "output_tokens_per_minute = 6000000000\n"
            "tokens_per_day = 900000000000\n"
            "tokens_per_month = 9000000000000\n"
        )
        path.write_text(
            "[[auth.keys]]\n"
            'name = "bench"\n'
            f'sha256 = "{digest}"\n'
            "[limits]\n"
            "requests_per_minute = 60000000\n"
            "burst = 60000000\n"
            "max_concurrent = 100000\n" + (tokens if self.args.token_limits else "")
        )
        return path

    def start_redis(self) -> str:
        binary = shutil.which("redis-server") or sys.exit("bench: --state redis needs redis-server")
        port = free_port()
        proc = subprocess.Popen(
            self.pin(
                self.core_load,
                [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    return f"redis://{HOST}:{port}/0"
            except OSError:
                time.sleep(0.05)
        sys.exit("bench: redis-server did not start")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for path in (self.tmpdir, self.floor_dir):
            if path:
                shutil.rmtree(path, ignore_errors=True)

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.gateway_port}{path}"

    # ------------------------------------------------------------------ checks
    def smoke(self) -> None:
        """One JSON and one streamed request through the gateway, before measuring anything."""
        for stream in (False, True):
            body = json.dumps(
                {
                    "model": "claude-bench",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream,
                }
            ).encode()
            headers = {"Content-Type": "application/json"}
            if not self.args.no_auth:
                headers["x-api-key"] = BENCH_KEY
            req = urllib.request.Request(self.url("/v1/messages"), data=body, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    text = r.read().decode()
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace")
                kind = "streamed" if stream else "JSON"
                sys.exit(
                    f"bench: the gateway answered {exc.code} to a {kind} request: {text[:300]}\n"
                    f"(see {self.gateway_log})"
                )
            if stream:
                ok = "event: message_stop" in text and text.count("content_block_delta") >= 5
            else:
                ok = '"type":"message"' in text and "Hello from the bench backend" in text
            if not ok:
                sys.exit(f"bench: unexpected gateway answer: {text[:300]}")
        if not self.args.no_auth:
            self.check_auth_is_on()

    def check_auth_is_on(self) -> None:
        """The figures are for a gateway with client keys on: a request without one is a 401."""
        req = urllib.request.Request(
            self.url("/v1/messages"), data=b"{}", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        if status != 401:
            sys.exit(f"bench: a request without a client key got {status}, not 401")

    def check_worker(self) -> None:
        workers = children_of(self.master.pid)
        if workers != [self.worker]:
            raise SystemExit(
                f"bench: the gunicorn worker changed ({self.worker} -> {workers}); it was "
                f"restarted mid-run, the numbers would mix two processes (see {self.gateway_log})"
            )

    # ------------------------------------------------------------------ load generator
    def target(self, kind: str) -> dict:
        port = self.gateway_port if kind == "gateway" else self.backend_port
        target = {"kind": kind, "host": HOST, "port": port}
        if kind == "gateway" and not self.args.no_auth:
            target["api_key"] = BENCH_KEY
        return target

    def loadgen(self, spec: dict) -> dict:
        spec.setdefault("pids", {"worker": self.worker, "backend": self.backend.pid})
        timeout = spec["timeout_s"] + 15
        proc = subprocess.run(
            self.pin(self.core_load, [self.node, str(BENCH / "loadgen.mjs"), json.dumps(spec)]),
            capture_output=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise SystemExit(f"bench: loadgen failed: {proc.stderr.decode()[-2000:]}")
        self.check_worker()
        result = json.loads(proc.stdout)
        cpu = result.get("cpu")
        target = spec.get("target", {}).get("kind")
        if cpu and target == "gateway":
            self.loadgen_busy.append(
                {
                    "phase": spec["label"],
                    "core_gateway_busy": cpu["core_busy"].get(str(self.core_gw)),
                    "core_load_busy": cpu["core_busy"].get(str(self.core_load)),
                    "core_gateway_irq": cpu["core_irq"].get(str(self.core_gw)),
                    "core_load_irq": cpu["core_irq"].get(str(self.core_load)),
                    "loadgen_cpu_frac": cpu["loadgen_cpu_s"] / cpu["wall_s"],
                    "backend_cpu_frac": cpu.get("backend_cpu_s", 0) / cpu["wall_s"],
                    "worker_cpu_frac": cpu.get("worker_cpu_s", 0) / cpu["wall_s"],
                }
            )
        return result

    def order(self, rnd: int) -> list[str]:
        """Interleave: the gateway goes first in even rounds, the backend in odd ones."""
        return ["gateway", "direct"] if rnd % 2 == 0 else ["direct", "gateway"]

    # ------------------------------------------------------------------ phases
    def warmup(self) -> None:
        for kind in ("gateway", "direct"):
            self.loadgen(
                {
                    "label": "warmup",
                    "phase": "load",
                    "target": self.target(kind),
                    "concurrency": 16,
                    "count": 3000,
                    "duration_s": 1.0,
                    "warmup": True,
                    "max_tokens": 16,
                    "timeout_s": 20,
                }
            )
            self.loadgen(
                {
                    "label": "warmup",
                    "phase": "stream",
                    "target": self.target(kind),
                    "concurrency": 8,
                    "count": 16,
                    "duration_s": 5,
                    "warmup": True,
                    "max_tokens": 200,
                    "expect_chunks": 200,
                    "timeout_s": 20,
                }
            )

    def phase_a(self, rounds: int) -> dict:
        n = int(300 * self.args.scale)
        per_round = []
        for r in range(rounds):
            res = self.loadgen(
                {
                    "label": "a",
                    "phase": "latency",
                    "targets": [self.target(k) for k in self.order(r)],
                    "count": n,
                    "warmup": 20,
                    "max_tokens": 16,
                    "duration_s": 20 * self.args.scale,
                    "timeout_s": 30 * self.args.scale,
                }
            )
            res["added_p50_ms"] = res["gateway"]["p50"] - res["direct"]["p50"]
            per_round.append(res)
            log(
                f"(a) round {r + 1}: gateway p50 {res['gateway']['p50']:.3f} ms, direct "
                f"{res['direct']['p50']:.3f} ms, errors {res['gateway']['errors']}"
            )
        return {
            "rounds": per_round,
            "gateway_p50_ms": median([x["gateway"]["p50"] for x in per_round]),
            "gateway_p99_ms": median([x["gateway"]["p99"] for x in per_round]),
            "direct_p50_ms": median([x["direct"]["p50"] for x in per_round]),
            "direct_p99_ms": median([x["direct"]["p99"] for x in per_round]),
            "added_latency_ms": median([x["added_p50_ms"] for x in per_round]),
            "errors": sum(x["gateway"]["errors"] + x["direct"]["errors"] for x in per_round),
        }

    def phase_b(self, rounds: int, concurrency: int) -> dict:
        per = {"gateway": [], "direct": []}
        for r in range(rounds):
            for kind in self.order(r):
                res = self.loadgen(
                    {
                        "label": f"b{concurrency}",
                        "phase": "load",
                        "target": self.target(kind),
                        "concurrency": concurrency,
                        "count": int(200_000 * self.args.scale),
                        "duration_s": self.args.duration,
                        "warmup": True,
                        "max_tokens": 16,
                        "timeout_s": self.args.duration + 30,
                    }
                )
                per[kind].append(res)
            g = per["gateway"][-1]
            log(
                f"(b) c={concurrency} round {r + 1}: gateway {g['rps']:.0f} req/s p50 "
                f"{g['latency_ms']['p50']:.1f} ms p99 {g['latency_ms']['p99']:.1f} ms, "
                f"direct {per['direct'][-1]['rps']:.0f} req/s, errors {g['errors']}"
            )
        out = {"rounds": per}
        for kind, runs in per.items():
            out[kind] = {
                "rps": median([x["rps"] for x in runs]),
                "p50_ms": median([x["latency_ms"]["p50"] for x in runs]),
                "p99_ms": median([x["latency_ms"]["p99"] for x in runs]),
                "errors": sum(x["errors"] for x in runs),
            }
        out["gateway"]["p99_over_p50"] = median(
            [x["latency_ms"]["p99"] / x["latency_ms"]["p50"] for x in per["gateway"]]
        )
        out["gateway"]["cpu_s_per_1000"] = median(
            [1000 * x["cpu"]["worker_cpu_s"] / x["completed"] for x in per["gateway"]]
        )
        return out

    def phase_c(self, rounds: int) -> dict:
        chunks, delay = self.args.chunks, self.args.chunk_delay_ms
        max_tokens = delay * 10000 + chunks
        seq = int(10 * self.args.scale)
        per = {"gateway": [], "direct": []}
        cpu_runs: list[dict] = []
        burst_runs: list[dict] = []
        floors = self.floors if self.floors is not None else self.start_floors()
        floor_runs = {name: {"paced": [], "burst": []} for name in floors}
        for r in range(rounds):
            for kind in self.order(r):
                per[kind].append(
                    self.loadgen(
                        {
                            "label": "c-ttft",
                            "phase": "stream",
                            "target": self.target(kind),
                            "concurrency": 1,
                            "count": seq,
                            "duration_s": 60 * self.args.scale,
                            "warmup": True,
                            "max_tokens": max_tokens,
                            "expect_chunks": chunks,
                            "timeout_s": 90 * self.args.scale,
                        }
                    )
                )
            # CPU per relayed chunk, over many streams: paced as the TTFT streams are, and (the
            # issue gives (c) no pacing) back to back; the same through the byte forwarders.
            cpu_runs.append(self.chunk_cpu("c-cpu", max_tokens, chunks))
            burst_runs.append(self.chunk_cpu("c-cpu-burst", chunks, chunks))
            for name in floors:
                for key, tokens in (("paced", max_tokens), ("burst", chunks)):
                    run = self.chunk_cpu(f"c-floor-{name}-{key}", tokens, chunks, floor=name)
                    floor_runs[name][key].append(run["cpu_us_per_chunk"])
            g, d = per["gateway"][-1], per["direct"][-1]
            log(
                f"(c) round {r + 1}: ttft gateway {g['ttft_ms']['p50']:.2f} ms direct "
                f"{d['ttft_ms']['p50']:.2f} ms; total {g['latency_ms']['p50']:.1f} / "
                f"{d['latency_ms']['p50']:.1f} ms; {cpu_runs[-1]['cpu_us_per_chunk']:.1f} µs/chunk"
            )
        out = {"chunks": chunks, "delay_ms": delay, "rounds": per, "cpu_rounds": cpu_runs}
        for kind, runs in per.items():
            out[kind] = {
                "ttft_p50_ms": median([x["ttft_ms"]["p50"] for x in runs]),
                "total_p50_ms": median([x["latency_ms"]["p50"] for x in runs]),
                "completed": sum(x["completed"] for x in runs),
                "issued": sum(x["issued"] for x in runs),
            }
        out["ttft_added_ms"] = median(
            [
                g["ttft_ms"]["p50"] - d["ttft_ms"]["p50"]
                for g, d in zip(per["gateway"], per["direct"], strict=True)
            ]
        )
        out["cpu_us_per_chunk"] = median([x["cpu_us_per_chunk"] for x in cpu_runs])
        out["burst_rounds"] = burst_runs
        out["burst_cpu_us_per_chunk"] = median([x["cpu_us_per_chunk"] for x in burst_runs])
        out["cpu_failed"] = sum(x["issued"] - x["completed"] for x in cpu_runs + burst_runs)
        out["floors"] = {
            name: {key: median(values) for key, values in runs.items()}
            for name, runs in floor_runs.items()
        }
        out["floor_rounds"] = floor_runs
        out["cold"] = self.cold_factor()
        return out

    def cold_factor(self) -> dict | None:
        """bench/cold_factor.py on the gateway's core: the same Python work hot and 1 ms apart."""
        venv_python = str(Path(self.args.venv).resolve() / "bin" / "python")
        done = subprocess.run(
            self.pin(self.core_gw, [venv_python, str(BENCH / "cold_factor.py")]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            log(f"cold_factor.py failed: {done.stderr[-300:]}")
            return None
        return json.loads(done.stdout)

    def chunk_cpu(self, label: str, max_tokens: int, chunks: int, floor: str = "") -> dict:
        """Worker CPU per relayed chunk over 64 streams, 8 at a time, through the gateway, or
        through one of the forwarders (``floor``), whose process is then the one measured."""
        if floor:
            forwarder = self.floors[floor]
            target = {"kind": "direct", "host": HOST, "port": forwarder["port"]}
            pids = {"worker": forwarder["pid"], "backend": self.backend.pid}
        else:
            target, pids = self.target("gateway"), None
        spec = {
            "label": label,
            "phase": "stream",
            "target": target,
            "concurrency": 8,
            "count": int(64 * self.args.scale),
            "duration_s": 60 * self.args.scale,
            "warmup": True,
            "max_tokens": max_tokens,
            "expect_chunks": chunks,
            "timeout_s": 90 * self.args.scale,
        }
        if pids:
            spec["pids"] = pids
        run = self.loadgen(spec)
        run["cpu_us_per_chunk"] = per_chunk(run)
        return run

    def phase_d(self, rounds: int, chunks: int) -> dict:
        n, delay = self.args.streams, 20
        # The worker's RSS before its first (d) round: a later (d) starts with the heap the
        # earlier one grew, and would measure nothing against its own start.
        idle = self.idle_rss_kb
        per = {"gateway": [], "direct": []}
        floors = self.floors if self.floors is not None else self.start_floors()
        floor_runs: dict[str, list[float]] = {name: [] for name in floors}

        def spec_for(target: dict) -> dict:
            return {
                "label": "d",
                "phase": "stream",
                "target": target,
                "concurrency": n,
                "all_at_once": True,
                "count": n,
                "duration_s": 60,
                "warmup": False,
                "max_tokens": delay * 10000 + chunks,
                "expect_chunks": chunks,
                "timeout_s": 60 + chunks * delay / 1000,
            }

        for r in range(rounds):
            for kind in self.order(r):
                spec = spec_for(self.target(kind))
                if kind == "gateway":
                    time.sleep(0.3)  # let the previous round's sockets settle
                    spec["rss_pid"] = self.worker
                    spec["rss_interval_ms"] = 10
                res = self.loadgen(spec)
                if kind == "gateway":
                    if idle is None:
                        idle = self.idle_rss_kb = res["rss"]["idle_kb"]
                    res["rss_kb_per_stream"] = (res["rss"]["peak_kb"] - idle) / n
                    res["cpu_us_per_chunk"] = per_chunk(res)
                per[kind].append(res)
            # The same streams through each byte forwarder: its CPU per chunk under this load.
            for name, forwarder in floors.items():
                spec = spec_for({"kind": "direct", "host": HOST, "port": forwarder["port"]})
                spec["pids"] = {"worker": forwarder["pid"], "backend": self.backend.pid}
                floor_runs[name].append(per_chunk(self.loadgen(spec)))
            g, d = per["gateway"][-1], per["direct"][-1]
            log(
                f"(d) round {r + 1}: gateway {g['completed']}/{n} in {g['elapsed_s']:.2f} s, "
                f"direct {d['completed']}/{n} in {d['elapsed_s']:.2f} s, "
                f"RSS peak {g['rss']['peak_kb']} kB (idle {idle} kB), "
                f"{g['cpu_us_per_chunk']:.1f} µs/chunk"
            )
        out = {"streams": n, "chunks": chunks, "delay_ms": delay, "idle_rss_kb": idle}
        out["rounds"] = per
        for kind, runs in per.items():
            out[kind] = {
                "completed_min": min(x["completed"] for x in runs),
                "total_s": median([x["elapsed_s"] for x in runs]),
                "ttft_p50_ms": median([x["ttft_ms"]["p50"] for x in runs]),
                "ttft_p99_ms": median([x["ttft_ms"]["p99"] for x in runs]),
                "errors": sum(x["errors"] + x["incomplete"] for x in runs),
            }
        out["all_completed"] = all(x["completed"] == n for x in per["gateway"])
        pairs = zip(per["gateway"], per["direct"], strict=True)
        out["total_ratio"] = median([g["elapsed_s"] / d["elapsed_s"] for g, d in pairs])
        out["rss_kb_per_stream"] = median([x["rss_kb_per_stream"] for x in per["gateway"]])
        out["rss_peak_kb"] = max(x["rss"]["peak_kb"] for x in per["gateway"])
        out["cpu_us_per_chunk"] = median([x["cpu_us_per_chunk"] for x in per["gateway"]])
        out["floors"] = {name: {"slow": median(v)} for name, v in floor_runs.items() if v}
        out["floor_rounds"] = floor_runs
        return out

    def e_spec(self, count: int, duration: float) -> dict:
        return {
            "label": "e",
            "phase": "load",
            "target": self.target("gateway"),
            "concurrency": 16,
            "count": count,
            "duration_s": duration,
            "warmup": True,
            "max_tokens": 16,
            "timeout_s": duration + 30,
        }

    def phase_e(self, rounds: int) -> dict:
        runs = []
        for r in range(rounds):
            res = self.loadgen(self.e_spec(int(3000 * self.args.scale), 30 * self.args.scale))
            res["cpu_s_per_1000"] = 1000 * res["cpu"]["worker_cpu_s"] / max(1, res["completed"])
            runs.append(res)
            log(
                f"(e) round {r + 1}: {res['completed']} requests, worker "
                f"{res['cpu']['worker_cpu_s']:.2f} CPU-s -> {res['cpu_s_per_1000']:.3f} per 1000"
            )
        return {
            "rounds": runs,
            "cpu_s_per_1000": median([x["cpu_s_per_1000"] for x in runs]),
            "backend_cpu_s_per_1000": median(
                [1000 * x["cpu"]["backend_cpu_s"] / max(1, x["completed"]) for x in runs]
            ),
            "errors": sum(x["errors"] for x in runs),
        }

    # ------------------------------------------------------------------ profile
    def profile(self, seconds: int) -> dict:
        py_spy = shutil.which("py-spy") or str(Path(self.args.venv) / "bin" / "py-spy")
        if not Path(py_spy).exists():
            sys.exit("bench: py-spy not found; pip install -r bench/requirements.txt")
        raw = RESULTS / f"{self.stamp}-profile.txt"
        cmd = self.pin(
            self.core_load,
            [
                py_spy, "record", "-p", str(self.worker), "--rate", str(self.args.profile_rate),
                "--duration", str(seconds), "--format", "raw", "-o", str(raw),
            ],
        )  # fmt: skip
        log(f"profiling worker {self.worker} for {seconds} s: {' '.join(cmd)}")
        spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # py-spy attaches
        if self.args.profile_load == "stream":
            chunks = self.args.chunks
            spec = {
                "label": "profile-stream",
                "phase": "stream",
                "target": self.target("gateway"),
                "concurrency": 8,
                "count": 10_000_000,
                "duration_s": seconds + 1.5,
                "warmup": True,
                "max_tokens": self.args.chunk_delay_ms * 10000 + chunks,
                "expect_chunks": chunks,
                "timeout_s": seconds + 30,
            }
        else:
            spec = self.e_spec(10_000_000, seconds + 1.5)
        res = self.loadgen(spec)
        try:
            out, _ = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            out, _ = spy.communicate()
        if spy.returncode != 0 or not raw.exists():
            sys.exit(f"bench: py-spy failed: {out.decode()[-1500:]}")
        top = top_frames(raw.read_text(), self.args.top)
        top["load"] = {
            "requests": res["completed"],
            "rps": res["rps"],
            "cpu_s_per_1000": 1000 * res["cpu"]["worker_cpu_s"] / max(1, res["completed"]),
        }
        top["raw_file"] = str(raw)
        return top

    # ------------------------------------------------------------------ gateway log
    def log_summary(self) -> dict:
        counts: Counter[str] = Counter()
        samples = []
        with open(self.gateway_log, errors="replace") as fh:
            for line in fh:
                if not line.startswith("{"):
                    if "[ERROR]" in line or "[CRITICAL]" in line or "WORKER TIMEOUT" in line:
                        counts["gunicorn_errors"] += 1
                        if len(samples) < 5:
                            samples.append(line.strip()[:300])
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if "request_id" in entry and "method" in entry:
                    counts["access_lines"] += 1
                    if entry.get("status", 0) >= 400 or entry.get("error"):
                        counts["error_responses"] += 1
                    if entry.get("client_disconnected"):
                        counts["client_disconnected"] += 1
                elif entry.get("level") in ("error", "critical", "warning"):
                    counts[f"log_{entry['level']}"] += 1
                    if len(samples) < 5:
                        samples.append(line.strip()[:300])
        return {"counts": dict(counts), "samples": samples, "file": str(self.gateway_log)}


# ---------------------------------------------------------------------- profile parsing
_LINE = re.compile(r":\d+\)$")


def _frame_name(frame: str) -> str:
    """'fn (path/file.py:123)' -> 'fn (file-ish path)' without the line number."""
    frame = _LINE.sub(")", frame.strip())
    frame = re.sub(r"\(/.*?/site-packages/", "(", frame)
    frame = re.sub(r"\(/.*?/lib/python3\.\d+/", "(stdlib/", frame)
    frame = frame.replace(f"({REPO}/", "(")
    frame = re.sub(r"\(/tmp/gateway-bench-[^/]+/", "(", frame)
    return frame


def _idle_wait(frames: list[str]) -> bool:
    """A gevent threadpool thread parked on its queue's lock: blocked, not running.

    py-spy cannot always tell a thread blocked in ``lock.acquire`` from a running one, so these
    samples would otherwise show up as a third of the profile.
    """
    return frames[0].startswith("_WorkerGreenlet.run ") and frames[-1].split(" ")[0] in (
        "acquire_with_timeout",
        "_Condition.wait",
        "Queue.get",
        "lock.acquire",
    )


def _package(frame: str) -> str:
    """'fn (requests/sessions.py)' -> 'requests'; 'fn (stdlib/logging/x.py)' -> 'stdlib logging'."""
    m = re.search(r"\(([^()]*)\)$", frame)
    path = m.group(1) if m else frame
    parts = path.split("/")
    if parts[0] == "stdlib" and len(parts) > 1:
        return "stdlib " + parts[1].removesuffix(".py")
    if parts[0].startswith("<"):
        return parts[0]
    return parts[0].removesuffix(".py")


def top_frames(raw: str, n: int) -> dict:
    """Inclusive and self sample counts per function from py-spy's collapsed-stack output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if _idle_wait(frames):
            idle += c
            continue
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            inclusive[f] += c
    packages: Counter[str] = Counter()
    for f, c in own.items():
        packages[_package(f)] += c
    pct = (lambda v: 100.0 * v / total) if total else (lambda v: 0.0)
    return {
        "self_by_package": [(f, c, round(pct(c), 1)) for f, c in packages.most_common(n)],
        "samples": total,
        "idle_thread_samples": idle,
        "inclusive": [(f, c, round(pct(c), 1)) for f, c in inclusive.most_common(n)],
        "self": [(f, c, round(pct(c), 1)) for f, c in own.most_common(n)],
    }


def format_profile(top: dict) -> str:
    lines = [
        f"py-spy profile of the worker under the (e) load: {top['samples']} samples "
        f"(+{top['idle_thread_samples']} of an idle threadpool thread, left out), "
        f"{top['load']['requests']} requests ({top['load']['rps']:.0f} req/s, "
        f"{top['load']['cpu_s_per_1000']:.3f} CPU-s per 1000); raw stacks: {top['raw_file']}",
        "",
        "Top frames by inclusive time (the function or anything it calls):",
    ]
    lines += [f"  {p:5.1f}%  {c:6d}  {f}" for f, c, p in top["inclusive"]]
    lines += ["", "Top frames by self time (the function's own code):"]
    lines += [f"  {p:5.1f}%  {c:6d}  {f}" for f, c, p in top["self"]]
    lines += ["", "Self time by package (where the worker's CPU goes):"]
    lines += [f"  {p:5.1f}%  {c:6d}  {f}" for f, c, p in top["self_by_package"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------- table
def verdict(key: str, value) -> str:
    if value is None:
        return "n/a"
    op, limit = TARGETS[key]
    ok = value == limit if op == "==" else value <= limit
    return "PASS" if ok else "FAIL"


def fmt(v, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, spec)


def per_chunk(run: dict) -> float:
    """The measured process's CPU (µs) per chunk relayed in a load generator run: all of it,
    so a stream's start counts against its chunks."""
    return 1e6 * run["cpu"]["worker_cpu_s"] / max(1, run["chunks"])


def floor_note(floors: dict[str, dict] | None, key: str) -> str:
    """The byte forwarders' CPU per chunk, the floors the gateway's figure is read against."""
    parts = [f"{name} {values[key]:.1f}" for name, values in (floors or {}).items() if values[key]]
    return f"forwarders: {', '.join(parts)} µs" if parts else ""


def build_table(res: dict) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []
    a, c, e = res.get("a"), res.get("c"), res.get("e")

    def row(name, gw, direct, delta, target, status):
        rows.append((name, gw, direct, delta, target, status))

    if a:
        row(
            "(a) c=1 latency p50 / p99 (ms)",
            f"{fmt(a['gateway_p50_ms'], '.3f')} / {fmt(a['gateway_p99_ms'], '.3f')}",
            f"{fmt(a['direct_p50_ms'], '.3f')} / {fmt(a['direct_p99_ms'], '.3f')}",
            f"{a['added_latency_ms']:+.3f} ms",
            "added <= 0.8 ms",
            verdict("a_added_latency_ms", a["added_latency_ms"]),
        )
    for conc in (32, 128):
        b = res.get(f"b{conc}")
        if not b:
            continue
        g, dr = b["gateway"], b["direct"]
        row(
            f"(b) c={conc} throughput (req/s)",
            fmt(g["rps"], ".0f"),
            fmt(dr["rps"], ".0f"),
            f"{fmt(g['rps'] / dr['rps'] if dr['rps'] else None, '.2f')}x",
            "",
            "",
        )
        row(
            f"(b) c={conc} p50 / p99 (ms)",
            f"{fmt(g['p50_ms'], '.1f')} / {fmt(g['p99_ms'], '.1f')}",
            f"{fmt(dr['p50_ms'], '.1f')} / {fmt(dr['p99_ms'], '.1f')}",
            f"p99/p50 {fmt(g['p99_over_p50'], '.2f')}",
            "p99 <= 3x p50" if conc == 128 else "",
            verdict("b128_p99_over_p50", g["p99_over_p50"]) if conc == 128 else "",
        )
        row(
            f"(b) c={conc} worker CPU-s / 1000 req", fmt(g["cpu_s_per_1000"], ".3f"), "", "", "", ""
        )
    if c:
        g, dr = c["gateway"], c["direct"]
        label = f"{c['chunks']}-chunk stream, {c['delay_ms']} ms apart"
        row(
            f"(c) TTFT p50 (ms), {label}",
            fmt(g["ttft_p50_ms"], ".3f"),
            fmt(dr["ttft_p50_ms"], ".3f"),
            f"{c['ttft_added_ms']:+.3f} ms",
            "within 1 ms",
            verdict("c_ttft_added_ms", c["ttft_added_ms"]),
        )
        row(
            "(c) stream total p50 (ms)",
            fmt(g["total_p50_ms"], ".1f"),
            fmt(dr["total_p50_ms"], ".1f"),
            f"{g['total_p50_ms'] - dr['total_p50_ms']:+.1f} ms",
            "",
            "",
        )
        row(
            f"(c) worker CPU per relayed chunk (µs), {c['delay_ms']} ms apart",
            fmt(c["cpu_us_per_chunk"], ".1f"),
            "",
            floor_note(c.get("floors"), "paced"),
            "<= 25 µs",
            verdict("c_cpu_us_per_chunk", c["cpu_us_per_chunk"]),
        )
        row(
            "(c) worker CPU per relayed chunk (µs), back to back",
            fmt(c.get("burst_cpu_us_per_chunk"), ".1f"),
            "",
            floor_note(c.get("floors"), "burst"),
            "<= 25 µs",
            verdict("c_cpu_us_per_chunk", c.get("burst_cpu_us_per_chunk")),
        )
    for d in res.get("d") or []:
        g, dr = d["gateway"], d["direct"]
        n = d["streams"]
        seconds = d["chunks"] * d["delay_ms"] / 1000
        row(
            f"(d) {n} streams x {d['chunks']} chunks, 20 ms: done",
            f"{g['completed_min']}/{n}",
            f"{dr['completed_min']}/{n}",
            "",
            "all complete",
            verdict("d_all_completed", d["all_completed"]),
        )
        row(
            f"(d) total time (s), {seconds:g} s streams",
            fmt(g["total_s"], ".2f"),
            fmt(dr["total_s"], ".2f"),
            f"{fmt(d['total_ratio'], '.2f')}x",
            "<= 1.10x",
            verdict("d_total_ratio", d["total_ratio"]),
        )
        row(
            f"(d) TTFT p50 / p99 under load (ms), {seconds:g} s streams",
            f"{fmt(g['ttft_p50_ms'], '.0f')} / {fmt(g['ttft_p99_ms'], '.0f')}",
            f"{fmt(dr['ttft_p50_ms'], '.0f')} / {fmt(dr['ttft_p99_ms'], '.0f')}",
            "",
            "",
            "",
        )
        row(
            f"(d) worker CPU per relayed chunk (µs), {seconds:g} s streams",
            fmt(d.get("cpu_us_per_chunk"), ".1f"),
            "",
            floor_note(d.get("floors"), "slow"),
            "<= 25 µs",
            verdict("c_cpu_us_per_chunk", d.get("cpu_us_per_chunk")),
        )
        row(
            f"(d) RSS per open stream (KB), {seconds:g} s streams",
            fmt(d["rss_kb_per_stream"], ".1f"),
            "",
            f"idle {d['idle_rss_kb'] / 1024:.1f} MB, peak {d['rss_peak_kb'] / 1024:.1f} MB",
            "<= 50 KB",
            verdict("d_rss_kb_per_stream", d["rss_kb_per_stream"]),
        )
    if e:
        row(
            "(e) worker CPU-s per 1000 requests",
            fmt(e["cpu_s_per_1000"], ".3f"),
            "",
            "",
            "<= 0.8",
            verdict("e_cpu_s_per_1000", e["cpu_s_per_1000"]),
        )

    head = ("Figure (median of rounds)", "Gateway", "Direct", "Delta", "Target", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    sep = "  "
    out = [sep.join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    out.append(sep.join("-" * w for w in widths))
    out += [sep.join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)


def load_side_note(busy: list[dict], core_gw: int, core_load: int) -> tuple[str, list[str]]:
    """Per phase, how busy both cores were while the gateway was measured, and by whom.

    "other" is core time not charged to our processes: other programs on the machine, and
    kernel work not charged to any process; "irq" is the part of it spent in interrupts and
    softirqs, mostly loopback networking (the TCP receive path runs in the sender's softirq).
    """
    warnings: list[str] = []
    if not busy:
        return "", warnings
    lines = [
        f"Core use while the gateway was measured, max over the phase's runs (core {core_gw}: "
        f"gateway worker; core {core_load}: load generator + fake backend; other = anything "
        "else, irq = the part of it in (soft)irqs, mostly loopback TCP):"
    ]
    phases: dict[str, list[dict]] = {}
    for b in busy:
        phases.setdefault(b["phase"], []).append(b)
    for phase, runs in phases.items():
        if phase == "warmup":
            continue
        worker = max(r["worker_cpu_frac"] for r in runs)
        gw_other = max((r["core_gateway_busy"] or 0) - r["worker_cpu_frac"] for r in runs)
        load = max(r["loadgen_cpu_frac"] + r["backend_cpu_frac"] for r in runs)
        ld_other = max(
            (r["core_load_busy"] or 0) - r["loadgen_cpu_frac"] - r["backend_cpu_frac"] for r in runs
        )
        gw_irq = max(r.get("core_gateway_irq") or 0 for r in runs)
        ld_irq = max(r.get("core_load_irq") or 0 for r in runs)
        lines.append(
            f"  {phase:7s} core {core_gw}: worker {worker:4.0%}, other {max(gw_other, 0):4.0%} "
            f"(irq {gw_irq:3.0%})   core {core_load}: loadgen+backend {load:4.0%}, "
            f"other {max(ld_other, 0):4.0%} (irq {ld_irq:3.0%})"
        )
        if gw_other > 0.15:
            warnings.append(
                f"phase {phase}: up to {gw_other:.0%} of core {core_gw} went to something other "
                "than the gateway worker (another process?): rerun on a quiet machine"
            )
        if load > 0.8:
            warnings.append(
                f"phase {phase}: load generator + backend used {load:.0%} of core {core_load}: "
                "they may have limited the gateway's numbers"
            )
        elif load + ld_other - ld_irq > 0.95:
            warnings.append(
                f"phase {phase}: core {core_load} was saturated ({ld_other:.0%} by other work): "
                "the load side may have been slowed; rerun on a quiet machine"
            )
    return "\n".join(lines), warnings


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds per figure (>= 3; default 3)")
    p.add_argument(
        "--duration", type=float, default=2.0, help="seconds per (b) run and target (default 2)"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the request counts of (a), (c), (e) (default 1)",
    )
    p.add_argument(
        "--long", action="store_true", help="5 rounds, --duration 5, --scale 3 (about 6 minutes)"
    )
    p.add_argument("--only", default="abcde", help="figures to run, e.g. 'ce' (default abcde)")
    p.add_argument("--chunks", type=int, default=200, help="(c) chunks per stream (default 200)")
    p.add_argument(
        "--chunk-delay-ms",
        type=int,
        default=1,
        help="(c) backend delay between chunks in ms, 0 = back to back (default 1)",
    )
    p.add_argument("--streams", type=int, default=500, help="(d) concurrent streams (default 500)")
    p.add_argument(
        "--slow-chunks",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[200, 50],
        help="(d) chunks per slow stream, 20 ms apart, one (d) per value (default 200,50: the "
        "(c) stream, ~4 s, and a short one, ~1 s)",
    )
    p.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=10,
        metavar="SECONDS",
        help="only profile the worker with py-spy under the (e) load (default 10 s)",
    )
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples/s (default 250)")
    p.add_argument(
        "--profile-load",
        choices=("json", "stream"),
        default="json",
        help="what load to profile under: the (e) JSON requests or (c)-style streams",
    )
    p.add_argument("--top", type=int, default=25, help="profile frames to list (default 25)")
    p.add_argument("--app-dir", default=str(REPO), help="gateway checkout to run (default: repo)")
    p.add_argument("--rev", help="benchmark this git revision instead (exported to a temp dir)")
    p.add_argument("--venv", default=str(REPO / ".venv"), help="venv with gunicorn (default .venv)")
    p.add_argument("--log-level", default="info", help="GATEWAY_LOG_LEVEL (default info)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the gateway, e.g. GATEWAY_PING_INTERVAL=0 (repeatable)",
    )
    p.add_argument(
        "--worker-connections",
        type=int,
        default=1000,
        help="GATEWAY_WORKER_CONNECTIONS (default 1000)",
    )
    p.add_argument("--gateway-port", type=int, default=0)
    p.add_argument("--backend-port", type=int, default=0)
    p.add_argument(
        "--cores",
        type=int,
        nargs=2,
        default=(0, 1),
        metavar=("GATEWAY", "LOAD"),
        help="cores for the gateway and for load generator + backend (default 0 1)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument(
        "--state",
        choices=("sqlite", "redis"),
        default="sqlite",
        help="the state store: SQLite in a fresh directory, or a Redis the bench starts on "
        "the load generator's core (default sqlite)",
    )
    p.add_argument(
        "--token-limits",
        action="store_true",
        help="give the key token limits and budgets too (set far above the load)",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="run the gateway without client keys and limits (default: a key with limits)",
    )
    args = p.parse_args(argv)
    if args.long:
        args.rounds, args.duration, args.scale = max(args.rounds, 5), max(args.duration, 5.0), 3.0
    if args.rounds < 3:
        p.error("--rounds must be at least 3: every figure is a median of rounds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: v for k, v in vars(args).items()},
        "host": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
    }
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "app"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        results["revision"] = args.rev or (rev + (" + uncommitted app/ changes" if dirty else ""))
    except OSError:
        pass

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()
    text = ""
    try:
        bench.start()
        bench.smoke()
        results["pids"] = {
            "master": bench.master.pid,
            "worker": bench.worker,
            "backend": bench.backend.pid,
        }
        log("warming up")
        bench.warmup()
        if args.profile:
            top = bench.profile(args.profile)
            results["profile"] = top
            text = format_profile(top)
        else:
            rounds = args.rounds
            if "a" in args.only:
                results["a"] = bench.phase_a(rounds)
            if "b" in args.only:
                results["b32"] = bench.phase_b(rounds, 32)
                results["b128"] = bench.phase_b(rounds, 128)
            if "c" in args.only:
                results["c"] = bench.phase_c(rounds)
            if "d" in args.only:
                results["d"] = [bench.phase_d(rounds, n) for n in args.slow_chunks]
            if "e" in args.only:
                results["e"] = bench.phase_e(rounds)
            text = build_table(results)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.stop()
        results["elapsed_s"] = round(time.monotonic() - t0, 1)

    note, warnings = load_side_note(bench.loadgen_busy, *args.cores)
    results["load_side"] = bench.loadgen_busy
    results["gateway_log"] = bench.log_summary()
    counts = results["gateway_log"]["counts"]
    for key in ("error_responses", "gunicorn_errors", "log_error", "client_disconnected"):
        if counts.get(key):
            warnings.append(f"gateway log: {counts[key]} {key.replace('_', ' ')}")
    phases = [results.get(k, {}) for k in ("b32", "b128")] + results.get("d", [])
    failed = sum(results.get(k, {}).get("errors", 0) for k in ("a", "e")) + sum(
        p.get("gateway", {}).get("errors", 0) for p in phases
    )
    if "c" in results:
        c = results["c"]
        failed += c["gateway"]["issued"] - c["gateway"]["completed"] + c["cpu_failed"]
    if failed:
        warnings.append(f"{failed} gateway requests failed or streams were incomplete")
    results["warnings"] = warnings

    header = (
        f"Gateway benchmark {bench.stamp} ({results.get('revision', '?')}), one gevent worker on "
        f"core {args.cores[0]}, load generator + fake backend on core {args.cores[1]}; "
        + (f"py-spy for {args.profile} s" if args.profile else f"{args.rounds} rounds")
        + f"; {results['elapsed_s']:.0f} s"
    )
    cold = results.get("c", {}).get("cold")
    if cold:
        text += (
            f"\n\nThis core ran the same small piece of Python in {cold['hot_us']:.1f} µs in a "
            f"tight loop and in {cold['paced_us']:.1f} µs once per millisecond "
            f"({cold['factor']:.1f}x, bench/cold_factor.py): a paced chunk pays that on every "
            "wake-up."
        )
    report = "\n".join(
        [
            header,
            "",
            text,
            "",
            note,
            "",
            f"Gateway log: {counts.get('access_lines', 0)} access lines, {bench.gateway_log}",
        ]
        + (["", "Warnings:"] + [f"  - {w}" for w in warnings] if warnings else [])
    )
    print(report)
    (RESULTS / f"{bench.stamp}.json").write_text(json.dumps(results, indent=1, default=str))
    (RESULTS / f"{bench.stamp}.txt").write_text(report + "\n")
    log(f"results: {RESULTS / bench.stamp}.json / .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
