"""Image pre-processing: decode, color, resize, crop, invert, scale, mean/std, layout; bad images."""

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from fixtures import image_model, write_model

from forwardpass import InvalidInput, ModelConfigError, Repository


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


# --- resampling: an area filter down, a smooth one up -----------------------------------------------


def gray_model(tmp_path, pre, h=8, w=8):
    return load(tmp_path, {"color": "L", "resize": [h, w], "scale": 1.0, "layout": "flat", **pre}, 1, h, w, "flat")


BLOCKS = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_image_drawn_larger_shrinks_back_to_its_pixels(tmp_path, factor):
    # each pixel drawn as a factor x factor block; shrinking must average within blocks, not across them
    big = np.kron(BLOCKS, np.ones((factor, factor), np.uint8))
    out = gray_model(tmp_path, {}).predict(png(big))["pixels"]
    np.testing.assert_array_equal(out, BLOCKS.reshape(-1))


def test_non_integer_shrink_is_an_area_average(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (21, 21), dtype=np.uint8)
    out = gray_model(tmp_path, {}).predict(png(image))["pixels"]
    box = np.asarray(PIL.Image.fromarray(image).resize((8, 8), PIL.Image.Resampling.BOX), np.float32)
    np.testing.assert_allclose(out, box.reshape(-1), atol=1)


def test_resample_names_one_filter_for_both_directions(tmp_path):
    big = np.kron(BLOCKS, np.ones((4, 4), np.uint8))
    out = gray_model(tmp_path, {"resample": "bilinear"}).predict(png(big))["pixels"]
    bilinear = np.asarray(PIL.Image.fromarray(big).resize((8, 8), PIL.Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_array_equal(out, bilinear.reshape(-1))


def test_growing_is_bilinear_unless_told(tmp_path):
    small = BLOCKS[:4, :4]
    smooth = np.asarray(PIL.Image.fromarray(small).resize((8, 8), PIL.Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_array_equal(gray_model(tmp_path / "a", {}).predict(png(small))["pixels"], smooth.reshape(-1))
    nearest = gray_model(tmp_path / "b", {"resample": {"up": "nearest"}}).predict(png(small))["pixels"]
    np.testing.assert_array_equal(nearest, np.kron(small, np.ones((2, 2))).reshape(-1))


def test_an_axis_that_shrinks_and_one_that_grows_each_get_their_filter(tmp_path):
    # 8 wide, 2 high -> 4x4: columns come in equal pairs (box gives each pair's value), rows are equal
    row = np.array([0, 0, 100, 100, 200, 200, 50, 50], np.uint8)
    out = gray_model(tmp_path, {}, h=4, w=4).predict(png(np.stack([row, row])))["pixels"].reshape(4, 4)
    np.testing.assert_array_equal(out, np.tile([0, 100, 200, 50], (4, 1)))


def test_unknown_resample_filter_is_a_config_error(tmp_path):
    with pytest.raises(ModelConfigError) as info:
        gray_model(tmp_path, {"resample": {"down": "cubic"}})
    assert info.value.loc == "pre.resample.down" and "box" in info.value.msg


def test_big_jpeg_shrunk_at_decode_matches_the_full_decode(tmp_path):
    # libjpeg's reduced-scale decoding (draft) stands in for most of the box filter: same picture
    y, x = np.mgrid[0:1024, 0:1024]
    picture = np.stack([x // 4, y // 4, (x + y) // 8], axis=-1).astype(np.uint8)
    data = png(picture, "JPEG")
    model = load(tmp_path, {"resize": [64, 64], "scale": 1.0}, h=64, w=64)
    out = model.predict(data)["pixels"].transpose(1, 2, 0)
    full = PIL.Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), PIL.Image.Resampling.BOX)
    assert np.abs(out - np.asarray(full, np.float32)).mean() < 1.0


def test_b64_object_form(tmp_path):
    model = load(tmp_path, {"scale": 1 / 255})
    data = png(RGB)
    np.testing.assert_array_equal(model.predict({"b64": base64.b64encode(data).decode()})["pixels"],
                                  model.predict(data)["pixels"])  # fmt: skip


# --- bounds checked from the header, before decoding -------------------------------------------------


def png_header(w: int, h: int, mode: int = 0) -> bytes:
    """A PNG that declares w x h grayscale pixels and stops after its header: only a header reader can size it."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, mode, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 1000) + b"IDAT" + zlib.compress(b"\x00" * 64)[:20]


def test_pixel_limit_refuses_from_the_header(tmp_path):
    model = load(tmp_path, {"resize": [4, 4]})
    with pytest.raises(InvalidInput) as info:
        model.predict([png(RGB), png_header(9000, 9000)])  # 81 Mpx: under Pillow's own limits
    assert info.value.loc == ("instances", 1)
    assert "9000x9000" in info.value.msg and "pre.max_pixels (25,000,000)" in info.value.msg


def test_pixel_limit_is_configurable(tmp_path):
    model = load(tmp_path, {"resize": [4, 4], "max_pixels": 100})
    model.predict(png(np.zeros((10, 10, 3), np.uint8)))
    with pytest.raises(InvalidInput, match=r"11x10 = 110 pixels, more than pre.max_pixels \(100\)"):
        model.predict(png(np.zeros((10, 11, 3), np.uint8)))


def test_pillow_decompression_bomb_names_the_limit(tmp_path):
    with pytest.raises(InvalidInput, match=r"pre.max_pixels \(25,000,000\)"):
        load(tmp_path, {"resize": [4, 4]}).predict(png_header(20000, 20000))


def test_request_pixel_budget_refuses_before_decoding(tmp_path):
    model = load(tmp_path, {"resize": [4, 4], "max_total_pixels": 20_000_000})
    with pytest.raises(InvalidInput) as info:
        model.predict([png_header(4000, 4000), png_header(4000, 3000)])  # each under max_pixels, 28 Mpx together
    assert info.value.loc == ("instances",)
    assert "28,000,000 pixels together, more than pre.max_total_pixels (20,000,000)" in info.value.msg


def test_mixed_output_sizes_refused_before_decoding(tmp_path):
    with pytest.raises(InvalidInput, match="same size"):
        load(tmp_path, {}).predict([png_header(40, 40), png_header(50, 50)])  # neither could be decoded
