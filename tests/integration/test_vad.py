"""Voice activity end to end: speech synthesized with espeak-ng between known silences, through the demo's
silero-vad as one sequence of the engine (the server keeps its state and context and detects the speech
events), from a file (16 kHz and 22.05 kHz, resampled chunk by chunk), from the CLI, and over the WebSocket
stream in 32 ms frames (the same probabilities and the same events, answered by the server); and the
detector's hysteresis rules on probabilities made up for them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures import copy_models
from fixtures.inprocess import SocketServer
from websockets.sync.client import connect

from forwardpass.pipeline.audio import encode_wav, resample
from forwardpass.repository import Repository
from forwardpass.server.config import ServeConfig
from forwardpass.streaming import vad
from forwardpass.streaming.vad import Segment, SpeechDetector

PHRASES = ("voice activity detection finds speech", "between the silences")
SILENCES = (1.0, 1.2, 1.0)  # seconds: before, between and after the phrases
TOLERANCE = 0.1  # seconds, at each edge of each segment


def edges(segments: list[Segment]) -> list[float]:
    return [t for s in segments for t in (s.start, s.end)]


# --- the detector alone: silero's rules on made-up probabilities (one per 32 ms window) ---------------------


def test_speech_starts_at_threshold_and_ends_after_100_ms_below_it_less_015_padded_by_30_ms():
    probs = [0.0] * 10 + [0.9] * 20 + [0.0] * 10
    # speech from window 10 (0.32 s) to window 30 (0.96 s), 30 ms of padding either side
    assert edges(vad.segments(probs)) == pytest.approx([0.29, 0.99])


def test_probabilities_between_the_two_thresholds_keep_speech_going():
    probs = [0.0] * 10 + [0.9] * 10 + [0.4] * 20 + [0.9] * 5 + [0.0] * 10  # 0.4: under 0.5, over 0.35
    assert edges(vad.segments(probs)) == pytest.approx([0.29, 45 * 0.032 + 0.03])


def test_a_pause_shorter_than_min_silence_does_not_split_a_segment_and_a_longer_one_does():
    short = [0.9] * 10 + [0.0] * 3 + [0.9] * 10 + [0.0] * 10  # 3 windows: 96 ms of silence
    assert len(vad.segments(short)) == 1
    long = [0.9] * 10 + [0.0] * 5 + [0.9] * 10 + [0.0] * 10  # 5 windows: 160 ms
    assert edges(vad.segments(long)) == pytest.approx([0.0, 10 * 0.032 + 0.03, 15 * 0.032 - 0.03, 25 * 0.032 + 0.03])


def test_speech_of_250_ms_or_less_is_dropped_and_never_announced():
    detector = SpeechDetector()
    events = [e for p in [0.0] * 5 + [0.9] * 7 + [0.0] * 10 for e in detector.push(p)]  # 7 windows: 224 ms
    assert events == [] and detector.finish() == []
    assert len(vad.segments([0.9] * 8 + [0.0] * 10)) == 1  # 256 ms


def test_a_live_stream_hears_the_start_before_the_speech_ends_and_the_end_at_the_stream_end():
    detector = SpeechDetector()
    heard = [(i, e) for i, p in enumerate([0.0] * 10 + [0.9] * 30) for e in detector.push(p)]
    assert [(i, e.kind) for i, e in heard] == [(17, "start")]  # once longer than 250 ms (8 windows)
    assert heard[0][1].time == pytest.approx(0.29)
    (end,) = detector.finish()
    assert end.kind == "end" and end.time == pytest.approx(40 * 0.032)  # open at the end: ends with the audio, unpadded


def test_an_unreadable_file_names_it(tmp_path):
    from forwardpass.errors import InvalidInput

    with pytest.raises(InvalidInput, match="cannot read the audio file"):
        vad.windows(tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not audio")
    with pytest.raises(InvalidInput, match="cannot decode audio"):
        vad.windows(tmp_path / "bad.wav")


def test_a_model_that_is_not_a_voice_activity_model_is_refused_by_name(demo_repo, tmp_path):
    from forwardpass.errors import InvalidInput

    root = copy_models(demo_repo, tmp_path / "repo", "iris")
    with pytest.raises(InvalidInput, match="model 'iris' is not a voice activity model"):
        vad.listen(Repository(root), "iris", [np.zeros(512, np.float32)])


# --- the model, end to end ------------------------------------------------------------------------------


@pytest.fixture
def repo(demo_repo: Path, tmp_path: Path) -> Path:
    """A copy of the demo's silero-vad (stateful, with speech events, as the demo declares it)."""
    if not (demo_repo / "silero-vad").is_dir():
        pytest.skip("silero-vad is not installed (pip install --no-deps silero-vad)")
    return copy_models(demo_repo, tmp_path / "repo", "silero-vad")


