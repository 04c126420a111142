"""images.py: image files read as LLaVA reads them (RGB, alpha dropped, 16-bit grayscale scaled), errors that name
the file, and images refused from their header when their aspect ratio would blow up preprocessing."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import images
from clip import preprocess
from images import load_image

OUTPUTS = os.path.join(os.path.dirname(__file__), "fixtures", "clip_outputs")


def test_load_image_is_rgb_with_alpha_dropped():
    path = os.path.join(OUTPUTS, "images", "rgba.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (33, 45)
    with Image.open(path) as rgba:  # like LLaVA's Image.open(f).convert("RGB"): colour channels kept, alpha dropped
        assert np.array_equal(np.asarray(image), np.asarray(rgba)[..., :3])
    # a transparent palette entry is not whitened either: LLaVA's pixels are those of convert("RGB")
    path = os.path.join(OUTPUTS, "images", "palette_transparent.png")
    with Image.open(path) as palette:
        rgb = palette.convert("RGB")
    for pad in (False, True):
        expected = preprocess(Image.fromarray(np.asarray(rgb)), 24, pad_to_square=pad)  # no transparency info
        assert torch.equal(preprocess(load_image(path), 24, pad_to_square=pad), expected)


def test_missing_and_corrupt_images_raise_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        load_image(tmp_path / "nowhere.jpg")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="garbage.png"):
        load_image(garbage)
    good = open(os.path.join(OUTPUTS, "images", "square.png"), "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)


def sixteen_bit(tmp_path):
    """A 16-bit grayscale PNG with values across the whole 0-65535 range, and its 8-bit values (v / 257, rounded)."""
    values = np.linspace(0, 65535, 40 * 30).round().astype(np.uint16).reshape(30, 40)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    return path, ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def test_16_bit_grayscale_is_scaled_to_8_bits_by_load_image(tmp_path):
    path, expected = sixteen_bit(tmp_path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # the mode this test is about
    pixels = np.asarray(load_image(path))
    assert np.array_equal(pixels, np.repeat(expected[..., None], 3, axis=2))  # not every value past 255 -> 255


def test_an_8_bit_image_in_mode_i_keeps_its_values():
    values = np.arange(0, 256, dtype=np.int32).reshape(16, 16)
    assert np.array_equal(np.asarray(images.to_8bit(Image.fromarray(values))), values.astype(np.uint8))


def test_an_extreme_aspect_ratio_is_refused_naming_the_file_before_decoding(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("L", (1, 20000)).save(path, optimize=True)
    assert path.stat().st_size < 200  # the report's 157-byte PNG
    with pytest.raises(ValueError, match=r"strip.png: an image of 1x20000 pixels is refused"):
        load_image(path)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grayscale_is_scaled_to_8_bits_by_preprocess(tmp_path, mode):
    path, expected = sixteen_bit(tmp_path)
    with Image.open(path) as image:
        image = image if mode == "I;16" else image.convert("I")  # older Pillow opened 16-bit PNGs as I
        for pad in (False, True):
            assert torch.equal(preprocess(image, 24, pad), preprocess(Image.fromarray(expected), 24, pad))
