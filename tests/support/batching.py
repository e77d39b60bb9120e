"""Message batches under a real gunicorn: a config file with one backend and a ``[batches]``
table, the operator's CLI run against the same state, a batch's requests, and what the tests
read of the workers (their pids, their memory).

The gunicorn and the CLI must agree on where the state is: both get ``GATEWAY_CONFIG`` and
``GATEWAY_STATE_DIR`` from ``Deployment``, and a restarted gunicorn gets the same ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import requests
from servers import ROOT, Gunicorn
from waiting import eventually

ADMIN = "admin-token-batches-0123"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
MODEL = "claude-haiku-4-5"


@dataclass
class Deployment:
    """One service's config file and state directory, for as many gunicorns (one after the
    other) and CLI runs as a test needs."""

    directory: Path
    config: Path
    state: Path

    @classmethod
    def write(
        cls,
        directory: Path,
        backend_url: str,
        *,
        capacity: int,
        upstream: dict[str, Any] | None = None,
        **batches: Any,
    ) -> Deployment:
        upstream = {"url": backend_url, "capacity": capacity, **(upstream or {})}
        text = "[upstream]\n" + _table(upstream) + "[batches]\n" + _table(batches)
        text += f'[admin]\ntoken = "{ADMIN}"\n'
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "gateway.toml"
        config.write_text(text)
        return cls(directory, config, directory / "state")

    @property
    def env(self) -> dict[str, str]:
        return {"GATEWAY_CONFIG": str(self.config), "GATEWAY_STATE_DIR": str(self.state)}

    @property
    def batch_dir(self) -> Path:
        return self.state / "batches"

    def start(self, workers: int = 1, **env: str) -> Gunicorn:
        log = self.directory / f"gunicorn-{uuid.uuid4().hex[:6]}.log"
        return Gunicorn({**self.env, "GATEWAY_WORKERS": str(workers), **env}, log)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m app.batches ARGS`` as the operator runs it, with the service's
        environment."""
        return subprocess.run(
            [sys.executable, "-m", "app.batches", *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )


def _table(values: dict[str, Any]) -> str:
    lines = []
    for name, value in values.items():
        if isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, str):
            shown = f'"{value}"'
        else:
            shown = repr(value)
        lines.append(f"{name} = {shown}\n")
    return "".join(lines)


def sdk(server: Gunicorn, timeout: float = 120) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0, timeout=timeout)


def batch_requests(count: int, prefix: str = "batch-", max_tokens: int = 16) -> list[dict]:
    """``count`` requests; item ``i``'s custom_id is ``item-i`` and its prompt
    ``<prefix>i``, so the backend's record tells which item each request was."""
    return [
        {
            "custom_id": f"item-{i}",
            "params": {
                "model": MODEL,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"{prefix}{i}"}],
            },
        }
        for i in range(count)
    ]


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout: float) -> Any:
    """The batch once it has ended (polled as a client polls it)."""

    def ended() -> Any:
        batch = client.messages.batches.retrieve(batch_id)
        return batch if batch.processing_status == "ended" else None

    return eventually(ended, f"batch {batch_id} ended", timeout=timeout)


def worker_pids(server: Gunicorn) -> list[int]:
    """The master's children: its workers."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(child) for child in children)


def rss_kib(pid: int) -> int:
    """The process's resident memory now, from /proc (VmRSS, in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def service_in_flight(server: Gunicorn) -> dict[str, int]:
    """Each backend's interactive requests in flight across the service (/status)."""
    return _status_field(server, "service_in_flight")


def batch_in_flight(server: Gunicorn) -> dict[str, int]:
    """Each backend's batch items in flight across the service (/status)."""
    return _status_field(server, "batch_in_flight")


def _status_field(server: Gunicorn, field: str) -> dict[str, int]:
    backends = requests.get(f"{server.url}/status", headers=ADMIN_AUTH, timeout=30).json()
    return {name: backend[field] for name, backend in backends["backends"].items()}


def metrics_text(server: Gunicorn) -> str:
    return requests.get(f"{server.url}/metrics", timeout=30).text


def seconds_since(start: float) -> float:
    return round(time.monotonic() - start, 1)


def results(batches: Any, batch_id: str) -> list[Any]:
    """Every result line, the SDK's decoder closed after (it holds the connection)."""
    decoder = batches.results(batch_id)
    try:
        return list(decoder)
    finally:
        decoder.close()
