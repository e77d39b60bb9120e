"""What a backend's flavour of the OpenAI API accepts, as data the translators consult.

OpenAI itself rejects unknown parameters with a 400, while vLLM, llama.cpp and SGLang take extra
sampling fields; rather than guessing per request, each backend is declared with a dialect (a
preset) and optional per-field overrides ("quirks") in the config.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class Dialect:
    name: str = "generic"
    # Ask for a final usage chunk with stream_options.include_usage.
    stream_usage: bool = True
    # The backend accepts a top-level ``top_k`` (vLLM, llama.cpp, SGLang).
    top_k: bool = False
    # Which field carries the output cap.
    max_tokens_field: str = "max_tokens"
    # How many stop sequences the backend takes (OpenAI: 4); 0 means no limit.
    max_stop_sequences: int = 0
    # Send ``user`` (from metadata.user_id).
    user_field: bool = True
    # A trailing assistant message is continued: vLLM needs explicit flags for that.
    vllm_prefill: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens_field not in MAX_TOKENS_FIELDS:
            raise ValueError(f"max_tokens_field must be one of {', '.join(MAX_TOKENS_FIELDS)}")


DIALECTS: dict[str, Dialect] = {
    # Fields every OpenAI-compatible server understands; the safe default.
    "generic": Dialect(),
    "openai": Dialect(
        name="openai", max_tokens_field="max_completion_tokens", max_stop_sequences=4
    ),
    "vllm": Dialect(name="vllm", top_k=True, vllm_prefill=True),
    "sglang": Dialect(name="sglang", top_k=True),
    "llamacpp": Dialect(name="llamacpp", top_k=True),
    "ollama": Dialect(name="ollama"),
    "deepseek": Dialect(name="deepseek", user_field=False),
}
