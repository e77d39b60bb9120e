"""What the gateway's own request for a batch item carries, apart from its body."""

from __future__ import annotations

from dataclasses import dataclass

# The WSGI environ key of a batch item's request. Only the runner sets it: a client's headers
# arrive as HTTP_* keys and cannot.
ENVIRON_KEY = "gateway.batch_item"


@dataclass(frozen=True)
class BatchItem:
    owner: str  # the name of the key that created the batch: the item runs as that key
    batch_id: str
    custom_id: str
    backend: str | None  # the backend with room for it; None: the item fails before any
