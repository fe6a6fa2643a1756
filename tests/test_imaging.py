"""porter.imaging: decoding every image mode, EXIF orientation, resizing, normalization, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from porter.errors import DataError
from porter.imaging import (IMAGE_EXTENSIONS, array_to_rgb, list_images, load_image, preprocess, resize,
                            tensor_shape, to_tensor)
from porter.spec import PreprocessSpec


def gradient(h=6, w=8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --- decoding -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_formats_round_trip(tmp_path, ext):
    rgb = gradient()
    path = tmp_path / f"img{ext}"
    Image.fromarray(rgb).save(path, **({"lossless": True} if ext == ".webp" else {}))
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close_to_source(tmp_path):
    rgb = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    out = load_image(str(tmp_path / "a.jpg"))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - rgb).max() <= 3


def test_grey_becomes_three_equal_channels(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_rgba_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)   # opaque red stays red
    rgba[0, 1] = (0, 0, 0, 0)       # transparent black becomes white
    rgba[1, 0] = (0, 0, 0, 128)     # half-transparent black becomes mid grey
    out = load_image(Image.fromarray(rgba, "RGBA"))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.gif", transparency=0)
    out = load_image(tmp_path / "p.gif")
    assert tuple(out[0, 0]) == (10, 200, 30)
    assert tuple(out[1, 1]) == (255, 255, 255)  # palette index 0 is transparent


def test_palette_without_transparency(tmp_path):
    rgb = gradient(4, 4)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out.shape == (4, 4, 3)
    assert np.abs(out.astype(int) - rgb).max() <= 8


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    deep = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = load_image(tmp_path / "d.png")
    assert list(out[:, :, 0].ravel()) == [0, 255, 128, 4]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (4, 4, 3)
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60 and out[0, 0, 2] < 60  # red


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[0, 0] = 255  # a white pixel top-left of a 2x4 (H x W) image
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=100)
    out = load_image(tmp_path / "o.jpg")
    assert out.shape == (4, 2, 3)  # rotated: now 4 high, 2 wide
    assert out[0, 1].min() > 200  # the white pixel moved to the top-right


def test_first_frame_of_animated_gif(tmp_path):
    frames = [Image.new("RGB", (3, 3), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out = load_image(tmp_path / "a.gif")
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_numpy_inputs():
    np.testing.assert_array_equal(load_image(np.full((3, 3), 7, np.uint8))[:, :, 2], 7)
    np.testing.assert_array_equal(load_image(np.full((3, 3, 1), 9, np.uint8)), 9)
    assert load_image(np.ones((3, 3, 3), np.int32) * 5).dtype == np.uint8
    assert load_image(np.ones((3, 3), bool))[0, 0, 0] == 255


@pytest.mark.parametrize("arr, needle", [
    (np.zeros((3, 3, 3), np.float32), "preprocessed=True"),
    (np.zeros((3, 8, 8), np.uint8), "channels-first"),
    (np.zeros((2, 3, 3, 3), np.uint8), "expected a raw image"),
    (np.full((2, 2), -1, np.int16), "0..255"),
])
def test_bad_arrays(arr, needle):
    with pytest.raises(DataError, match=needle):
        array_to_rgb(arr, "array 0")


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"text\.jpg: not an image"):
        load_image(tmp_path / "text.jpg")
    good = tmp_path / "good.png"
    Image.fromarray(gradient(64, 64)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut\.png: can't decode image.*truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match=r"missing\.png: no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match="can't read an image from a builtins.dict"):
        load_image({"not": "image"})


# --- resizing -----------------------------------------------------------------------------------------------------

def test_resize_is_pil_bilinear():
    rgb = gradient(20, 30)
    out = resize(rgb, (10, 12))
    expected = np.asarray(Image.fromarray(rgb).resize((12, 10), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, expected)
    assert resize(rgb, (20, 30)) is rgb
    assert load_image(rgb, (5, 7)).shape == (5, 7, 3)


def photo(h: int, w: int) -> np.ndarray:
    """Smooth colour fields plus grain: what a camera JPEG looks like to the decoder."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / 37), np.cos(yy / 23), np.sin((xx + yy) / 51)], -1) * 100 + 128
    return np.clip(base + np.random.default_rng(0).normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def test_fast_decode_scales_large_jpegs_in_the_dct_domain(tmp_path):
    big, small, png = tmp_path / "big.jpg", tmp_path / "small.jpg", tmp_path / "big.png"
    Image.fromarray(photo(600, 800)).save(big, quality=92)  # >= 4x the 64x48 target: decoded at 1/4 scale
    Image.fromarray(photo(150, 200)).save(small, quality=92)  # < 4x: decoded in full
    Image.fromarray(photo(600, 800)).save(png)
    size = (48, 64)
    exact = load_image(big, size)
    fast = load_image(big, size, fast_decode=True)
    with Image.open(big) as im:
        im.draft(None, (128, 128))
        assert im.size == (200, 150)  # libjpeg's 1/4 scale: the smallest still >= 128 x 128
        by_hand = np.asarray(im.convert("RGB").resize((64, 48), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(fast, by_hand)
    diff = np.abs(fast.astype(int) - exact)
    assert 0 < diff.max() <= 2 and diff.mean() < 0.5  # close to exact, but a different path
    for path in (small, png):  # too small to scale, or not a JPEG: exactly the normal path
        np.testing.assert_array_equal(load_image(path, size, fast_decode=True), load_image(path, size))


# --- normalization ------------------------------------------------------------------------------------------------

def test_to_tensor_torch_preset_nchw():
    spec = PreprocessSpec.preset("torch", layout="NCHW", size=(6, 8))
    imgs = [gradient(), gradient()[::-1].copy()]
    x = to_tensor(imgs, spec)
    assert x.shape == (2, 3, 6, 8) and x.dtype == np.float32 and x.flags.c_contiguous
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((imgs[1] / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(x[1], expected, rtol=1e-5, atol=1e-5)


def test_to_tensor_caffe_is_bgr_nhwc():
    spec = PreprocessSpec.preset("caffe")
    img = gradient()
    x = to_tensor([img], spec)
    assert x.shape == (1, 6, 8, 3)
    expected = img[:, :, ::-1].astype(np.float64) - np.array([103.939, 116.779, 123.68])
    np.testing.assert_allclose(x[0], expected, rtol=1e-5, atol=1e-4)


def test_to_tensor_tf_preset_range():
    x = to_tensor([np.array([[[0, 255, 127]]], np.uint8)], PreprocessSpec.preset("tf"))
    np.testing.assert_allclose(x.ravel(), [-1.0, 1.0, 127 / 127.5 - 1], atol=1e-6)


@pytest.mark.parametrize("mode", ["raw", "unit", "tf", "torch", "caffe"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_to_tensor_is_exactly_the_float32_formula(mode, layout):
    """Every pixel value 0..255 in every channel: the table lookup gives the same bits as computing
    float32(p) * (scale / std) + (-mean / std) directly, in the model's layout and channel order."""
    spec = PreprocessSpec.preset(mode, layout=layout, size=(16, 48))
    values = np.arange(256 * 3, dtype=np.int64).reshape(16, 48, 1)
    img = np.concatenate([values % 256, (values * 7) % 256, (values * 13 + 5) % 256], axis=2).astype(np.uint8)
    out = np.full(tensor_shape(2, (16, 48), spec), np.nan, np.float32)
    x = to_tensor([img, img[::-1].copy()], spec, out=out)
    assert x is out
    std = np.asarray(spec.std, np.float32)
    a = (np.float32(spec.scale) / std).astype(np.float32)
    b = (-np.asarray(spec.mean, np.float32) / std).astype(np.float32)
    for i, im in enumerate([img, img[::-1]]):
        channels = im[..., ::-1] if spec.channel_order == "BGR" else im
        expected = channels.astype(np.float32) * a + b  # numpy broadcasts over the last (channel) axis
        if layout == "NCHW":
            expected = expected.transpose(2, 0, 1)
        np.testing.assert_array_equal(x[i], expected)


def test_one_channel_models_get_luminance():
    spec = PreprocessSpec.preset("unit", layout="NCHW", channels=1)
    img = np.array([[[255, 0, 0], [10, 10, 10]]], np.uint8)
    x = to_tensor([img], spec, channels=1)
    assert x.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(x.ravel(), [0.299, 10 / 255], rtol=1e-5)


def test_to_tensor_errors():
    spec = PreprocessSpec.preset("raw")
    with pytest.raises(DataError, match="different sizes"):
        to_tensor([gradient(4, 4), gradient(5, 5)], spec)
    with pytest.raises(DataError, match="4-channel"):
        to_tensor([gradient()], spec, channels=4)
    with pytest.raises(DataError, match="no images"):
        to_tensor([], spec)


def test_preprocess_decodes_resizes_and_normalizes(tmp_path):
    Image.fromarray(gradient(20, 20)).save(tmp_path / "a.png")
    spec = PreprocessSpec.preset("unit", size=(8, 8))
    x = preprocess([tmp_path / "a.png", gradient(8, 8)], spec)
    assert x.shape == (2, 8, 8, 3)
    assert 0.0 <= x.min() and x.max() <= 1.0


# --- listing ------------------------------------------------------------------------------------------------------

def test_list_images_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("z.PNG", "a.jpg", "b/c.webp", "notes.txt", ".hidden/x.png"):
        (tmp_path / name).write_bytes(b"x")
    found = list_images([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.jpg", "b/c.webp", "z.PNG"]
    assert list_images([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]  # named explicitly: kept
    assert ".gif" in IMAGE_EXTENSIONS and ".tif" in IMAGE_EXTENSIONS


def test_list_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory has no images"):
        list_images([tmp_path / "empty"])
    with pytest.raises(DataError, match="no such file or directory"):
        list_images([tmp_path / "nope"])


@pytest.mark.parametrize("preset, layout", [("torch", "NCHW"), ("caffe", "NCHW"), ("caffe", "NHWC"), ("tf", "NHWC")])
def test_to_tensor_into_a_buffer_matches_the_formula(preset, layout):
    from porter.imaging import tensor_shape

    spec = PreprocessSpec.preset(preset, layout=layout, size=(6, 8))
    imgs = [gradient(), gradient()[:, ::-1].copy()]
    buf = np.full(tensor_shape(3, (6, 8), spec), np.nan, np.float32)
    out = to_tensor(imgs, spec, out=buf[1:])
    assert out.base is buf and np.isnan(buf[0]).all()
    order = slice(None, None, -1) if spec.channel_order == "BGR" else slice(None)
    expected = (np.stack(imgs)[..., order] * spec.scale - np.array(spec.mean)) / np.array(spec.std)
    if layout == "NCHW":
        expected = expected.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(buf[1:], expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="out must be"):
        to_tensor(imgs, spec, out=np.empty((2, 3, 3, 3), np.float32))
