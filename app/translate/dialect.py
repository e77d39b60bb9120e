"""What a backend's flavour of the OpenAI API accepts, as data the translators consult.

OpenAI itself rejects unknown parameters with a 400, while vLLM, llama.cpp and SGLang take extra
sampling fields; rather than guessing per request, each backend is declared with a dialect (a
preset) and optional per-field overrides ("quirks") in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# Each choice is declared once, as a Literal; the tuples that validation lists are derived.
MaxTokensField = Literal["max_tokens", "max_completion_tokens"]
MAX_TOKENS_FIELDS: tuple[MaxTokensField, ...] = get_args(MaxTokensField)
# How a backend switches thinking on and off:
#   chat_template_kwargs  {"chat_template_kwargs": {"enable_thinking": bool}}: vLLM, SGLang,
#                         llama.cpp; templates without the switch ignore it
#   reasoning_effort      {"reasoning_effort": "low"|"medium"|"high"|"none"}: OpenAI and Ollama
#                         reasoning models (others reject the field, so it is opt-in)
#   deepseek              {"thinking": {"type": "enabled"|"disabled"}}
#   none                  nothing is sent; the backend's default applies
ThinkingSwitch = Literal["none", "chat_template_kwargs", "reasoning_effort", "deepseek"]
THINKING_SWITCHES: tuple[ThinkingSwitch, ...] = get_args(ThinkingSwitch)
# Where earlier turns' thinking goes in assistant messages ("" = dropped).
ReasoningField = Literal["", "reasoning_content", "reasoning"]
REASONING_FIELDS: tuple[ReasoningField, ...] = get_args(ReasoningField)
Tokenizer = Literal["", "vllm", "llamacpp"]
TOKENIZERS: tuple[Tokenizer, ...] = get_args(Tokenizer)


@dataclass(frozen=True)
class Dialect:
    name: str = "generic"
    # Ask for a final usage chunk with stream_options.include_usage.
    stream_usage: bool = True
    # The backend accepts a top-level ``top_k`` (vLLM, llama.cpp, SGLang).
    top_k: bool = False
    # Which field carries the output cap.
    max_tokens_field: MaxTokensField = "max_tokens"
    # Clamp max_tokens to this (0: no cap); Claude Code asks for 32k-64k.
    max_tokens_cap: int = 0
    # The model's context window in tokens (0: unknown); max_tokens is clamped so that an
    # estimate of the prompt plus max_tokens fits, because vLLM rejects requests that do not.
    context_window: int = 0
    # How many stop sequences the backend takes (OpenAI: 4); 0 means no limit. Accepted for
    # configs that set it; the gateway now matches stop sequences itself and sends none.
    max_stop_sequences: int = 0
    # Send ``user`` (from metadata.user_id).
    user_field: bool = True
    # A trailing assistant message is continued: vLLM needs explicit flags for that.
    vllm_prefill: bool = False
    # The backend honours tool_choice (Ollama ignores it).
    tool_choice: bool = True
    # JSON-Schema keywords removed from tool input schemas (some backends' grammar compilers
    # reject them); applied at every depth.
    schema_drop_keys: tuple[str, ...] = ("$schema",)
    # Tool descriptions are cut to this many characters (0: no limit).
    max_description_chars: int = 0
    # Image parts accepted at all, and as http(s) URLs (Ollama takes data URLs only).
    images: bool = True
    image_urls: bool = True
    thinking: ThinkingSwitch = "none"
    reasoning_history: ReasoningField = ""
    # Split a leading <think>...</think> out of the answer text into a thinking block.
    think_tags: bool = False
    # Exact token counts for count_tokens from the backend's own tokenizer endpoint.
    tokenizer: Tokenizer = ""
    # Drop server tools and PDF documents (reported in a response header) instead of a 400.
    drop_unsupported: bool = False

    def __post_init__(self) -> None:
        for value, allowed, key in (
            (self.max_tokens_field, MAX_TOKENS_FIELDS, "max_tokens_field"),
            (self.thinking, THINKING_SWITCHES, "thinking"),
            (self.reasoning_history, REASONING_FIELDS, "reasoning_history"),
            (self.tokenizer, TOKENIZERS, "tokenizer"),
        ):
            if value not in allowed:
                choices = ", ".join(repr(a) for a in allowed)
                raise ValueError(f"{key}: must be one of {choices} (got {value!r})")


DIALECTS: dict[str, Dialect] = {
    # Fields every OpenAI-compatible server understands; the safe default.
    "generic": Dialect(),
    "openai": Dialect(
        name="openai",
        max_tokens_field="max_completion_tokens",
        max_stop_sequences=4,
    ),
    "vllm": Dialect(
        name="vllm",
        top_k=True,
        vllm_prefill=True,
        thinking="chat_template_kwargs",
        tokenizer="vllm",
    ),
    "sglang": Dialect(name="sglang", top_k=True, thinking="chat_template_kwargs"),
    "llamacpp": Dialect(
        name="llamacpp", top_k=True, thinking="chat_template_kwargs", tokenizer="llamacpp"
    ),
    "ollama": Dialect(name="ollama", tool_choice=False, image_urls=False),
    "deepseek": Dialect(
        name="deepseek",
        user_field=False,
        images=False,
        thinking="deepseek",
        reasoning_history="reasoning_content",
    ),
}
