"""odin_engine.io.images.decode_image on every bad or odd input kind."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import BAD_EXPECT
from odin_engine.io.images import BACKGROUND, ImageDecodeError, decode_image


@pytest.mark.parametrize("name", sorted(BAD_EXPECT))
def test_every_kind_gives_pixels_or_a_clear_error(bad_images, name):
    data = bad_images[name]
    if BAD_EXPECT[name] == "ok":
        arr, w, h = decode_image(data, 32)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
        assert w >= 1 and h >= 1
    else:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, 32)
        msg = str(info.value)
        assert msg and "\n" not in msg
        kind = {
            "zero_byte.png": "empty file", "not_an_image.jpg": "not an image", "bomb.png": "decompression bomb",
        }.get(name)
        if kind:
            assert msg.startswith(kind), msg


def test_bomb_guard_is_pillows_own_limit():
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # we did not lift Pillow's guard


def test_exif_rotation_swaps_reported_size_and_pixels(bad_images):
    _, w, h = decode_image(bad_images["exif_rotated.jpg"], 32)
    assert (w, h) == (40, 60)  # stored 60×40, displayed rotated 90°


def test_sizes_are_the_full_file_size_even_with_jpeg_draft(bad_images):
    _, w, h = decode_image(bad_images["very_large.jpg"], 32)
    assert (w, h) == (6000, 4000)


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    buf = io.BytesIO()
    img.save(buf, "PNG")
    arr, _, _ = decode_image(buf.getvalue(), 32)
    assert (arr == np.array(BACKGROUND, np.uint8)).all()


def test_sixteen_bit_is_scaled_not_clipped():
    g = np.full((8, 8), 65535, np.uint16)
    g[:4] = 0
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "PNG")
    arr, _, _ = decode_image(buf.getvalue(), 8)
    assert arr[:4].max() == 0 and arr[4:].min() == 255


def test_identity_at_model_size_and_policies():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    arr, w, h = decode_image(buf.getvalue(), 32)
    assert (w, h) == (32, 32) and np.array_equal(arr, px)
    # crop keeps the centre square; stretch squeezes the whole image
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    cropped, _, _ = decode_image(buf.getvalue(), 10, "crop")
    stretched, _, _ = decode_image(buf.getvalue(), 10, "stretch")
    assert cropped.min() == 255
    assert stretched[:, 0].max() == 0 and stretched[:, 5].min() > 200
    with pytest.raises(ValueError):
        decode_image(buf.getvalue(), 10, "letterbox")


def test_one_pixel_upsampled_to_its_colour(bad_images):
    arr, w, h = decode_image(bad_images["one_pixel.png"], 32)
    assert (w, h) == (1, 1)
    assert (arr == np.array([10, 20, 30], np.uint8)).all()


def test_random_garbage_never_raises_anything_else():
    rng = np.random.default_rng(3)
    png_header = b"\x89PNG\r\n\x1a\n"
    for i in range(200):
        data = rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
        if i % 2:
            data = png_header + data
        with pytest.raises(ImageDecodeError):
            decode_image(data, 32)
