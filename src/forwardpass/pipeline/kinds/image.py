"""``pre: {kind: image, ...}``: PNG/JPEG -> a decoded, resized, cropped, scaled, normalized float tensor.

    pre: {kind: image, resize: 256, center_crop: [224, 224], mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}

    pre = build_pre(config.pre, specs, folder)
    pre([png_bytes, pathlib.Path("cat.jpg"), "data:image/png;base64,..."])    # {"image": (3, 3, 224, 224)}

Pillow is imported when an image kind is built, not before: ``import forwardpass`` and tabular models
never load it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from forwardpass.config import PreOptions
from forwardpass.errors import InvalidInput
from forwardpass.pipeline.pre import BatchDefaults, Plan, Preprocessor, file_or_data, pick_input, raw_bytes, some
from forwardpass.tensors import to_numpy

if TYPE_CHECKING:
    import PIL.Image

    from forwardpass.config import TensorSpec

# Work below this costs less than handing it to a thread and back (about 0.09 ms here): an 8x8 PNG
# 0.07 ms (mostly per image: two are already worth the hop) and a 128x128 one 0.14 ms, 2-core machine
INLINE_PIXELS = 64 * 64  # one image at most

Filter = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]  # Pillow's resampling filters


class Resample(BaseModel):
    """Resize filters: ``down`` along an axis that shrinks, ``up`` along one that grows.

    ``box`` averages the pixels each output pixel covers (area), so an image drawn at 4x and
    shrunk back reads as drawn; bilinear or bicubic shrinking blurs across pixel blocks.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    down: Filter = "box"
    up: Filter = "bilinear"


