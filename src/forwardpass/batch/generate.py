"""Generative batch: a chunk of prompts -> completions, all through the continuous-batching scheduler.

Every prompt of a chunk is submitted at once; the scheduler keeps its slots full (new sequences
join between decode steps), which is what makes a prompt file faster than a loop of generate().
A row is ``{"prompt": ...}`` (a .txt line) or a JSONL object with ``prompt`` or ``messages``, and any of
the request's fields (max_tokens, stop, temperature, ...), checked as the OpenAI routes check them.
"""

from __future__ import annotations

import threading
from typing import Any

from forwardpass._deps import require
from forwardpass.batch.io import Chunk
from forwardpass.batch.predict import message
from forwardpass.engine.requests import CHAT, COMPLETION, SAMPLING, parse_generation
from forwardpass.errors import ForwardpassError
from forwardpass.generation.scheduler import GenerationScheduler
from forwardpass.generation.sequence import Generation

# what a row may set of a generation request (other columns, ids say, are carried or ignored)
_ROW_FIELDS = {"prompt", "messages", "max_tokens", "stop", *SAMPLING}


class GenerationPredictor:
    def __init__(self, model: Any, *, id_columns: list[str] | None, max_tokens: int):
        self.model, self.id_columns, self.max_tokens = model, id_columns or [], max_tokens
        self.scheduler = GenerationScheduler(model, queue=1 << 20)
        self.pa = require("pyarrow", "batch", "batch inference")

    def predict(self, chunk: Chunk) -> tuple[Any, list[dict[str, Any]]]:
        rows = chunk.data if isinstance(chunk.data, list) else chunk.data.to_pylist()
        errors: dict[int, str] = dict(chunk.bad)
        results: dict[int, Generation] = {}
        pending = threading.Semaphore(0)
        submitted = 0
        for i, row in enumerate(rows):
            if i in errors or row is None:
                continue
            try:
                chat = row.get("messages") is not None
                doc = {k: row[k] for k in (CHAT if chat else COMPLETION) & _ROW_FIELDS if row.get(k) is not None}
                doc.setdefault("temperature", 0)
                doc.setdefault("max_tokens", self.max_tokens)
                seq = self.model.prepare(**parse_generation(doc, chat).prepare)  # the OpenAI routes' checks
            except ForwardpassError as exc:
                errors[i] = message(exc)
                continue

            def emit(item: Any, i: int = i) -> None:
                if isinstance(item, Generation):
                    results[i] = item
                elif isinstance(item, BaseException):
                    errors[i] = str(item)
                else:
                    return
                pending.release()

            self.scheduler.submit(seq, emit)
            submitted += 1
        for _ in range(submitted):
            pending.acquire()
        kept = sorted(results)
        columns: dict[str, Any] = {"row": [chunk.start + i for i in kept]}
        for name in self.id_columns:
            columns[name] = [rows[i].get(name) for i in kept]
        columns["text"] = [results[i].text for i in kept]
        columns["finish_reason"] = [results[i].finish_reason for i in kept]
        columns["prompt_tokens"] = [results[i].prompt_tokens for i in kept]
        columns["completion_tokens"] = [results[i].completion_tokens for i in kept]
        records = [{"row": chunk.start + i, **{c: (rows[i] or {}).get(c) for c in self.id_columns}, "error": errors[i]}
                   for i in sorted(errors)]  # fmt: skip
        return self.pa.table(columns), records

    def close(self) -> None:
        self.scheduler.close()
