"""Reference preprocessing (issue 11, item 2): the authors squash the whole photo to the face size.

Their ``infer.py`` does ``Image.open(path).convert("RGB").resize((1024, 1024))`` (Pillow's default filter for RGB,
bicubic), feeds that square in [-1, 1] to the VAE, and gives CLIP the same square through ``CLIPImageProcessor``.
The expected inputs below are computed that way, with Pillow and transformers, not with lcmla's helpers.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from lcmla_sdk import Identity
from lcmla_sdk.cli import app

try:  # transformers >= 5 names the Pillow implementation; earlier versions only have it
    from transformers import CLIPImageProcessorPil as ClipProcessor
except ImportError:
    from transformers import CLIPImageProcessor as ClipProcessor


@pytest.fixture(scope="module")
def wide_photo(astronaut) -> Image.Image:
    return Image.fromarray(astronaut).crop((0, 0, 512, 300))  # not square: squash and crop differ


def _inputs_seen(model, photo, monkeypatch, **kwargs):
    """The CLIP pixels and VAE pixels ``encode_face`` passes to the networks."""
    seen = {}
    adapter, encode = model.adapter.forward, model.vae.encode

    def spy_adapter(pixels):
        seen["clip"] = pixels.clone()
        return adapter(pixels)

    def spy_encode(pixels, *args, **kw):
        seen["vae"] = pixels.clone()
        return encode(pixels, *args, **kw)

    # On the instances: an earlier test may have left a bound method there, which a class patch would not reach.
    monkeypatch.setattr(model.adapter, "forward", spy_adapter)
    monkeypatch.setattr(model.vae, "encode", spy_encode)
    identity = model.encode_face(photo, **kwargs)
    return identity, seen


def test_squash_feeds_the_whole_photo_resized_as_the_authors_do(tiny, wide_photo, monkeypatch):
    identity, seen = _inputs_seen(tiny, wide_photo, monkeypatch)  # the default
    assert identity.face_resize == "squash"
    size = tiny.face_size
    square = wide_photo.resize((size, size))  # the authors' call, Pillow's default filter
    expected_vae = torch.from_numpy(np.asarray(square, np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    torch.testing.assert_close(seen["vae"], expected_vae, rtol=0, atol=1e-6)
    expected_clip = ClipProcessor()(images=[square], return_tensors="pt").pixel_values
    torch.testing.assert_close(seen["clip"], expected_clip, rtol=0, atol=1e-5)


def test_crop_feeds_the_centre_square_and_is_recorded(tiny, wide_photo, monkeypatch):
    identity, seen = _inputs_seen(tiny, wide_photo, monkeypatch, face_resize="crop")
    assert identity.face_resize == "crop"
    # Shorter side to the face size, then the centre square: the photo's left and right edges are cut.
    size = tiny.face_size
    resized = np.asarray(wide_photo.resize((round(512 * size / 300), size), Image.Resampling.LANCZOS), np.float32)
    left = (resized.shape[1] - size) // 2
    expected = torch.from_numpy(resized[:, left : left + size] / 127.5 - 1.0).permute(2, 0, 1)[None]
    torch.testing.assert_close(seen["vae"], expected, rtol=0, atol=1e-6)
    squashed = tiny.encode_face(wide_photo)
    assert not torch.allclose(identity.latent_mean, squashed.latent_mean)


def test_face_resize_is_saved_and_old_files_load_as_crop(tiny, face, tmp_path):
    path = tiny.encode_face(face).save(tmp_path / "new.safetensors")
    assert tiny.load_identity(path).face_resize == "squash"
    # A file written before the field existed: same tensors, header without "face_resize".
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["lcmla"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    del header["face_resize"]
    save_file(tensors, str(tmp_path / "old.safetensors"), {"lcmla": json.dumps(header)})
    old = Identity.load(tmp_path / "old.safetensors")
    assert old.face_resize == "crop"
    assert torch.equal(old.latent_mean, tiny.load_identity(path).latent_mean)


def test_bad_face_resize_is_a_value_error_naming_it(tiny, face):
    with pytest.raises(ValueError, match="^face_resize: 'stretch' is not one of"):
        tiny.encode_face(face, face_resize="stretch")


def test_cli_identity_create_takes_face_resize(wide_photo, tmp_path):
    wide_photo.save(tmp_path / "wide.png")
    runner = CliRunner()
    for mode in ("squash", "crop"):
        out = tmp_path / f"{mode}.safetensors"
        args = ["identity", "create", "--face", str(tmp_path / "wide.png"), "--face-resize", mode, "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert Identity.load(out).face_resize == mode
