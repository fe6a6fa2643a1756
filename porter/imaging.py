"""Images in, tensors out: decode, resize and normalize exactly as a model's PreprocessSpec says.

One pipeline shared by prediction and fine-tuning, so a model is trained and served on identical pixels:

1. ``load_image(src)`` -> ``uint8`` array ``H x W x 3`` in RGB order. Accepts a path, a PIL image or a numpy
   array. Grey, grey+alpha, RGB, RGBA, palette (with or without transparency), CMYK, 16-bit and float images
   are handled; EXIF orientation is applied; multi-frame files (GIF, TIFF) give their first frame; alpha is
   composited over white (what an image viewer shows), never silently dropped to whatever colour hides under it.
2. ``resize(image, (H, W))`` -> bilinear (PIL ``BILINEAR``, which antialiases when shrinking).
3. ``to_tensor(images, spec, channels)`` -> float32 batch in ``spec.layout``:
   ``x = (pixels_in_spec.channel_order * spec.scale - spec.mean) / spec.std``; one-channel models get luminance
   (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, the weights PIL's ``convert("L")`` uses).

Every failure is a ``DataError`` that names the file. Only numpy and Pillow are imported, and Pillow lazily.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .errors import DataError

if TYPE_CHECKING:
    from .spec import PreprocessSpec

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
BACKGROUND = 255  # alpha is composited over white


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def describe_source(src: Any, index: int | None = None) -> str:
    """How an input is named in messages: its path, or 'image N' for in-memory images."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"encoded image {index}" if index is not None else "encoded image"
    kind = "PIL image" if _is_pil(src) else "array" if isinstance(src, np.ndarray) else type(src).__name__
    return f"{kind} {index}" if index is not None else kind


# --- decoding ---------------------------------------------------------------------------------------------------

class ImageSource:
    """An image that decodes itself (an augmented view of a file, say): ``load_image`` calls ``rgb``."""

    def rgb(self, label: str) -> np.ndarray:  # uint8 H x W x 3
        raise NotImplementedError


def load_image(src: Any, size: Sequence[int] | None = None, *, name: str | None = None,
               fast_decode: bool = False) -> np.ndarray:
    """Decode ``src`` (path, an encoded file's bytes, PIL image, or numpy array of raw pixels) to uint8
    ``H x W x 3`` RGB.

    ``size`` (H, W) resizes bilinearly. ``name`` is what errors call the image (default: the path).
    ``fast_decode``: a JPEG file at least 4x larger than ``size`` is decoded at 1/2, 1/4 or 1/8 scale in the
    DCT domain (libjpeg's scaling), never below twice the target size, then resized as usual: 2-3x faster on
    camera photos, pixels within a level or two of the exact path (not bit-identical, hence off by default).
    """
    label = name or describe_source(src)
    if isinstance(src, (str, os.PathLike)):
        image = _decode_file(Path(src), label, size, fast_decode)
    elif isinstance(src, (bytes, bytearray, memoryview)):  # a file's contents (read elsewhere, e.g. by Ray Data)
        image = _decode(io.BytesIO(src), label, size, fast_decode)
    elif _is_pil(src):
        image = _pil_to_rgb(src, label, size)
    elif isinstance(src, np.ndarray):
        image = array_to_rgb(src, label)
    elif isinstance(src, ImageSource):
        image = src.rgb(label)
    else:
        raise DataError(f"{label}: can't read an image from a {type(src).__module__}.{type(src).__name__}; "
                        f"give a file path, its bytes, a PIL image or a uint8 numpy array (H x W [x C])")
    if size is not None:
        image = resize(image, size)  # a no-op when decoding already resized
    return image


def _is_pil(obj: Any) -> bool:
    mod = type(obj).__module__
    if not mod.startswith("PIL."):
        return False
    from PIL import Image

    return isinstance(obj, Image.Image)


def _decode_file(path: Path, label: str, size: Sequence[int] | None = None, fast_decode: bool = False) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{label}: no such file")
    if path.is_dir():
        raise DataError(f"{label}: is a directory, not an image")
    return _decode(path, label, size, fast_decode)