@pytest.fixture(scope="module")
def phrases(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], int]:
    """The phrases spoken by espeak-ng (at its 22.05 kHz), trimmed to where its output is not silent."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("espeak")
    spoken, rate = [], 0
    for i, text in enumerate(PHRASES):
        subprocess.run(["espeak-ng", "-w", str(folder / f"{i}.wav"), text], check=True, timeout=60)
        x, rate = sf.read(folder / f"{i}.wav", dtype="float32")
        voiced = np.nonzero(np.abs(x) > 1e-3)[0]
        spoken.append(x[voiced[0] : voiced[-1] + 1])
    return spoken, rate


def mix(phrases: tuple[list[np.ndarray], int], rate: int, path: Path) -> list[Segment]:
    """silence, phrase, silence, phrase, silence at ``rate`` into ``path``; the phrases' known intervals."""
    spoken, source = phrases
    parts, known, t = [], [], 0
    for silence, phrase in zip(SILENCES, [*spoken, None]):
        parts.append(np.zeros(int(silence * rate), np.float32))
        t += len(parts[-1])
        if phrase is not None:
            parts.append(0.8 * resample(phrase, source, rate))
            known.append(Segment(t / rate, (t + len(parts[-1])) / rate))
            t += len(parts[-1])
    path.write_bytes(encode_wav(np.concatenate(parts), rate))
    return known


def assert_match(found: list[Segment], known: list[Segment]) -> None:
    assert len(found) == len(known), (found, known)
    for f, k in zip(found, known):
        assert abs(f.start - k.start) <= TOLERANCE and abs(f.end - k.end) <= TOLERANCE, (found, known)


@pytest.mark.parametrize("rate", [16000, 22050])
def test_file_segments_match_the_known_speech_within_100_ms(repo, phrases, tmp_path, rate):
    known = mix(phrases, rate, tmp_path / "speech.wav")
    assert_match(vad.file_segments(Repository(repo), "silero-vad", tmp_path / "speech.wav"), known)


def test_the_cli_prints_the_segments(repo, phrases, tmp_path, cli):
    known = mix(phrases, 16000, tmp_path / "speech.wav")
    result = cli("stream", "silero-vad", "--input", str(tmp_path / "speech.wav"), "-r", str(repo))
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("speech")]
    assert_match([Segment(float(w[1]), float(w[4])) for w in lines], known)


def test_the_websocket_stream_gives_the_same_probabilities_and_events_as_the_file(repo, phrases, tmp_path):
    known = mix(phrases, 22050, tmp_path / "speech.wav")
    chunks, samples = vad.windows(tmp_path / "speech.wav")
    from_file = vad.listen(Repository(repo), "silero-vad", chunks)
    assert all(len(c) == 512 for c in chunks)  # 32 ms at 16 kHz: the server keeps the 64 samples of context
    with SocketServer(ServeConfig(repository=repo, poll_interval=0)) as server:
        with connect(f"ws://127.0.0.1:{server.port}/v2/models/silero-vad/stream") as ws:
            for i, chunk in enumerate(chunks):  # one frame per window; the connection is the sequence
                frame = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, len(chunk)],
                                     "data": chunk.tolist()}]}  # fmt: skip
                if i == len(chunks) - 1:
                    frame["parameters"] = {"sequence_end": True}  # closes a segment still open
                ws.send(json.dumps(frame))
            answers = [json.loads(ws.recv(timeout=30)) for _ in chunks]
    outputs = [{o["name"]: o for o in a["outputs"]} for a in answers]
    assert {o["events"]["datatype"] for o in outputs} == {"BYTES"}
    streamed = vad.Heard([o["output"]["data"][0] for o in outputs],
                         [vad.events_of(e) for o in outputs for e in o["events"]["data"]])  # fmt: skip
    np.testing.assert_allclose(streamed.probabilities, from_file.probabilities, atol=1e-5)
    assert streamed.events == from_file.events and len(streamed.events) == 2 * len(known)
    assert [e.kind for e in streamed.events] == ["start", "end"] * len(known)
    assert_match(streamed.segments(samples), known)
    # each event came with the window that completed it, while the stream went on: not all at the end
    assert sum(1 for o in outputs[:-1] if o["events"]["data"]) >= 2 * len(known) - 1
