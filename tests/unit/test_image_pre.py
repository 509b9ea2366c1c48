"""Image pre-processing: decode, color, resize, crop, invert, scale, mean/std, layout; bad images."""

import base64
import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from fixtures import image_model, write_model
from forwardpass import InvalidInput, Repository


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def load(tmp_path, pre, channels=3, h=4, w=4, layout="NCHW"):
    config = {"task": "custom", "pre": {"kind": "image", **pre}}
    write_model(tmp_path, "img", config, image_model(channels, h, w, layout))
    return Repository(tmp_path).load("img")


RGB = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5


def test_rgb_nchw_scale(tmp_path):
    model = load(tmp_path, {"color": "RGB", "scale": 1 / 255})
    out = model.predict(png(RGB))["pixels"]
    np.testing.assert_allclose(out, RGB.transpose(2, 0, 1) / 255, rtol=1e-6)


def test_nhwc_mean_std(tmp_path):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    model = load(tmp_path, {"scale": 1 / 255, "mean": mean, "std": std, "layout": "NHWC"}, layout="NHWC")
    out = model.predict(png(RGB))["pixels"]
    np.testing.assert_allclose(out, (RGB / 255 - mean) / std, rtol=1e-5)


def test_one_mean_and_std_for_every_channel_with_invert(tmp_path):
    model = load(tmp_path, {"scale": 1 / 255, "mean": [0.5], "std": [0.25], "invert": True, "layout": "NHWC"},
                 layout="NHWC")  # fmt: skip
    out = model.predict(png(RGB))["pixels"]
    np.testing.assert_allclose(out, ((255.0 - RGB) / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-6)


def test_grayscale_flat_invert(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    model = load(tmp_path, {"color": "L", "invert": True, "scale": 1.0, "layout": "flat"}, channels=1, layout="flat")
    out = model.predict(png(gray))["pixels"]
    np.testing.assert_allclose(out, 255.0 - gray.reshape(-1), rtol=1e-6)


def test_resize_then_center_crop(tmp_path):
    big = np.zeros((12, 16, 3), np.uint8)
    big[4:8, 6:10] = 255  # a white square in the middle
    model = load(tmp_path, {"resize": 6, "center_crop": [4, 4], "scale": 1 / 255})
    # shorter side 12 -> 6: 6x8, centre crop 4x4 keeps the (resized) square in the middle
    out = model.predict(png(big))["pixels"]
    assert out.shape == (3, 4, 4)
    assert out[:, 1:3, 1:3].min() > 0.5 and out[:, 0, 0].max() < 0.1


def test_exact_resize_and_jpeg(tmp_path):
    model = load(tmp_path, {"resize": [4, 4], "scale": 1 / 255})
    out = model.predict(png(np.full((9, 7, 3), 200, np.uint8), "JPEG"))["pixels"]
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out, 200 / 255, atol=0.02)


def test_input_forms_agree(tmp_path):
    model = load(tmp_path, {"scale": 1 / 255})
    data = png(RGB)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    forms = [data, b64, "data:image/png;base64," + b64, Path(path), PIL.Image.open(io.BytesIO(data))]
    batch = model.predict(forms)["pixels"]
    assert batch.shape == (5, 3, 4, 4)
    for row in batch[1:]:
        np.testing.assert_array_equal(row, batch[0])


@pytest.mark.parametrize(
    ("item", "msg"),
    [
        (b"definitely not an image", "cannot decode image"),
        (png(RGB)[:40], "cannot decode image"),
        ("not base64!!", "expected base64"),
        (12345, "expected image bytes"),
        (Path("/nonexistent/x.png"), "cannot read image file"),
    ],
)
def test_bad_images(tmp_path, item, msg):
    model = load(tmp_path, {"scale": 1 / 255})
    with pytest.raises(InvalidInput) as info:
        model.predict([png(RGB), item])
    assert info.value.loc == ("instances", 1)
    assert msg in info.value.msg


def test_wrong_size_without_resize_and_mixed_sizes(tmp_path):
    model = load(tmp_path, {"scale": 1 / 255})
    with pytest.raises(InvalidInput, match="expected shape"):
        model.predict(png(np.zeros((5, 5, 3), np.uint8)))
    with pytest.raises(InvalidInput, match="same size"):
        model.predict([png(RGB), png(np.zeros((5, 5, 3), np.uint8))])


def test_crop_larger_than_image(tmp_path):
    model = load(tmp_path, {"center_crop": [4, 4]})
    with pytest.raises(InvalidInput, match="smaller than the crop"):
        model.predict(png(np.zeros((2, 2, 3), np.uint8)))
