"""Text (raw strings, tokenizer.json) and audio (WAV) pre-processing (FLAC, OGG, streams: test_audio_formats.py)."""

import base64
import struct

import numpy as np
import pytest
from fixtures import audio_model, token_model, write_model

from forwardpass import InvalidInput, ModelConfigError, Repository
from forwardpass.pipeline.audio import decode_audio, encode_wav, resample

tokenizers = pytest.importorskip("tokenizers")


def make_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator(["good great fine", "bad awful poor", "the movie was"], trainer)
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


def test_tokenizer_pre(tmp_path):
    config = {"task": "classification", "labels": ["neg", "pos"],
              "pre": {"kind": "text", "tokenizer": "tokenizer.json", "max_length": 4},
              "post": {"kind": "classification", "logits": True}}  # fmt: skip
    folder = write_model(tmp_path, "sentiment", config, token_model(11))
    tok = make_tokenizer(folder / "tokenizer.json")
    model = Repository(tmp_path).load("sentiment")
    texts = ["the movie was good", "bad", "the movie was great and fine"]  # last one is truncated to 4
    answers = model.predict(texts)
    E = {i.name: i for i in token_model(11).graph.initializer}
    from onnx import numpy_helper

    emb = numpy_helper.to_array(E["E"])
    for text, answer in zip(texts, answers):
        ids = tok.encode(text).ids[:4]
        logits = emb[ids].sum(0)
        assert answer["label"] == ["neg", "pos"][int(logits.argmax())]
    assert model.predict("bad") == answers[1]
    with pytest.raises(InvalidInput, match="expected a string"):
        model.predict(["ok", 3])


def test_tokenizer_config_errors(tmp_path):
    config = {"task": "custom", "pre": {"kind": "text", "tokenizer": "missing.json"}}
    write_model(tmp_path, "m", config, token_model(11))
    with pytest.raises(ModelConfigError, match="pre.tokenizer"):
        Repository(tmp_path).load("m")
    config["pre"] = {"kind": "text", "tokenizer": "tokenizer.json", "attention_mask": "mask"}
    folder = write_model(tmp_path, "m", config, token_model(11))
    make_tokenizer(folder / "tokenizer.json")
    with pytest.raises(ModelConfigError, match="'mask' is not a model input"):
        Repository(tmp_path).load("m")


def test_raw_strings_into_a_string_model(tmp_path):
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts = ["good movie", "great fun", "bad movie", "awful plot", "fine fun", "poor plot"]
    y = [1, 1, 0, 0, 1, 0]
    pipe = make_pipeline(CountVectorizer(), LogisticRegression()).fit(texts, y)
    onx = to_onnx(pipe, initial_types=[("text", StringTensorType([None, 1]))],
                  # locale C: the machine may have no en_US locale for ONNX Runtime's StringNormalizer
                  options={id(pipe.steps[-1][1]): {"zipmap": False}, id(pipe.steps[0][1]): {"locale": "C"}})  # fmt: skip
    folder = tmp_path / "sent"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(onx.SerializeToString())
    (folder / "model.yaml").write_text("task: classification\nlabels: [neg, pos]\npre: {kind: text}\n")
    model = Repository(tmp_path).load("sent")
    answers = model.predict(["good fun", "awful movie"])
    assert [a["label"] for a in answers] == [["neg", "pos"][p] for p in pipe.predict(["good fun", "awful movie"])]
    np.testing.assert_allclose(answers[0]["top_k"][0]["probability"], pipe.predict_proba(["good fun"]).max(), atol=1e-5)


# --- audio ------------------------------------------------------------------------------------


def wav(samples: np.ndarray, rate: int, bits: int = 16, tag: int = 1, channels: int = 1) -> bytes:
    if tag == 3:
        data = samples.astype("<f4" if bits == 32 else "<f8").tobytes()
    elif bits == 8:
        data = (samples * 127 + 128).astype(np.uint8).tobytes()
    elif bits == 16:
        data = (samples * 32767).astype("<i2").tobytes()
    elif bits == 24:
        v = (samples * (2**23 - 1)).astype("<i4")
        data = b"".join(int(x).to_bytes(4, "little", signed=True)[:3] for x in v)
    else:
        data = (samples * (2**31 - 1)).astype("<i4").tobytes()
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 3) + b"abc\x00"
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


SINE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(1600) / 16000)).astype(np.float32)


@pytest.mark.parametrize(("bits", "tag", "tol"), [(8, 1, 2e-2), (16, 1, 1e-4), (24, 1, 1e-6), (32, 1, 1e-6), (32, 3, 0), (64, 3, 0)])
def test_decode_wav_encodings(bits, tag, tol):
    samples, rate = decode_audio(wav(SINE, 16000, bits, tag))
    assert rate == 16000
    np.testing.assert_allclose(samples, SINE, atol=tol + 1e-7)


def test_stereo_is_mixed_to_mono():
    stereo = np.stack([SINE, -SINE * 0 + 0.25], axis=1).reshape(-1)
    samples, _ = decode_audio(wav(stereo, 16000, 16, 1, channels=2))
    np.testing.assert_allclose(samples, (SINE + 0.25) / 2, atol=1e-4)


def test_resample_keeps_a_tone_and_length():
    x = (np.sin(2 * np.pi * 440 * np.arange(4410) / 44100)).astype(np.float32)
    y = resample(x, 44100, 16000)
    assert len(y) == 1600
    np.testing.assert_allclose(y[100:1500], np.sin(2 * np.pi * 440 * np.arange(100, 1500) / 16000), atol=0.01)


