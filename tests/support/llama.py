"""llama.cpp's llama-server with SmolLM2-135M, for the real-backend tests and bench/prefix_cache.py.

``scripts/llama-server`` builds the server and fetches the model into ``.cache/llama/<version>/``
(about 9 minutes on 2 cores, once); without them the tier is skipped. Everything listens on
127.0.0.1 only.

What the servers are started with, and why:

- ``--jinja``: the model's chat template through llama.cpp's Jinja engine (tool calls need it);
  ``template="qwen2.5"`` replaces it with Qwen2.5-7B-Instruct's template from llama.cpp's own
  sources, which renders tools and parses ``<tool_call>`` blocks back into ``tool_calls``.
- ``-c CTX -np SLOTS``: the KV cache split evenly into SLOTS slots of CTX/SLOTS tokens each
  (``-np`` given, so ``--kv-unified`` stays off and each slot has its own fixed window);
  ``n_ctx`` in ``GET /slots`` is the per-slot size, the limit a prompt must fit.
- ``--no-repack``: no repacked weights, hence no AMX kernels. A ``GGML_NATIVE`` build on a CPU
  that reports AMX (``amx_tile``) but whose kernel or hypervisor does not enable the tile state
  dies with SIGSEGV in ``ggml_backend_amx_mul_mat`` (``ldtilecfg``) during the warm-up; the
  plain AVX-512 kernels are as fast for a 135M model.
- ``--metrics``: ``GET /metrics`` (token counters); ``GET /slots`` is on by default.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import requests
from servers import ROOT, Gunicorn, free_port, stop_process
from tier import gateway_config, start_configured
from waiting import wait_until_ready

SCRIPT = ROOT / "scripts" / "llama-server"
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATES = {"qwen2.5": "templates/Qwen-Qwen2.5-7B-Instruct.jinja"}
BUILD_HINT = "llama-server is not built: run scripts/llama-server (about 9 minutes on 2 cores)"


def llama_dir() -> Path | None:
    """Where scripts/llama-server put the server and the model, or None when it has not."""
    try:
        done = subprocess.run(
            [str(SCRIPT), "--path"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return Path(done.stdout.strip())


class LlamaServer:
    """One llama-server process on a free loopback port, ready (``/health`` 200) on return."""

    def __init__(
        self,
        directory: Path,
        log_path: Path,
        *,
        template: str | None = None,
        ctx: int = 2048,
        slots: int = 2,
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()  # a given port: a replica restarted where it was
        self.url = f"http://127.0.0.1:{self.port}"
        self.v1 = self.url + "/v1"
        self.log_path = log_path
        command = [
            str(directory / "bin" / "llama-server"),
            "-m", str(directory / MODEL),
            "--host", "127.0.0.1", "--port", str(self.port),
            "-c", str(ctx), "-np", str(slots),
            "--jinja", "--metrics", "--no-webui", "--no-repack",
            "-t", str(min(2, os.cpu_count() or 1)),
        ]  # fmt: skip
        if template:
            command += ["--chat-template-file", str(directory / TEMPLATES[template])]
        command += list(extra)
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_until_ready(  # 503 while the model loads
                lambda: requests.get(self.url + "/health", timeout=5).status_code == 200,
                "llama-server",
                process=self.process,
                log=log_path,
            )
        except BaseException:
            self.stop()
            raise

    # --- what llama.cpp itself says ---------------------------------------------------------

    def chat(self, payload: dict[str, Any]) -> requests.Response:
        """``POST /v1/chat/completions`` straight to the server (temperature 0 unless given)."""
        return requests.post(
            self.v1 + "/chat/completions", json={"temperature": 0, **payload}, timeout=120
        )

    def prompt_tokens(self, messages: list[dict[str, Any]], **extra: Any) -> int:
        """The prompt's size in tokens by llama.cpp's own template and tokenizer."""
        applied = requests.post(
            self.url + "/apply-template", json={"messages": messages, **extra}, timeout=30
        )
        applied.raise_for_status()
        tokens = requests.post(
            self.url + "/tokenize", json={"content": applied.json()["prompt"]}, timeout=30
        )
        tokens.raise_for_status()
        return len(tokens.json()["tokens"])

    def slots(self) -> list[dict[str, Any]]:
        response = requests.get(self.url + "/slots", timeout=5)
        response.raise_for_status()
        return response.json()

    def slot_context(self) -> int:
        """Tokens a prompt may have in one slot (every slot has the same window)."""
        return self.slots()[0]["n_ctx"]

    def metric(self, name: str) -> float:
        """One counter from ``GET /metrics`` (``llamacpp:<name>``)."""
        response = requests.get(self.url + "/metrics", timeout=5)
        response.raise_for_status()
        for line in response.text.splitlines():
            if line.startswith(f"llamacpp:{name} "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> None:
        stop_process(self.process)


ADMIN_TOKEN = "llama-tier-admin"


def start_gateway(
    backend: LlamaServer, directory: Path, name: str, protocol: str = "openai", **translate: str
) -> Gunicorn:
    """Real gunicorn (gevent worker) in front of ``backend``: the ``llamacpp`` dialect (or
    llama.cpp's own Anthropic endpoint with ``protocol="anthropic"``), and ``[translate]``
    settings when given; the rest as tier.gateway_config has it."""
    upstream = {"url": backend.v1, "dialect": "llamacpp", "protocol": protocol}
    config = gateway_config(directory / f"{name}.toml", upstream, ADMIN_TOKEN, translate=translate)
    return start_configured(config, directory / f"{name}.log")
