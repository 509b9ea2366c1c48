"""Hand-made GGUF files for the bounded-reader tests: a tiny writer and a set of malicious headers.

    data = gguf_bytes([kv("general.architecture", STRING, "llama")], [tensor("w", [4], F32, 0)], b"\\0" * 16)
    for name, (data, field) in crafted_files().items(): ...

Each crafted file is at most a few hundred bytes; ``field`` is the text the reader's error must name.
"""

from __future__ import annotations

import struct

UINT8, UINT32, FLOAT32, STRING, ARRAY, UINT64 = 0, 4, 6, 8, 9, 10
F32, Q4_1, Q8_0 = 0, 3, 8
_BYTES = {F32: (1, 4), Q4_1: (32, 20), Q8_0: (32, 34)}  # values a block, bytes a block
HUGE = 1 << 62


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, value) -> bytes:
    """One metadata entry: a scalar, a string, or (item type, [items]) for an array."""
    head = s(key) + struct.pack("<I", vtype)
    if vtype == STRING:
        return head + s(value)
    if vtype == ARRAY:
        itype, items = value
        body = b"".join(s(i) if itype == STRING else struct.pack("<" + _FMT[itype], i) for i in items)
        return head + struct.pack("<IQ", itype, len(items)) + body
    return head + struct.pack("<" + _FMT[vtype], value)


_FMT = {UINT8: "B", UINT32: "I", FLOAT32: "f", UINT64: "Q"}


def tensor(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    dims_bytes = b"".join(struct.pack("<Q", d) for d in dims)
    return s(name) + struct.pack("<I", len(dims)) + dims_bytes + struct.pack("<IQ", ttype, offset)


def gguf_bytes(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", *, n_kv: int | None = None,
               n_tensors: int | None = None) -> bytes:  # fmt: skip
    """A version-3 little-endian GGUF file (data aligned to 32 bytes)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)  # fmt: skip
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


def valid_small() -> bytes:
    """A well-formed GGUF: three metadata entries and one 4-float tensor (not a model: no architecture)."""
    return gguf_bytes([kv("general.name", STRING, "tiny"), kv("general.alignment", UINT32, 32),
                       kv("general.tags", ARRAY, (STRING, ["a", "bc"]))],
                      [tensor("w", [4], F32, 0)], struct.pack("<4f", 1, 2, 3, 4))  # fmt: skip


def tiny_llama(embedding_length: int = 32) -> bytes:
    """A one-block Llama (32 wide, 4 tokens, zero weights, the converter's Q4_1/Q8_0 types); ``embedding_length``
    is what its metadata claims."""
    C, F, V = 32, 32, 4
    shapes = {"token_embd.weight": ([C, V], Q8_0), "output_norm.weight": ([C], F32),
              "blk.0.attn_norm.weight": ([C], F32), "blk.0.ffn_norm.weight": ([C], F32),
              **{f"blk.0.{n}.weight": ([C, C], Q4_1) for n in ("attn_q", "attn_k", "attn_v", "attn_output")},
              "blk.0.ffn_gate.weight": ([C, F], Q4_1), "blk.0.ffn_up.weight": ([C, F], Q4_1),
              "blk.0.ffn_down.weight": ([F, C], Q4_1)}  # fmt: skip
    records, data = [], b""
    for name, (dims, ttype) in shapes.items():
        block, size = _BYTES[ttype]
        n = dims[0] // block * size * (dims[1] if len(dims) > 1 else 1)
        records.append(tensor(name, dims, ttype, len(data)))
        data += b"\0" * n + b"\0" * (-n % 32)
    meta = [kv("general.architecture", STRING, "llama"), kv("llama.block_count", UINT32, 1),
            kv("llama.context_length", UINT32, 64), kv("llama.embedding_length", UINT32, embedding_length),
            kv("llama.feed_forward_length", UINT32, F), kv("llama.attention.head_count", UINT32, 1),
            kv("llama.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5), kv("llama.vocab_size", UINT32, V)]  # fmt: skip
    return gguf_bytes(meta, records, data)


def crafted_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the field the error must name)."""
    key = s("general.a")
    return {
        # the 52-byte file: an array claiming 2^62 one-byte items
        "array_length": (gguf_bytes([key + struct.pack("<IIQ", ARRAY, UINT8, HUGE)], []).ljust(52, b"\0"),
                         "'general.a'"),  # fmt: skip
        "string_array_length": (gguf_bytes([key + struct.pack("<IIQ", ARRAY, STRING, HUGE)], []), "'general.a'"),
        "string_length": (gguf_bytes([key + struct.pack("<IQ", STRING, HUGE) + b"abc"], []), "'general.a'"),
        "key_length": (gguf_bytes([struct.pack("<Q", HUGE) + b"general"], []), "metadata key #0"),
        "kv_count": (gguf_bytes([], [], n_kv=HUGE), "GGUF.kv_count"),
        "tensor_count": (gguf_bytes([], [], n_tensors=HUGE), "GGUF.tensor_count"),
        "dimension_count": (gguf_bytes([], [s("w") + struct.pack("<I", 1 << 31)]), "tensor 'w'"),
        "tensor_offset": (gguf_bytes([], [tensor("w", [4], F32, 1 << 40)], b"\0" * 16), "tensor 'w'"),
        "tensor_size": (gguf_bytes([], [tensor("w", [1 << 31, 1 << 31], F32, 0)], b"\0" * 16), "tensor 'w'"),
        # 2^63 * 2^63 wraps to 0 in uint64 arithmetic: the size must be computed without overflow
        "dims_overflow": (gguf_bytes([], [tensor("w", [1 << 63, 1 << 63, 32], Q8_0, 0)], b"\0" * 34), "tensor 'w'"),
        "value_type": (gguf_bytes([key + struct.pack("<I", 77) + b"\0" * 8], []), "'general.a'"),
        "nested_array": (gguf_bytes([key + struct.pack("<IIQ", ARRAY, ARRAY, 2) + b"\0" * 24], []), "'general.a'"),
        "alignment": (gguf_bytes([kv("general.alignment", UINT32, 3)], [tensor("w", [4], F32, 0)], b"\0" * 16),
                      "general.alignment"),  # fmt: skip
        "truncated": (valid_small()[:140], "'general.tags'"),
        "truncated_tensor_data": (valid_small()[:-4], "tensor 'w'"),
        # well-formed, but the metadata claims a width the tensors do not have: a converter sizing its caches and
        # fused weights by it (rotary tables of 2048 x 2^29) would allocate terabytes
        "hparams_vs_tensors": (tiny_llama(embedding_length=1 << 30), "tensor 'token_embd.weight'"),
    }
