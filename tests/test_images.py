"""Image inputs are normalised explicitly (sdjax.pipelines.images): paths, EXIF orientation, 16-bit and other PIL
modes, integer arrays; bad inputs are one-line ValueErrors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdjax.pipelines import images


def test_paths_are_opened_and_bad_paths_named(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)
    for value in (str(path), path):
        (got,) = images.as_arrays(value, 1, "image")
        assert isinstance(got, Image.Image) and got.size == (8, 8)
    assert len(images.as_arrays(str(path), 3, "image")) == 3  # one path serves every prompt (not its letters)
    with pytest.raises(ValueError, match="nope.png: no such file"):
        images.as_arrays(str(tmp_path / "nope.png"), 1, "image")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ValueError, match="not an image"):
        images.as_arrays(str(tmp_path / "text.png"), 1, "image")
    with pytest.raises(ValueError, match="expected a PIL image"):
        images.as_arrays(123, 1, "image")


def test_16_bit_greyscale_keeps_its_grey():
    """A mid-grey 16-bit PNG used to turn white (PIL clips I;16 to 255 when converting to RGB)."""
    grey = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert grey.mode.startswith("I;16")
    (got,) = images.as_arrays(grey, 1, "image")
    assert got.mode == "RGB" and abs(int(np.asarray(got)[0, 0, 0]) - 128) <= 1
    as_int = grey.convert("I")
    (got,) = images.as_arrays(as_int, 1, "image")
    assert abs(int(np.asarray(got)[0, 0, 0]) - 128) <= 1
    arr = images.load_images(grey, 1, None, None, 2, "image")
    assert abs(float(arr.mean())) < 0.01  # mid-grey is 0 in [-1, 1]


def test_palette_cmyk_rgba_become_rgb():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255
    base = Image.fromarray(rgb)
    for im in (base.convert("P"), base.convert("CMYK"), base.convert("RGBA"), base.convert("LA")):
        (got,) = images.as_arrays(im, 1, "image")
        assert got.mode == "RGB" and got.size == (6, 4)
    (got,) = images.as_arrays(base.convert("CMYK"), 1, "image")
    assert np.asarray(got)[0, 0, 0] == 255


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 8, 3), np.uint8)  # 8 wide, 4 high
    arr[:, :4] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif)
    (got,) = images.as_arrays(str(path), 1, "image")
    assert got.size == (4, 8)  # shown upright: 4 wide, 8 high


def test_integer_arrays_are_scaled_or_refused():
    u8 = np.full((4, 4, 3), 255, np.uint8)
    (got,) = images.as_arrays(u8, 1, "image")
    assert got.dtype == np.float32 and got.max() == 1.0
    (got,) = images.as_arrays(np.full((4, 4, 3), 65535, np.uint16), 1, "image")
    assert got.max() == 1.0
    with pytest.raises(ValueError, match="or uint8 / uint16"):
        images.as_arrays(np.full((4, 4, 3), 255, np.int64), 1, "image")
    batch = images.load_images(np.zeros((2, 4, 4, 3), np.uint8), 2, None, None, 2, "image")
    assert batch.shape == (2, 4, 4, 3) and batch.min() == -1.0
    # an integer mask is binarised as diffusers does: any non-zero value repaints
    masks = images.load_masks(np.array([[0, 1], [255, 0]], np.uint8), 1, 2, 2)
    assert masks[0, ..., 0].tolist() == [[0.0, 1.0], [1.0, 0.0]]
