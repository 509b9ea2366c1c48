"""Audio through libsndfile and soxr: FLAC and OGG, channel mixing, rate accuracy, damaged and lying files,
the streaming resampler, and the demo's silero-vad fed from a WAV file.

WAV encodings and the pre kind's bounds: test_text_audio_pre.py; the plan's header-only bounds: test_pre_plan.py.
"""

import base64
import importlib.util
import struct
import tracemalloc

import numpy as np
import pytest
from fixtures import audio_model, write_model

import forwardpass
from forwardpass import InvalidInput, Repository
from forwardpass.pipeline.audio import StreamResampler, decode_audio, encode, encode_wav, read_info, resample

RATE = 16000
T = np.arange(RATE // 10) / RATE
SINE = (0.5 * np.sin(2 * np.pi * 440 * T)).astype(np.float32)  # 0.1 s


def audio(tmp_path, **pre):
    write_model(tmp_path, "a", {"task": "custom", "pre": {"kind": "audio", **pre}}, audio_model())
    return Repository(tmp_path).load("a")


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    """The strongest frequency, between FFT bins (Hann window, parabolic interpolation on the log spectrum)."""
    spectrum = np.log(np.abs(np.fft.rfft(x * np.hanning(len(x)))) + 1e-12)
    k = int(np.argmax(spectrum))
    a, b, c = spectrum[k - 1 : k + 2]
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(x)


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_flac_round_trip(tmp_path, subtype):
    out = audio(tmp_path, sample_rate=RATE).predict(encode(SINE, RATE, "FLAC", subtype))["samples"]
    np.testing.assert_allclose(out, SINE, atol=1e-4 if subtype == "PCM_16" else 1e-6)  # lossless


def test_ogg_vorbis_round_trip(tmp_path):
    x = tone(440, RATE, 0.5)
    data = encode(x, RATE, "OGG", "VORBIS")
    assert read_info(data).format == "OGG" and read_info(data).subtype == "VORBIS"
    out = audio(tmp_path, sample_rate=RATE).predict(data)["samples"]
    assert out.shape == x.shape
    # lossy: the tone's frequency, level and shape survive; its exact samples do not
    assert abs(peak_hz(out, RATE) - 440) < 1
    assert np.sqrt(np.mean(out**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=0.02)
    assert np.corrcoef(out, x)[0, 1] > 0.999


def test_every_input_form_reads_flac_and_ogg(tmp_path):
    model = audio(tmp_path, sample_rate=RATE)
    flac, ogg = encode(SINE, RATE, "FLAC"), encode(SINE, RATE, "OGG", "VORBIS")
    (tmp_path / "clip.flac").write_bytes(flac)
    forms = [flac, base64.b64encode(flac).decode(), {"b64": base64.b64encode(ogg).decode()}, tmp_path / "clip.flac"]
    out = model.predict(forms)["samples"]
    assert out.shape == (4, len(SINE))
    for row in out[[0, 1, 3]]:
        np.testing.assert_allclose(row, SINE, atol=1e-4)
    assert np.corrcoef(out[2], SINE)[0, 1] > 0.99


@pytest.mark.parametrize("format", ["WAV", "FLAC"])
def test_stereo_is_averaged_to_mono(tmp_path, format):
    left, right = tone(440, 44100, 0.2), np.full(8820, 0.25, np.float32)  # different content per channel
    data = encode(np.stack([left, right], axis=1), 44100, format, "PCM_16")
    assert read_info(data).channels == 2
    mono, rate = decode_audio(data)
    assert rate == 44100
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-4)  # neither one channel nor the sum
    out = audio(tmp_path, sample_rate=44100).predict(data)["samples"]
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-4)


# --- rate conversion ----------------------------------------------------------------------------


@pytest.mark.parametrize("freq", [997.0, 3000.0])
def test_44k1_to_16k_keeps_frequency_and_amplitude(tmp_path, freq):
    clip = tone(freq, 44100, 1.0, amplitude=0.8)
    out = audio(tmp_path, sample_rate=16000).predict(encode_wav(np.stack([clip, clip], axis=1), 44100))["samples"]
    assert out.shape == (16000,)  # 1 s at the model's rate: a wrong rate changes the length and the pitch
    assert abs(peak_hz(out, 16000) - freq) < 0.5
    middle = slice(200, -200)  # away from the clip's own edges
    assert np.abs(out[middle]).max() == pytest.approx(0.8, abs=0.005)
    np.testing.assert_allclose(out[middle], tone(freq, 16000, 1.0, amplitude=0.8)[middle], atol=2e-3)


