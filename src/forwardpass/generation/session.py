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
                 max_context: int, threads: int | None = None):  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"{path}: ONNX Runtime could not load the decoder: {exc}") from exc
        self.max_context = max_context
        self.position = 0
        self.io = self.session.io_binding()
        self._buffers: list[Any] = []
        for i in range(n_layer):
            for kind in ("key", "value"):
                buffer = ort.OrtValue.ortvalue_from_shape_and_type([1, n_head_kv, max_context, head_dim], np.float32)
                self.io.bind_ortvalue_input(f"past_{kind}.{i}", buffer)
                self.io.bind_ortvalue_output(f"present_{kind}.{i}", buffer)
                self._buffers.append(buffer)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, n_vocab], np.float32)
        self.io.bind_ortvalue_output("logits", self.logits)

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
        self.io.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        self.io.bind_cpu_input("seqlens_k", np.array([end - 1], np.int32))
        self.io.bind_cpu_input("total_sequence_length", np.array(end, np.int32))
        self.session.run_with_iobinding(self.io)
        self.position = end
        return self.logits.numpy()[0, -1]
