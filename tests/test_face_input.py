import io

import numpy as np
import pytest
from PIL import Image

from lcmla_sdk import InvalidImageError, LcmlaError
from lcmla_sdk.images import load_rgb


@pytest.fixture(scope="module")
def photo(astronaut):
    return Image.fromarray(astronaut).resize((64, 48))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_path_bytes_file_object_pil_and_arrays_give_the_same_pixels(photo, tmp_path):
    path = tmp_path / "face.png"
    photo.save(path)
    expected = np.asarray(photo)
    for face in (path, str(path), _png(photo), io.BytesIO(_png(photo)), photo, expected, expected / 255.0,
                 expected.astype(np.uint16) * 257):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(load_rgb(face)), expected)


def test_exif_rotation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    photo.save(buffer, "PNG", exif=exif)
    upright = load_rgb(buffer.getvalue())
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(photo.transpose(Image.Transpose.ROTATE_270)))


def test_every_common_mode_becomes_rgb(photo):
    gray = photo.convert("L")
    cases = {
        "L": gray, "P": photo.convert("P"), "CMYK": photo.convert("CMYK"),
        "I;16": Image.fromarray(np.asarray(gray).astype(np.uint16) * 257),
    }  # fmt: skip
    for mode, image in cases.items():
        assert image.mode == mode
        rgb = load_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == photo.size
    # 16-bit values are rescaled, not clipped to white.
    np.testing.assert_array_equal(np.asarray(load_rgb(cases["I;16"]))[:, :, 0], np.asarray(gray))


def test_transparency_is_composited_over_white(photo):
    rgba = photo.convert("RGBA")
    alpha = np.zeros(photo.size[::-1], np.uint8)
    alpha[:, :32] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgb = np.asarray(load_rgb(rgba))
    assert (rgb[:, 32:] == 255).all()
    np.testing.assert_array_equal(rgb[:, :32], np.asarray(photo)[:, :32])


@pytest.mark.parametrize(
    ("face", "message"),
    [
        ("missing.png", "no such image file"),
        (b"not an image", "cannot read an image from 12 bytes: no image format Pillow reads$"),
        (np.zeros((8, 8, 3), np.uint8), "the image is 8x8"),
        (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
        (np.zeros((32, 32, 3), np.int64), "dtype"),
        (np.zeros((32, 32, 5), np.uint8), "shape"),
        (12, "got int"),
    ],
)
def test_bad_inputs_raise_invalid_image_error(face, message, tmp_path):
    if isinstance(face, str):
        face = tmp_path / face
    with pytest.raises(InvalidImageError, match=message) as caught:
        load_rgb(face)
    assert isinstance(caught.value, LcmlaError) and isinstance(caught.value, ValueError)
