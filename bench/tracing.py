#!/usr/bin/env python3
"""What OpenTelemetry tracing costs a /v1/messages request: worker CPU per 1000 JSON requests
((e) of bench/run.py; with --only ce also per relayed chunk, (c)), with tracing off, on at 100%
and at 10% sampling, and on with the collector black-holed (it accepts connections and never
answers). A request's spans are per request, not per chunk: (e) is where they show.

Each setup is one bench/run.py run with the OTEL_* variables passed to the gateway (--env);
the setups take turns, in a different order each turn, and the medians are compared with the
"off" run, so the ratios come from one invocation on one machine. The collector is this
script's own: an OTLP/HTTP sink on 127.0.0.1 that reads each export and answers 200 without
decoding it (it counts what it got, to show the spans went out), or a socket that never
answers.

    .venv/bin/python bench/tracing.py              # 3 turns of 4 runs, about 10 minutes
    .venv/bin/python bench/tracing.py --times 5 --only ce --venv /path/to/venv
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
FIGURES = {
    "e": ("(e) CPU-s per 1000 JSON requests", lambda r: r["e"]["cpu_s_per_1000"]),
    "c": ("(c) CPU per relayed chunk, 1 ms apart (µs)", lambda r: r["c"]["cpu_us_per_chunk"]),
}


class Sink:
    """An OTLP/HTTP collector that accepts everything at once."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.exports += 1
                sink.bytes += len(data)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class BlackHole:
    """A collector that accepts connections and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.held.append(conn)


def setups(sink: Sink, hole: BlackHole) -> dict[str, dict[str, str]]:
    on = {"OTEL_SERVICE_NAME": "gateway-bench"}
    return {
        "off": {},
        "on, 100%": {**on, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url},
        "on, 10%": {
            **on,
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
        "black-holed": {**on, "OTEL_EXPORTER_OTLP_ENDPOINT": hole.url},
    }


def run_once(env: dict[str, str], venv: str, only: str) -> dict:
    """One bench/run.py run of figures ``only`` with ``env`` for the gateway; its results."""
    command = [sys.executable, str(BENCH / "run.py"), "--only", only, "--venv", venv]
    for item in env.items():
        command += ["--env", "=".join(item)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    out = done.stdout + done.stderr
    line = next(x for x in reversed(out.splitlines()) if "results:" in x)
    path = line.split("results:", 1)[1].split(" / ")[0].strip()
    return json.loads(Path(path).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=3, help="turns (default 3)")
    parser.add_argument("--venv", default=str(REPO / ".venv"), help="venv with gunicorn")
    parser.add_argument("--only", default="e", help="bench/run.py figures: e or ce (default e)")
    args = parser.parse_args()
    figures = {title: pick for key, (title, pick) in FIGURES.items() if key in args.only}
    sink, hole = Sink(), BlackHole()
    runs = setups(sink, hole)
    values: dict[str, dict[str, list[float]]] = {s: {f: [] for f in figures} for s in runs}
    for turn in range(args.times):
        order = list(runs)
        shift = turn % len(order)
        order = order[shift:] + order[:shift]
        for name in order:
            exports = sink.exports
            result = run_once(runs[name], args.venv, args.only)
            for figure, pick in figures.items():
                values[name][figure].append(pick(result))
            sent = sink.exports - exports
            print(f"turn {turn + 1}: {name} done ({sent} exports)", file=sys.stderr, flush=True)
    print(f"sink: {sink.exports} exports, {sink.bytes} bytes; black hole: {len(hole.held)} conns")
    names = list(runs)
    title = f"figure (median of {args.times} runs)"
    print(f"{title:44}" + "".join(f"{n:>13}" for n in names))
    for figure in figures:
        medians = [statistics.median(values[n][figure]) for n in names]
        print(f"{figure:44}" + "".join(f"{m:13.3f}" for m in medians))
        ratios = "".join(f"{m / medians[0]:13.3f}" for m in medians)
        print(f"{'  ratio to off':44}{ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
