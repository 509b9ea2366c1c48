"""A converted decoder with its KV cache: ONNX Runtime I/O binding over preallocated buffers.

The cache is one (slots, Hkv, context, D) buffer per layer for keys and one for values (fp16 with
forwardpass's attention kernel, fp32 with ONNX Runtime's GroupQueryAttention).
GroupQueryAttention reads past keys/values and writes present ones; bound to the same memory
they are one buffer, so a step copies nothing but the new tokens' keys and values. Each row
(slot) is one sequence; GroupQueryAttention takes every row's own length (``seqlens_k``), so
rows at different positions decode together in one call: continuous batching.

    session = DecoderSession("models/smollm2/1/model.onnx", n_layer=30, ..., max_context=2048)
    logits = session.step([1, 4093, 198])        # one sequence (slot 0): prefill ...
    logits = session.step([504])                 # ... then decode; session.position == 4

    session = DecoderSession(..., slots=8)       # many sequences
    session.prefill(3, prompt_ids, start=0)      # slot 3's prompt (the prefill graph)
    logits = session.decode([tok0, tok1], [p0, p1])   # rows 0 and 1, one token each -> (2, V)
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from forwardpass import _memory, kernels
from forwardpass.errors import InvalidInput, ModelLoadError
from forwardpass.runtime.onnx import available_cores, open_session


class DecoderSession:
    """A decoder graph (plus an optional prompt graph) and ``slots`` rows of KV cache."""

    def __init__(self, path: str | Path, *, n_layer: int, n_head_kv: int, head_dim: int, n_vocab: int,
                 max_context: int, slots: int = 1, threads: int | None = None,
                 prefill_path: str | Path | None = None):  # fmt: skip
        self.max_context, self.slots, self.n_layer, self.n_vocab = max_context, slots, n_layer, n_vocab
        self.position = 0  # slot 0's length, for step()
        self.last_hidden_sum: np.ndarray | None = None  # the last call's (rows, C) pooled hidden states
        self.session = self._load(path, threads)
        # forwardpass's kernels give a row the same result whatever rows run beside it: no dummy row needed
        self.row_invariant = kernels.row_invariant(path) and not prefill_path
        # a second graph for prompts (many rows at once; fp32 activations), on the same KV buffers
        self.prefill_session = self._load(prefill_path, threads) if prefill_path else None
        # the cache's type is the graph's (fp16 with forwardpass's attention, fp32 with GroupQueryAttention);
        # np.zeros maps untouched pages lazily: memory grows with the positions actually written
        cache = next(i.type for i in self.session.get_inputs() if i.name == "past_key.0")
        dtype = np.float16 if cache == "tensor(float16)" else np.float32
        self.kv = [np.zeros((slots, n_head_kv, max_context, head_dim), dtype) for _ in range(2 * n_layer)]
        _memory.page_out(str(Path(path).resolve().parent))  # weight-file pages read only to prepack them
        self._bindings: dict[tuple[str, int, int, int], tuple[Any, np.ndarray, np.ndarray | None]] = {}
        # a logits buffer per graph kind and row count, shared by the bindings of every first row: a binding a
        # (first, rows, logit_rows) is cheap, a (logit_rows, V) buffer each is not (65 MB at 8 slots once prompts
        # batch); a decode's and a prompt's logits are read together, so the kinds do not share
        self._logits: dict[tuple[str, int], np.ndarray] = {}
        prompt_graph = self.prefill_session or self.session
        # graphs imported by forwardpass since issue 16 also give the final hidden states summed (embeddings)
        pooled = [o for o in prompt_graph.get_outputs() if o.name == "hidden_sum"]
        self.pools = bool(pooled)
        self.hidden_width = int(pooled[0].shape[-1]) if pooled else 0  # the embedding length

    @staticmethod
    def _load(path: str | Path, threads: int | None) -> ort.InferenceSession:
        library = None
        if kernels.used_by(path):  # its linears, head and attention are forwardpass's own kernels
            try:
                library = kernels.library()
            except kernels.KernelUnavailable as exc:
                raise ModelLoadError(f"{path}: the decoder uses forwardpass's kernels, which cannot be built here "
                                     f"({exc}); import the GGUF again with `forwardpass import gguf --kernels "
                                     f"onnxruntime` to use ONNX Runtime's own operators") from None  # fmt: skip
        # ONNX Runtime's defaults otherwise (threads spin, the arena stays): a decode step is one long run
        return open_session(path, Path(path), intra_op=threads or available_cores(), inter_op=0, what="the decoder",
                            custom_ops=library)  # fmt: skip

    def _binding(self, graph: str, first: int, rows: int, logit_rows: int) -> tuple[Any, np.ndarray, np.ndarray | None]:
        """IO binding of KV rows first..first+rows-1 (contiguous views), a logits buffer and (when the graph
        has it) a hidden_sum buffer, made once."""
        key = (graph, first, rows, logit_rows)
        found = self._bindings.get(key)
        if found is None:
            session = self.prefill_session if graph == "prefill" and self.prefill_session else self.session
            io = session.io_binding()
            for i in range(self.n_layer):
                for j, kind in enumerate(("key", "value")):
                    view = ort.OrtValue.ortvalue_from_numpy(self.kv[2 * i + j][first : first + rows])
                    io.bind_ortvalue_input(f"past_{kind}.{i}", view)
                    io.bind_ortvalue_output(f"present_{kind}.{i}", view)
            logits = self._logits.setdefault((graph, logit_rows), np.zeros((logit_rows, 1, self.n_vocab), np.float32))
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            io.bind_cpu_input("logit_rows", np.array([logit_rows], np.int64))
            pooled = None
            names = [o.name for o in session.get_outputs()]
            if "hidden_sum" in names:
                shape = session.get_outputs()[names.index("hidden_sum")].shape
                pooled = np.zeros((rows, int(shape[-1])), np.float32)
                io.bind_ortvalue_output("hidden_sum", ort.OrtValue.ortvalue_from_numpy(pooled))
            found = self._bindings[key] = (io, logits, pooled)
        return found

    def _run(self, graph: str, first: int, ids: np.ndarray, seqlens: np.ndarray, logit_rows: int = 0) -> np.ndarray:
        end = int(seqlens.max()) + 1
        if end > self.max_context:
            raise InvalidInput(("tokens",), f"the sequence would be {end} tokens, more than this session's context "
                               f"of {self.max_context}; shorten the prompt or lower max_tokens")  # fmt: skip
        io, logits, pooled = self._binding(graph, first, ids.shape[0], logit_rows or ids.shape[0])
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", seqlens)
        io.bind_cpu_input("total_sequence_length", np.array(end, np.int32))
        (self.prefill_session if graph == "prefill" and self.prefill_session else self.session).run_with_iobinding(io)
        self.last_hidden_sum = pooled
        return logits[:, -1]

    def prefill(self, slot: int, tokens: list[int], start: int) -> np.ndarray:
        """Write ``tokens`` into ``slot``'s cache at positions start.. (prompt graph); logits (V,) after the last."""
        if not tokens:
            raise InvalidInput(("tokens",), "expected at least one token")
        ids = np.asarray([tokens], dtype=np.int64)
        return self._run("prefill", slot, ids, np.array([start + len(tokens) - 1], np.int32))[0]

    def prefill_rows(self, first: int, tokens: Seq[Seq[int]], starts: Seq[int], logit_rows: int) -> np.ndarray:
        """Rows first.. of the cache each take len(tokens[0]) tokens, row i's at positions starts[i]..; logits
        (logit_rows, V) after each of the first logit_rows rows' last token (the prompt graph, one call)."""
        ids = np.asarray(tokens, dtype=np.int64)
        ends = np.asarray(starts, dtype=np.int32) + ids.shape[1] - 1
        return self._run("prefill", first, ids, ends, logit_rows)

    def prefill_pooled(self, slot: int, tokens: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
        """``prefill``, and the chunk's final hidden states summed over its positions (C,): embeddings."""
        if not self.pools:
            raise InvalidInput(("model",), "this model's graph gives no hidden states: import its GGUF again with "
                               "this forwardpass (forwardpass import gguf) to serve embeddings from it")  # fmt: skip
        logits = self.prefill(slot, tokens, start)
        assert self.last_hidden_sum is not None
        return logits, self.last_hidden_sum[0].copy()

    def decode(self, tokens: list[int], positions: list[int], logit_rows: int = 0) -> np.ndarray:
        """One new token for each of rows 0..n-1, row i's at position ``positions[i]``; logits (n, V), or
        (logit_rows, V) for the first rows only when ``logit_rows`` is given (the others are padding).

        The array is this session's buffer, overwritten by the next decode call with as many logit rows.
        """
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        return self._run("decode", 0, ids, np.asarray(positions, dtype=np.int32), logit_rows)

    def read_prefix(self, slot: int, length: int) -> list[np.ndarray]:
        """Copies of ``slot``'s keys and values for positions 0..length-1 (for the prefix cache)."""
        return [buffer[slot, :, :length].copy() for buffer in self.kv]

    def write_prefix(self, slot: int, arrays: list[np.ndarray], length: int) -> None:
        """Positions 0..length-1 of ``slot`` from read_prefix()'s arrays."""
        for buffer, array in zip(self.kv, arrays, strict=True):
            buffer[slot, :, :length] = array[:, :length]

    # -- one sequence in slot 0, by hand (the goldens test, bench/generate.py) -----------------------

    def reset(self) -> None:
        """Start a new sequence (the buffers are overwritten as positions are reused)."""
        self.position = 0

    def step(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` to slot 0's sequence; the next-token logits (V,) after the last one."""
        if len(tokens) > 1:
            logits = self.prefill(0, tokens, self.position)
        elif tokens:
            logits = self.decode(tokens, [self.position])[0]
        else:
            raise InvalidInput(("tokens",), "expected at least one token")
        self.position += len(tokens)
        return logits