class ImagePre(PreOptions):
    """PNG/JPEG bytes -> decoded, resized, cropped, scaled, normalized tensor."""

    kind: Literal["image"]
    input: str | None = None
    color: Literal["L", "RGB"] = "RGB"
    resize: int | tuple[int, int] | None = None  # int: shorter side; [h, w]: exact size
    resample: Resample = Resample()  # or one filter name for both directions: resample: bicubic
    center_crop: tuple[int, int] | None = None  # [h, w]
    invert: bool = False  # 255 - pixel, for models trained on white-on-black
    scale: float = 1 / 255
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: Literal["NCHW", "NHWC", "flat"] = "NCHW"
    # bounds read from the file's header, before any decoding: a 12000x12000 PNG is 140 kB of
    # request and 1.6 s of decoding (3.3 s on a busy loop); Pillow itself refuses only past 179 Mpx
    max_pixels: int = Field(25_000_000, ge=1, le=89_478_485)  # per image (a 6000x4000 photo); Pillow warns past le
    max_total_pixels: int = Field(100_000_000, ge=1)  # all the images of one request together

    @field_validator("resample", mode="before")
    @classmethod
    def _one_filter_for_both(cls, value: Any) -> Any:
        return {"down": value, "up": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _mean_std_lengths(self) -> ImagePre:
        channels = 1 if self.color == "L" else 3
        for field in ("mean", "std"):
            value = getattr(self, field)
            if value is not None and len(value) not in (1, channels):
                raise ValueError(f"{field} needs 1 or {channels} values for color {self.color}, got {len(value)}")
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError("std values must be non-zero")
        return self


class Image(Preprocessor):
    """PNG/JPEG (bytes, base64 or data URL, {"b64": ...}, pathlib.Path, PIL image) -> a float32 image tensor.

    An axis that shrinks is resized with ``resample.down`` (box: each output pixel is the mean
    of the pixels it covers), one that grows with ``resample.up`` (bilinear). With box, a JPEG
    at least twice the target size is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (an area
    average as well), which skips most of the decoding.
    """

    schema = ImagePre
    takes_raw = True
    per_instance = True
    batch = BatchDefaults(batch_size=32, chunk_rows=256, ray_rows=32)

    def __init__(self, config: ImagePre, specs: Sequence[TensorSpec], folder: Path):
        super().__init__(config, specs, folder)
        import PIL.Image  # here, not at the top: see the module's docstring

        self._pil = PIL.Image
        spec = pick_input(specs, config.input, "image", lambda s: s.datatype in ("FP32", "FP16", "FP64", "UINT8"))
        self.config: ImagePre = config
        self.input = spec.name
        self.dtype = to_numpy(spec.datatype)
        self.channels = 1 if config.color == "L" else 3
        # one mean or std value: every channel
        mean = np.broadcast_to(np.asarray(config.mean or [0.0], np.float32), (self.channels,))
        std = np.broadcast_to(np.asarray(config.std or [1.0], np.float32), (self.channels,))
        # (x * scale - mean) / std, and 255 - x before it when inverting, folded into one multiply-add
        # per pixel, done in place on whole rows: a 224x224 RGB image 1.3 ms -> 0.1 ms
        sign = -1.0 if config.invert else 1.0
        self._mul = (sign * config.scale / std).astype(np.float32)
        self._add = (((255.0 * config.scale if config.invert else 0.0) - mean) / std).astype(np.float32)
        self._per_row: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row length -> tiled mul, add
        filters = PIL.Image.Resampling
        self._box = filters.BOX
        self._down, self._up = filters[config.resample.down.upper()], filters[config.resample.up.upper()]

    def is_single(self, data: Any) -> bool:
        return not isinstance(data, (list, tuple))

    def read_row(self, row: Mapping[str, Any]) -> Any:
        """``{"path": "cat.jpg"}`` (an image folder, a JSONL of paths) reads the file; else the row's ``data``."""
        return file_or_data(row)

    def layouts(self) -> dict[str, str]:
        return {self.input: self.config.layout}

    def plan(self, instances: Sequence[Any]) -> Plan:
        """Open each image's header (no decoding), check the pixel bounds and the output size."""
        cfg = self.config
        some(instances)
        opened, sizes, total = [], [], 0
        for i, item in enumerate(instances):
            image = self._open(i, item)
            w, h = image.size
            if w * h > cfg.max_pixels:
                raise InvalidInput(("instances", i), f"image is {w}x{h} = {w * h:,} pixels, more than pre.max_pixels "
                                   f"({cfg.max_pixels:,}); send a smaller image, or raise pre.max_pixels in model.yaml",
                                   f"{image.format or 'image'} {w}x{h}")  # fmt: skip
            total += w * h
            opened.append((image, not isinstance(item, self._pil.Image)))  # only our own may be drafted
            sizes.append(self._sizes(i, w, h))
        if total > cfg.max_total_pixels:
            raise InvalidInput(("instances",), f"the {len(opened)} images hold {total:,} pixels together, more than "
                               f"pre.max_total_pixels ({cfg.max_total_pixels:,}); send fewer or smaller images per "
                               "request, or raise pre.max_total_pixels in model.yaml", total)  # fmt: skip
        final = {out for _, out in sizes}
        if len(final) > 1:
            raise InvalidInput(("instances",), "images in one batch must come out the same size; set pre.resize "
                               "or pre.center_crop in model.yaml", sorted((h, w) for w, h in final))  # fmt: skip
        off_loop = len(opened) > 1 or total > INLINE_PIXELS
        return Plan(total, "pixels", off_loop, lambda: self._run(opened, sizes))

    def _sizes(self, i: int, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(w, h) after the resize and after the crop, from the header's size."""
        cfg = self.config
        if isinstance(cfg.resize, int):
            s = cfg.resize / min(w, h)
            w, h = max(1, round(w * s)), max(1, round(h * s))
        elif cfg.resize is not None:
            h, w = cfg.resize
        if cfg.center_crop is None:
            return (w, h), (w, h)
        ch, cw = cfg.center_crop
        if ch > h or cw > w:
            raise InvalidInput(("instances", i), f"image {w}x{h} is smaller than the crop {cw}x{ch}")
        return (w, h), (cw, ch)

    def _run(self, images: list[tuple[PIL.Image.Image, bool]], sizes: list[tuple[tuple[int, int], tuple[int, int]]]
             ) -> dict[str, np.ndarray]:  # fmt: skip
        w, h = sizes[0][1]
        c = self.channels
        batch = np.empty((len(images), h, w, c), np.float32)  # (N, H, W, C)
        for i, ((image, ours), (resized, _)) in enumerate(zip(images, sizes)):
            batch[i] = self._pixels(i, image, resized, ours).reshape(h, w, c)  # uint8 -> float32
        rows = batch.reshape(-1, w * c)  # (N*H, W*C): a long inner loop; broadcasting over C=3 is 4x slower
        mul, add = self._per_row.get(rows.shape[1]) or self._tile(rows.shape[1])
        rows *= mul
        rows += add
        out: np.ndarray = batch
        if self.config.layout == "NCHW":
            out = batch.transpose(0, 3, 1, 2)
        elif self.config.layout == "flat":
            out = batch.reshape(len(images), -1)
        return {self.input: np.ascontiguousarray(out, dtype=self.dtype)}

    def _pixels(self, i: int, image: PIL.Image.Image, size: tuple[int, int], ours: bool) -> np.ndarray:
        """Decode, convert, resize and crop one image -> its uint8 pixels."""
        cfg = self.config
        try:
            if ours and size != image.size and self._down is self._box:
                if min(image.size[0] // size[0], image.size[1] // size[1]) >= 2:
                    image.draft(cfg.color, size)  # JPEG only (a no-op for others): decoded at >= size
            image.load()
            if image.mode != cfg.color:
                image = image.convert(cfg.color)
        except Exception as exc:  # truncated or corrupt files: OSError, SyntaxError, ValueError, ...
            raise InvalidInput(("instances", i), f"cannot decode image ({exc})",
                               f"{image.format or 'image'} {image.size[0]}x{image.size[1]}") from None  # fmt: skip
        if size != image.size:
            image = self._resize(image, size)
        if cfg.center_crop is not None:
            ch, cw = cfg.center_crop
            w, h = image.size
            left, top = (w - cw) // 2, (h - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
        return np.asarray(image)

    def _resize(self, image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
        (w, h), (tw, th) = image.size, size
        fx = self._down if tw < w else self._up
        fy = self._down if th < h else self._up
        if tw == w:
            fx = fy
        elif th == h:
            fy = fx
        if fx != fy:  # one axis shrinks, the other grows: one pass each (Pillow resizes axis by axis anyway)
            return self._resize_once(self._resize_once(image, (tw, h), fx), size, fy)
        return self._resize_once(image, size, fx)

    def _resize_once(self, image: PIL.Image.Image, size: tuple[int, int], resample: PIL.Image.Resampling
                     ) -> PIL.Image.Image:  # fmt: skip
        (w, h), (tw, th) = image.size, size
        if resample is self._box and tw <= w and th <= h:
            if w % tw == 0 and h % th == 0:
                return image.reduce((w // tw, h // th))  # exact block means, 3x faster than resize(BOX)
            return image.resize(size, resample, reducing_gap=2.0)  # reduce() first when at least 4x larger
        return image.resize(size, resample)

    def _tile(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """mul and add repeated along a row of ``row`` values; kept for a few sizes (a fixed-size model has one)."""
        width = row // len(self._mul)
        pair = (np.tile(self._mul, width), np.tile(self._add, width))
        if len(self._per_row) < 8:  # images of every size (no resize/crop) must not grow this without end
            self._per_row[row] = pair
        return pair

    def _open(self, i: int, item: Any) -> PIL.Image.Image:
        """The image with only its header read (PIL opens lazily); decoding waits for load()."""
        pil = self._pil
        if isinstance(item, pil.Image):
            return item
        data = raw_bytes(i, item, "image bytes (PNG/JPEG), base64 text or a pathlib.Path", "image")
        try:
            return pil.open(io.BytesIO(data))
        except pil.UnidentifiedImageError:
            raise InvalidInput(("instances", i), "cannot decode image: not a format Pillow reads (PNG, JPEG, ...)",
                               bytes(data[:16])) from None  # fmt: skip
        except pil.DecompressionBombError:
            raise InvalidInput(("instances", i), f"image is over {2 * pil.MAX_IMAGE_PIXELS:,} pixels, more than "
                               f"pre.max_pixels ({self.config.max_pixels:,}); send a smaller image",
                               bytes(data[:16])) from None  # fmt: skip
        except Exception as exc:  # a corrupt header: OSError, SyntaxError, ValueError, ...
            raise InvalidInput(("instances", i), f"cannot decode image ({exc})", bytes(data[:16])) from None
