"""The Responses API's stored responses (``store``, ``previous_response_id``, ``GET /v1/responses/{id}``): a bounded
in-memory store, least recently used out first.

    store = ResponseStore(max_responses=1024, max_bytes=64 * 2**20)
    store.put(StoredResponse(response, messages))   # the answer as sent, and the conversation it ends
    store.get("resp_...")                           # None once evicted (or never stored)

Nothing survives a restart: the store lives in the server process's memory only, so after a restart (or in
another worker process) a ``previous_response_id`` is unknown (a 400 naming it) and ``GET`` is a 404. Each
entry holds the whole conversation up to its answer (the chat messages the next turn continues from), so a
continuation needs one look-up and evicting an older response never breaks a newer one's chain.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True)
class StoredResponse:
    """A response as it was answered, and the conversation (chat messages, the answer last) it ends."""

    response: dict[str, Any]
    messages: list[dict[str, Any]]
    size: int = field(default=0, compare=False)  # bytes as JSON, counted by put

    @property
    def id(self) -> str:
        return str(self.response["id"])


class ResponseStore:
    """Up to ``max_responses`` responses and ``max_bytes`` of them (as JSON); the least recently used go first.

    A response larger than ``max_bytes`` alone is not kept. Safe to use from several threads.
    """

    def __init__(self, max_responses: int = 1024, max_bytes: int = 64 * 2**20):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, entry: StoredResponse) -> bool:
        """Keep ``entry`` (evicting the least recently used as needed); False when it alone is over the bound."""
        size = len(orjson.dumps({"response": entry.response, "messages": entry.messages}))
        if size > self.max_bytes:
            return False
        entry = StoredResponse(entry.response, entry.messages, size)
        with self._lock:
            old = self._entries.pop(entry.id, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[entry.id] = entry
            self._bytes += size
            while len(self._entries) > self.max_responses or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None (never stored, ``store: false``, or evicted)."""
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is not None:
                self._entries.move_to_end(response_id)
            return entry

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """What the kept responses take as JSON."""
        return self._bytes


__all__ = ["ResponseStore", "StoredResponse"]
