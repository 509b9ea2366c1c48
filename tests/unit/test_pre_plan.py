"""The pre-processing plan: what a request will cost, read from headers before any decoding.

An entrypoint on an event loop asks ``pre.plan(instances)`` (cheap; raises InvalidInput past a
bound) and runs ``plan.run`` on a thread when ``plan.off_loop`` says the work outweighs the hop.
"""

import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from forwardpass import InvalidInput
from forwardpass.config import TensorSpec
from forwardpass.pipeline import build_pre
from forwardpass.pipeline.audio import encode, encode_wav
from forwardpass.pipeline.kinds.audio import AudioPre
from forwardpass.pipeline.kinds.image import ImagePre
from forwardpass.pipeline.kinds.tabular import TabularPre
from forwardpass.pipeline.kinds.tensor import TensorPre
from forwardpass.pipeline.kinds.text import TextPre

IMAGE = [TensorSpec(name="image", datatype="FP32", shape=[-1, 3, 224, 224])]
DIGITS = [TensorSpec(name="input", datatype="FP32", shape=[-1, 64])]
AUDIO = [TensorSpec(name="audio", datatype="FP32", shape=[-1, -1])]


def jpeg(w: int, h: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def png(w: int, h: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("L", (w, h)).save(buffer, "PNG")
    return buffer.getvalue()


def test_image_plan_counts_header_pixels_and_runs_what_call_runs():
    pre = build_pre(ImagePre(kind="image", resize=224, center_crop=(224, 224)), IMAGE, Path("."))
    images = [jpeg(256, 256), jpeg(300, 240)]
    plan = pre.plan(images)
    assert (plan.cost, plan.unit, plan.off_loop) == (256 * 256 + 300 * 240, "pixels", True)
    np.testing.assert_array_equal(plan.run()["image"], pre(images)["image"])
    assert pre.takes_raw


def test_a_small_image_stays_on_the_loop():
    pre = build_pre(ImagePre(kind="image", color="L", resize=(8, 8), layout="flat"), DIGITS, Path("."))
    assert not pre.plan([png(8, 8)]).off_loop
    assert pre.plan([png(8, 8)] * 2).off_loop  # each image costs about a hop to a thread
    assert pre.plan([png(128, 128)]).off_loop


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, at 89 Mpx
def test_plan_refuses_a_decompression_bomb_without_decoding_it():
    pre = build_pre(ImagePre(kind="image", resize=224, center_crop=(224, 224)), IMAGE, Path("."))
    bomb = png(12000, 12000)  # 140 kB of PNG, 144 Mpx (1.6 s to decode before the bound)
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match="pre.max_pixels"):
        pre.plan([bomb])
    assert time.perf_counter() - start < 0.5  # a header read: about 0.1 ms


def test_audio_plan_counts_samples():
    pre = build_pre(AudioPre(kind="audio"), AUDIO, Path("."))
    second, tenth = encode_wav(np.zeros(16000, np.float32), 16000), encode_wav(np.zeros(1600, np.float32), 16000)
    plan = pre.plan([second, tenth])
    assert (plan.cost, plan.unit, plan.off_loop) == (17600, "samples", True)
    assert not pre.plan([tenth]).off_loop
    assert plan.run()["audio"].shape == (2, 16000)


def test_audio_plan_reads_any_format_header_and_decodes_nothing():
    pre = build_pre(AudioPre(kind="audio", sample_rate=16000), AUDIO, Path("."))
    stereo = encode(np.zeros((44100, 2), np.float32), 44100, "FLAC")  # 1 s of 44.1 kHz stereo
    ogg = encode(np.zeros(8000, np.float32), 8000, "OGG", "VORBIS")
    plan = pre.plan([stereo, ogg])
    assert (plan.cost, plan.unit, plan.off_loop) == (2 * 44100 + 8000, "samples", True)  # frames x channels
    assert plan.run()["audio"].shape == (2, 16000)  # both 1 s at the model's rate
    long = encode(np.zeros(16000 * 61, np.float32), 16000, "FLAC")  # 61 s of silence: 4 kB of FLAC
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match=r"clip is 61.0 s, longer than 60 s \(pre.max_seconds\)") as info:
            pre.plan([ogg, long])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.loc == ("instances", 1)
    assert peak < 2**20  # a header read: the 3.9 MB of decoded samples never exist


def test_text_plan_counts_characters_and_tokenizing_goes_off_the_loop(tmp_path):
    pytest.importorskip("tokenizers")
    from test_text_audio_pre import make_tokenizer

    make_tokenizer(tmp_path / "tokenizer.json")
    specs = [TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1]),
             TensorSpec(name="attention_mask", datatype="INT64", shape=[-1, -1])]  # fmt: skip
    pre = build_pre(TextPre(kind="text", tokenizer="tokenizer.json"), specs, tmp_path)
    short, long = pre.plan(["the movie"]), pre.plan(["the movie was good " * 200])
    assert (short.cost, short.unit, short.off_loop) == (9, "characters", False)
    assert long.off_loop and long.run()["input_ids"].shape == (1, 512)
    raw = build_pre(TextPre(kind="text"), [TensorSpec(name="text", datatype="BYTES", shape=[-1, 1])], tmp_path)
    assert not raw.plan(["x" * 100_000]).off_loop  # no tokenizer: the strings go in as they are


def test_tabular_and_tensor_plans():
    specs = [TensorSpec(name="input", datatype="FP32", shape=[-1, 2], features=["a", "b"])]
    pre = build_pre(TabularPre(kind="tabular"), specs, Path("."))
    plan = pre.plan([{"a": 1, "b": 2}])
    assert (plan.cost, plan.unit, plan.off_loop, pre.takes_raw) == (2, "cells", False, False)
    assert pre.plan([{"a": 1, "b": 2}] * 5000).off_loop
    np.testing.assert_array_equal(plan.run()["input"], [[1, 2]])
    none = build_pre(TensorPre(), specs, Path("."))
    assert not none.takes_raw
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.a: unknown input; the model takes \['input'\]"):
        none.plan([{"a": 1}])
    np.testing.assert_array_equal(none.plan([[1, 2], [3, 4]]).run()["input"], [[1, 2], [3, 4]])  # rows, stacked
    with pytest.raises(InvalidInput, match=r"instances\[1\]: expected shape \[2\] for input 'input'"):
        none.plan([[1, 2], [3, 4, 5]]).run()


def test_plan_of_nothing_is_an_error():
    pre = build_pre(ImagePre(kind="image", resize=224, center_crop=(224, 224)), IMAGE, Path("."))
    with pytest.raises(InvalidInput, match="at least one instance"):
        pre.plan([])