def test_downsampling_removes_what_the_new_rate_cannot_hold():
    above = tone(10000, 44100, 0.5)  # above 16 kHz's Nyquist (8 kHz): must not alias to 6 kHz
    assert np.sqrt(np.mean(resample(above, 44100, 16000)[200:-200] ** 2)) < 1e-3
    assert len(resample(np.ones(1, np.float32), 44100, 16000)) == 1  # a non-empty clip stays non-empty


# --- damaged and lying files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "damage", "reason"),
    [
        ("random bytes", lambda f, o: np.random.default_rng(0).bytes(1000), "Format not recognised"),
        ("truncated FLAC", lambda f, o: f[: len(f) // 2], "flac decoder lost sync"),
        ("truncated OGG", lambda f, o: o[: len(o) // 2], "file is malformed"),
        ("MP3 tag only", lambda f, o: b"ID3" + bytes(100), "Format not recognised"),
    ],
)
def test_a_damaged_file_is_an_invalid_input_naming_the_clip(tmp_path, name, damage, reason):
    x = tone(440, RATE, 1.0)
    bad = damage(encode(x, RATE, "FLAC"), encode(x, RATE, "OGG", "VORBIS"))
    with pytest.raises(InvalidInput, match=f"cannot decode audio \\(.*{reason}") as info:
        audio(tmp_path).predict([encode_wav(SINE, RATE), bad])
    assert info.value.loc == ("instances", 1)
    assert info.value.input == bad[:16]  # what came


def test_a_damaged_file_is_a_400_over_http(tmp_path):
    from fixtures.inprocess import InProcess

    from forwardpass.server.config import ServeConfig

    write_model(tmp_path, "a", {"task": "custom", "pre": {"kind": "audio"}}, audio_model())
    with InProcess(ServeConfig(repository=tmp_path, poll_interval=0)) as app:
        good = {"b64": base64.b64encode(encode(SINE, RATE, "FLAC")).decode()}
        assert app.post("/v1/models/a:predict", json={"instances": [good]}).status_code == 200
        bad = {"b64": base64.b64encode(encode(SINE, RATE, "FLAC")[:300]).decode()}
        r = app.post("/v1/models/a:predict", json={"instances": [good, bad]})
    assert r.status_code == 400, r.text
    assert "cannot decode audio" in r.text and '"instances",1' in r.text.replace(" ", "")


def lying_wav(frames_held: int, claimed_bytes: int) -> bytes:
    data = encode_wav(np.zeros(frames_held, np.float32), RATE)
    assert data[36:40] == b"data"
    return data[:4] + struct.pack("<I", claimed_bytes + 36) + data[8:40] + struct.pack("<I", claimed_bytes) + data[44:]


def flac_claiming(frames: int, x: np.ndarray = SINE) -> bytes:
    """A FLAC file whose STREAMINFO says it holds ``frames`` frames (36 bits; 0 means 'not known')."""
    data = bytearray(encode(x, RATE, "FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    field = int.from_bytes(data[18:26], "big")  # rate (20 bits), channels, bits, total frames (36 bits)
    assert field & (2**36 - 1) == len(x)
    data[18:26] = ((field & ~(2**36 - 1)) | frames).to_bytes(8, "big")
    return bytes(data)


def test_a_wav_header_claiming_4_gb_decodes_what_is_there(tmp_path):
    data = lying_wav(1600, 0xFFFFFF00)
    tracemalloc.start()
    try:
        out = audio(tmp_path).predict(data)["samples"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (1600,)
    assert peak < 2**20  # the claimed 4 GB is never allocated (nor 100 kB of it)


def test_a_flac_header_claiming_days_is_refused_before_decoding(tmp_path):
    model = audio(tmp_path)
    data = flac_claiming(2**36 - 1)  # 49 days at 16 kHz, in a 1 kB file
    assert read_info(data).frames == 2**36 - 1
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="pre.max_bytes") as info:
            model.predict([encode_wav(SINE, RATE), data])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.loc == ("instances", 1)
    assert peak < 2**20
    with pytest.raises(InvalidInput, match=r"clip is 4294967.3 s, longer than 60 s \(pre.max_seconds\)"):
        audio(tmp_path, max_bytes=2**40).predict(data)


def test_a_flac_holding_less_than_its_header_says_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="holds fewer than the 16,000 frames its header says") as info:
        audio(tmp_path).predict([encode_wav(SINE, RATE), flac_claiming(16000)])  # holds 1,600
    assert info.value.loc == ("instances", 1)
    out = audio(tmp_path).predict(flac_claiming(800))["samples"]  # claims fewer than it holds: cut there
    np.testing.assert_allclose(out, SINE[:800], atol=1e-4)


def test_a_flac_that_does_not_state_its_length_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="does not say how long it is") as info:
        audio(tmp_path).predict(flac_claiming(0))
    assert info.value.loc == ("instances", 0)


def test_flac_sample_bytes_count_at_the_encoding_width(tmp_path):
    data = encode(np.zeros((1000, 2), np.float32), RATE, "FLAC", "PCM_24")  # 1,000 frames x 2 x 3 bytes
    audio(tmp_path, max_bytes=6000).predict(data)
    with pytest.raises(InvalidInput, match=r"clip holds 6,000 bytes of samples, more than pre.max_bytes \(5,999\)"):
        audio(tmp_path, max_bytes=5999).predict(data)


# --- streaming ---------------------------------------------------------------------------------


def speechlike(rate: int, seconds: float) -> np.ndarray:
    """Tones across the band plus noise: something whose every chunk edge a bad resampler would show."""
    rng = np.random.default_rng(0)
    t = np.arange(round(rate * seconds)) / rate
    x = sum(a * np.sin(2 * np.pi * f * t + p) for a, f, p in [(0.3, 220, 0), (0.2, 1330, 1), (0.1, 6100, 2)])
    return (x + rng.normal(0, 0.02, len(t))).astype(np.float32)


def stream(resampler: StreamResampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    edges = np.cumsum(sizes)
    assert edges[-1] == len(x)
    parts = [resampler.push(chunk) for chunk in np.split(x, edges[:-1])]
    return np.concatenate([*parts, resampler.flush()])


def test_streamed_chunks_equal_the_whole_signal_resampled():
    x = speechlike(44100, 2.0)
    whole = resample(x, 44100, 16000)
    rng, sizes = np.random.default_rng(1), []
    while sum(sizes) < len(x):  # 1 to 3,000 samples a chunk, the last one what is left
        sizes.append(min(int(rng.integers(1, 3000)), len(x) - sum(sizes)))
    resampler = StreamResampler(44100, 16000)
    joined = stream(resampler, x, sizes)
    assert len(joined) == len(whole) == 32000
    np.testing.assert_allclose(joined, whole, atol=1e-6)
    np.testing.assert_allclose(stream(resampler, x, [len(x)]), whole, atol=1e-6)  # flush readied a new stream


def test_no_ringing_at_chunk_edges():
    x = speechlike(44100, 1.0)
    whole = resample(x, 44100, 16000)
    chunk = 1764  # 40 ms: 640 output samples exactly, so per-chunk outputs line up with the whole one
    edges = np.arange(640, len(whole), 640)
    near = np.concatenate([np.arange(e - 32, e + 32) for e in edges])  # 2 ms either side of each edge
    streamed = stream(StreamResampler(44100, 16000), x, [chunk] * (len(x) // chunk))
    assert np.abs(streamed[near] - whole[near]).max() < 1e-5
    # what the test guards against: each chunk resampled on its own rings (or gaps) at every edge
    apart = np.concatenate([resample(c, 44100, 16000) for c in np.split(x, len(x) // chunk)])
    assert len(apart) == len(whole)
    assert np.abs(apart[near] - whole[near]).max() > 0.05


def test_stream_resampler_at_the_same_rate_and_misuse():
    same = StreamResampler(16000, 16000)
    np.testing.assert_array_equal(same.push(SINE), SINE)
    assert same.flush().shape == (0,)
    assert StreamResampler(48000, 16000).push(np.zeros(0, np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match="1-D mono"):
        StreamResampler(48000, 16000).push(np.zeros((10, 2), np.float32))
    with pytest.raises(ValueError, match="positive"):
        StreamResampler(0, 16000)


# --- the demo's voice-activity model on a WAV file ----------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("silero_vad") is None, reason="silero-vad not installed")
def test_silero_vad_scores_a_wav_file_streamed_at_16k(demo_repo):
    model = forwardpass.load("silero-vad")
    silence, voiced = np.zeros(44100, np.float32), speechlike(44100, 1.0)
    clip, rate = decode_audio(encode_wav(np.concatenate([silence, voiced]), 44100))
    resampler, pending, probs = StreamResampler(rate, 16000), np.zeros(0, np.float32), []
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32)
    chunks = np.split(clip, range(1411, len(clip), 1411))  # 32 ms at 44.1 kHz, as a stream sends it
    for resampled in [*map(resampler.push, chunks), resampler.flush()]:
        pending = np.concatenate([pending, resampled])
        while len(pending) >= 512:  # silero's 32 ms window at 16 kHz
            window, pending = pending[:512], pending[512:]
            out = model.predict({"input": window[None], "state": state, "context": context,
                                 "sr": np.array(16000, np.int64)})  # fmt: skip
            state, context = out["stateN"], out["contextN"]
            probs.append(float(out["output"][0, 0]))
    assert len(probs) == 2 * 16000 // 512  # 2 s at 16 kHz: every whole window
    assert all(0 <= p <= 1 for p in probs)
    assert max(probs[:25]) < 0.5  # the first second is silence
