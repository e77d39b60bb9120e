"""The prompt's token count for ``message_start``, asked of the backend's tokenizer beside the
request itself.

Anthropic puts the real input count in ``message_start``, and clients read it there (older
SDKs, context-size displays). A backend only reports usage at the end of a stream, so where
the dialect has a tokenizer endpoint (vLLM, llama.cpp) the count runs in a thread of its own
(a greenlet in the gevent worker) from the moment the request goes out, and the stream's start
waits for it briefly; otherwise, or if it is late or fails, the estimate stands. Never 0 for a
prompt that has text.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from app.backends.client import BackendClient
from app.translate.tokens import estimate_prompt_tokens

# How long message_start may wait for the count once the backend has answered.
WAIT = 1.0
# A backend whose tokenizer failed is not asked again for this long (per worker).
RETRY_AFTER = 300.0
_failed: dict[str, float] = {}  # backend name -> when its tokenizer may be asked again


class PromptCount:
    __slots__ = ("request_id", "payload", "exact", "thread")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.payload: dict[str, Any] | None = None  # the last attempt's, for the estimate
        self.exact: int | None = None
        self.thread: threading.Thread | None = None

    def start(self, client: BackendClient, payload: dict[str, Any]) -> None:
        """Called with each backend attempt's payload just before it is sent."""
        if client.config.protocol == "anthropic":
            return  # its own message_start carries the count
        self.payload = payload
        if not client.config.dialect.tokenizer or self.thread is not None:
            return
        if _failed.get(client.name, 0.0) > time.monotonic():
            return
        self.thread = threading.Thread(
            target=self._count, args=(client, payload), name="prompt-count", daemon=True
        )
        self.thread.start()

    def _count(self, client: BackendClient, payload: dict[str, Any]) -> None:
        self.exact = client.count_tokens(payload, self.request_id)
        if self.exact is None:  # no tokenizer there after all, or a broken one
            _failed[client.name] = time.monotonic() + RETRY_AFTER

    def get(self) -> int:
        """The exact count if it arrives within ``WAIT``, else the estimate."""
        if self.thread is not None:
            self.thread.join(WAIT)
        if self.exact is not None:
            return self.exact
        return max(estimate_prompt_tokens(self.payload), 1) if self.payload is not None else 0
