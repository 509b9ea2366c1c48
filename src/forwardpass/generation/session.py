"""One decoder session with its KV cache: ONNX Runtime I/O binding over preallocated buffers.

GroupQueryAttention reads past keys/values and writes present ones; bound to the same
(1, Hkv, max_context, D) buffer they are one buffer, so a decode step copies nothing but one
token's keys and values.

    session = DecoderSession("models/smollm2/1/model.onnx", hparams, max_context=2048)
    logits = session.step([1, 4093, 198])    # prefill
    logits = session.step([504])             # decode; session.position == 4
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from forwardpass.errors import InvalidInput, ModelLoadError
from forwardpass.runtime.onnx import available_cores


class DecoderSession:
    """A converted decoder plus one sequence's KV cache."""

    def __init__(self, path: str | Path, *, n_layer: int, n_head_kv: int, head_dim: int, n_vocab: int,
                 max_context: int, threads: int | None = None, prefill_path: str | Path | None = None):  # fmt: skip
        self.max_context = max_context
        self.position = 0
        self._buffers = [ort.OrtValue.ortvalue_from_shape_and_type([1, n_head_kv, max_context, head_dim], np.float32)
                         for _ in range(2 * n_layer)]  # fmt: skip
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, n_vocab], np.float32)
        self.session, self.io = self._bind(path, threads, n_layer)
        # an optional second graph for prompts (many rows), on the same KV buffers and logits
        self.prefill_session, self.prefill_io = self._bind(prefill_path, threads, n_layer) if prefill_path else (None, None)

    def _bind(self, path: str | Path, threads: int | None, n_layer: int) -> tuple[Any, Any]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.log_severity_level = 4
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"{path}: ONNX Runtime could not load the decoder: {exc}") from exc
        io = session.io_binding()
        for i in range(n_layer):
            for j, kind in enumerate(("key", "value")):
                buffer = self._buffers[2 * i + j]
                io.bind_ortvalue_input(f"past_{kind}.{i}", buffer)
                io.bind_ortvalue_output(f"present_{kind}.{i}", buffer)
        io.bind_ortvalue_output("logits", self.logits)
        return session, io

    def reset(self) -> None:
        """Start a new sequence (the buffers are overwritten as positions are reused)."""
        self.position = 0

    def step(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; the next-token logits (V,) after the last one."""
        if not tokens:
            raise InvalidInput(("tokens",), "expected at least one token")
        end = self.position + len(tokens)
        if end > self.max_context:
            raise InvalidInput(("tokens",), f"the sequence would be {end} tokens, more than this session's context "
                               f"of {self.max_context}; shorten the prompt or lower max_tokens")  # fmt: skip
        session, io = (self.prefill_session, self.prefill_io) if len(tokens) > 1 and self.prefill_session \
            else (self.session, self.io)  # fmt: skip
        io.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        io.bind_cpu_input("seqlens_k", np.array([end - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(end, np.int32))
        session.run_with_iobinding(io)
        self.position = end
        return self.logits.numpy()[0, -1]