def _decode(file: "Path | io.BytesIO", label: str, size: Sequence[int] | None, fast_decode: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            if fast_decode and size is not None and img.format == "JPEG":
                side = 2 * max(int(size[0]), int(size[1]))  # square: EXIF rotation may swap the axes later
                img.draft(None, (side, side))  # libjpeg picks the smallest 1/2^k scale still >= side x side
            img.load()  # decode now, inside the try: truncated files fail here
            return _pil_to_rgb(img, label, size)
    except UnidentifiedImageError:
        raise DataError(f"{label}: not an image Pillow can decode (supported: "
                        f"{', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{label}: refused, image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise DataError(f"{label}: can't decode image ({' '.join(str(e).split()) or type(e).__name__}); "
                        f"the file may be truncated or corrupt") from None


def _pil_to_rgb(img: Any, label: str, size: Sequence[int] | None = None) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        if img.getexif().get(0x0112, 1) not in (0, 1):  # EXIF orientation: rotate/flip as a viewer would
            img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image; keep it unrotated
        pass
    mode = img.mode
    if mode == "RGB":  # the common case stays in PIL until the end: one resize, one copy
        if size is not None and (img.height, img.width) != (int(size[0]), int(size[1])):
            img = img.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
        return np.array(img, dtype=np.uint8)
    if mode == "F":  # float grey (TIFF): intensities, clipped to 0..255
        return array_to_rgb(np.clip(np.asarray(img), 0, 255).round().astype(np.uint8), label)
    if mode.startswith("I"):  # 16/32-bit grey: 16-bit data is scaled to 0..255, not clipped
        return array_to_rgb(np.asarray(img).astype(np.int64), label)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa", "RGBA"):
        img = img.convert("RGBA")
    elif mode in ("1", "L"):
        return array_to_rgb(np.asarray(img.convert("L"), dtype=np.uint8), label)
    else:  # CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("RGB")
    return array_to_rgb(np.asarray(img, dtype=np.uint8), label)


def array_to_rgb(arr: np.ndarray, label: str = "array") -> np.ndarray:
    """A raw pixel array (H x W, H x W x 1|2|3|4) -> uint8 H x W x 3 RGB (alpha composited over white).

    uint8 and bool are taken as is; other integer types must hold 0..255, except 16-bit images (max > 255),
    which are scaled from 0..65535. Float arrays are refused: they are usually already preprocessed.
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        raise DataError(f"{label}: looks channels-first {a.shape}; raw images are H x W x C (use arr.transpose(1, 2, 0)), "
                        f"or pass preprocessed=True for a tensor that is already normalized")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)) or 0 in a.shape:
        raise DataError(f"{label}: expected a raw image H x W or H x W x C with C in 1..4, got shape {a.shape}; "
                        f"for a tensor that is already normalized pass preprocessed=True")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind in "iu" and a.dtype != np.uint8:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise DataError(f"{label}: raw pixels must be 0..255 (or 0..65535 for 16-bit), got {lo}..{hi}")
        a = (a.astype(np.float64) * (255.0 / 65535.0) + 0.5).astype(np.uint8) if hi > 255 else a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise DataError(f"{label}: raw images must be uint8 pixels 0..255, got {a.dtype}; "
                        f"for a tensor that is already normalized pass preprocessed=True")
    if a.ndim == 2:
        a = a[:, :, None]
    c = a.shape[2]
    if c in (2, 4):  # colour (or grey) + alpha: composite over white
        alpha = a[:, :, -1:].astype(np.float32) / 255.0
        colour = a[:, :, :-1].astype(np.float32)
        a = (colour * alpha + BACKGROUND * (1.0 - alpha) + 0.5).astype(np.uint8)
        c -= 1
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


# --- geometry ---------------------------------------------------------------------------------------------------

def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a uint8 H x W x 3 image to ``size`` = (H, W); a no-op when it already fits."""
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise DataError(f"can't resize to {h}x{w}: sizes must be positive")
    if image.shape[0] == h and image.shape[1] == w:
        return image
    from PIL import Image

    out = Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


# --- normalization ----------------------------------------------------------------------------------------------

def tensor_shape(n: int, size: Sequence[int], spec: "PreprocessSpec", channels: int | None = None) -> tuple[int, ...]:
    """The shape ``to_tensor`` gives ``n`` images of ``size`` (H, W)."""
    h, w = int(size[0]), int(size[1])
    c = int(channels or spec.channels or 3)
    return (n, h, w, c) if spec.layout == "NHWC" else (n, c, h, w)


def to_tensor(images: Sequence[np.ndarray], spec: "PreprocessSpec", channels: int | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """Stack uint8 H x W x 3 RGB images into a float32 batch in ``spec.layout``, normalized by ``spec``.

    ``channels`` is what the model takes (default ``spec.channels`` or 3): 3 -> channels in
    ``spec.channel_order``; 1 -> luminance. All images must already share one size (see ``resize``).
    ``out``: a C-contiguous float32 array of ``tensor_shape(...)`` to write into (no allocation).
    """
    if not len(images):
        raise DataError("no images to convert to a tensor")
    n_ch = int(channels or spec.channels or 3)
    if n_ch not in (1, 3):
        raise DataError(f"the model takes {n_ch}-channel images; porter feeds 1-channel (grey) or 3-channel "
                        f"(RGB/BGR) images, so preprocess this model's input yourself and pass preprocessed=True")
    shapes = {tuple(im.shape[:2]) for im in images}
    if len(shapes) > 1:
        raise DataError(f"images have different sizes {sorted(shapes)}; resize them to one size first")
    rgb = [_as_rgb(im, i) for i, im in enumerate(images)]
    n, (h, w) = len(rgb), rgb[0].shape[:2]
    shape = tensor_shape(n, (h, w), spec, n_ch)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}, got {out.dtype}{out.shape}")
    a, b, tables = _affine(spec, n_ch)
    if n_ch == 1:
        grey = out.reshape(n, h, w)
        np.matmul(np.stack(rgb), LUMA_WEIGHTS, out=grey)
        grey *= a[0]
        grey += b[0]
        return out
    sources = (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)
    uniform = spec.layout == "NHWC" and sources == (0, 1, 2) and bool(np.all(a == a[0]) and np.all(b == b[0]))
    for i, im in enumerate(rgb):
        if uniform:  # the common tf/unit/raw case: one gather over the whole image
            np.take(tables[0], im, out=out[i], mode="clip")  # mode=clip: no bounds-check buffer (uint8 fits)
            continue
        for c, src in enumerate(sources):
            np.take(tables[c], im[..., src], out=out[i, c] if spec.layout == "NCHW" else out[i, ..., c], mode="clip")
    return out


@functools.lru_cache(maxsize=64)
def _affine(spec: "PreprocessSpec", n_ch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p * scale - mean) / std == p * a + b`` per channel in float32, and its value for every uint8 ``p``.

    A uint8 pixel has 256 values: normalizing is then a gather from a 256-entry table per channel, written straight
    into the output in the model's layout and channel order. One pass instead of cast + multiply + add (4x faster,
    and the same float32 arithmetic, so the same bits). Cached: decoding workers call this once per image.
    """
    mean = _stat(spec.mean, n_ch, "mean")
    std = _stat(spec.std, n_ch, "std")
    a = (np.float32(spec.scale) / std).astype(np.float32)
    b = (-mean / std).astype(np.float32)
    tables = np.arange(256, dtype=np.float32)[None, :] * a[:, None] + b[:, None]  # channels x 256
    for arr in (a, b, tables):
        arr.flags.writeable = False  # shared by every caller
    return a, b, tables


def _as_rgb(im: np.ndarray, index: int) -> np.ndarray:
    if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
        return array_to_rgb(im, f"image {index}")
    return im


def _stat(values: Sequence[float], n: int, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if v.size == 1:
        v = np.repeat(v, n)
    elif v.size == 3 and n == 1:
        v = np.array([v.mean()], dtype=np.float32)
    elif v.size != n:
        raise DataError(f"preprocessing {what} has {v.size} values but the model takes {n} channels")
    return v.astype(np.float32)


def preprocess(sources: Sequence[Any], spec: "PreprocessSpec", size: Sequence[int] | None = None,
               channels: int | None = None) -> np.ndarray:
    """Decode, resize (to ``size`` or ``spec.size``) and normalize a list of images in one call."""
    target = size or spec.size
    images = [load_image(s, target, name=describe_source(s, i)) for i, s in enumerate(sources)]
    return to_tensor(images, spec, channels)


# --- finding files ----------------------------------------------------------------------------------------------

def list_images(inputs: Iterable[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Expand files and directories (recursively, sorted, hidden entries skipped) into image file paths.

    A file named explicitly is kept whatever its extension (decoding decides); a directory contributes the
    files with a supported extension. A missing path or a directory without images is a DataError.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(f for f in p.glob(pattern)
                           if f.is_file() and is_image_file(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise DataError(f"{item}: directory has no images (looked {'recursively ' if recursive else ''}for "
                                f"{', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not found:
        raise DataError("no input images given")
    return found