@pytest.mark.parametrize(("data", "reason"), [(b"", "Format not recognised"), (b"RIFF\x00\x00\x00\x00WAVX", "Format not recognised"),
                                              (b"RIFF\x04\x00\x00\x00WAVE", "Error in WAV file. No 'data' chunk")])  # fmt: skip
def test_bad_wav(data, reason):
    with pytest.raises(InvalidInput, match=f"cannot decode audio \\({reason}.*expected WAV, FLAC, OGG") as info:
        decode_audio(data, ("instances", 2))
    assert info.value.loc == ("instances", 2) and info.value.input == data[:16]  # what came


def test_audio_pre(tmp_path):
    config = {"task": "custom", "pre": {"kind": "audio", "sample_rate": 8000, "max_seconds": 1}}
    write_model(tmp_path, "a", config, audio_model())
    model = Repository(tmp_path).load("a")
    clip = wav(SINE, 16000)
    out = model.predict([clip, base64.b64encode(encode_wav(SINE[:800], 16000)).decode()])["samples"]
    assert out.shape == (2, 800)
    np.testing.assert_array_equal(out[1, 400:], 0)  # the shorter clip is zero-padded
    with pytest.raises(InvalidInput, match="cannot decode audio") as info:
        model.predict([clip, b"nope"])
    assert info.value.loc == ("instances", 1)
    with pytest.raises(InvalidInput, match="longer than 1"):
        model.predict(wav(np.zeros(20000, np.float32), 16000))
    with pytest.raises(InvalidInput, match="empty clip"):
        model.predict(wav(np.zeros(0, np.float32), 16000))


def audio(tmp_path, **pre):
    write_model(tmp_path, "a", {"task": "custom", "pre": {"kind": "audio", **pre}}, audio_model())
    return Repository(tmp_path).load("a")


def test_clip_bytes_bound_read_from_the_header(tmp_path):
    model = audio(tmp_path, max_bytes=3000)
    model.predict(wav(SINE[:1500], 16000))  # 3000 bytes of 16-bit samples
    with pytest.raises(InvalidInput) as info:
        model.predict([wav(SINE[:1500], 16000), wav(SINE, 16000, channels=1)])
    assert info.value.loc == ("instances", 1)
    assert "3,200 bytes of samples, more than pre.max_bytes (3,000)" in info.value.msg


def test_clip_length_bound_names_the_field(tmp_path):
    with pytest.raises(InvalidInput, match=r"clip is 0.1 s, longer than 0.05 s \(pre.max_seconds\)"):
        audio(tmp_path, max_seconds=0.05).predict(wav(SINE, 16000))


def test_request_audio_budget(tmp_path):
    model = audio(tmp_path, max_total_seconds=0.25)
    model.predict([wav(SINE, 16000)] * 2)
    with pytest.raises(InvalidInput) as info:
        model.predict([wav(SINE, 16000)] * 3)  # 3 x 0.1 s
    assert info.value.loc == ("instances",)
    assert "0.3 s together, longer than pre.max_total_seconds (0.25 s)" in info.value.msg


def test_audio_b64_object_form(tmp_path):
    model = audio(tmp_path)
    out = model.predict({"b64": base64.b64encode(wav(SINE, 16000)).decode()})["samples"]
    np.testing.assert_allclose(out, SINE, atol=1e-4)


def test_sub_byte_samples_are_an_invalid_input(tmp_path):
    data = wav(SINE, 16000, 16)[:20] + struct.pack("<HHIIHH", 1, 1, 16000, 0, 0, 0) + wav(SINE, 16000)[36:]
    with pytest.raises(InvalidInput, match="cannot decode audio \\(File contains data in an unimplemented format"):
        audio(tmp_path).predict(data)  # was a ZeroDivisionError in the hand-written reader: a 500


@pytest.mark.parametrize(("bits", "frames"), [(4, 3200), (12, 1600)])
def test_odd_bit_depths_decode_as_libsndfile_reads_them(tmp_path, bits, frames):
    # The hand-written reader refused both; libsndfile reads 4 bits per sample as 8-bit samples (a bounded,
    # finite answer of the length the 3,200 bytes give, not a 500) and 12 bits as 16-bit containers, which
    # is how 12-bit WAV is stored: the 16-bit sine here comes back as it went in.
    data = wav(SINE, 16000, 16)[:20] + struct.pack("<HHIIHH", 1, 1, 16000, 0, 0, bits) + wav(SINE, 16000)[36:]
    out = audio(tmp_path).predict(data)["samples"]
    assert out.shape == (frames,) and np.isfinite(out).all() and np.abs(out).max() <= 1
    if bits == 12:
        np.testing.assert_allclose(out, SINE, atol=1e-4)


def test_text_accepts_utf8_bytes(tmp_path):
    config = {"task": "custom", "pre": {"kind": "text", "tokenizer": "tokenizer.json", "max_length": 4}}
    make_tokenizer(write_model(tmp_path, "t", config, token_model(11)) / "tokenizer.json")
    model = Repository(tmp_path).load("t")
    as_bytes, as_str = model.predict([b"the movie", "bad"]), model.predict(["the movie", "bad"])
    np.testing.assert_array_equal(as_bytes["logits"], as_str["logits"])
    with pytest.raises(InvalidInput, match="expected UTF-8 text") as info:
        model.predict(["ok", b"\xff\xfe"])
    assert info.value.loc == ("instances", 1)
