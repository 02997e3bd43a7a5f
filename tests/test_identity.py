import pytest
import torch

from lcmla_sdk import Identity, IdentityMismatchError, ModelFilesError
from conftest import unet_inputs

from lcmla_sdk.networks import Denoiser


def _latents(model, face, **kwargs):
    return model.generate(face, "a face", seed=5, steps=2, output="latent", **kwargs)


def test_save_load_round_trip_is_bit_exact(tiny, face, tmp_path):
    identity = tiny.encode_face(face)
    loaded = tiny.load_identity(identity.save(tmp_path / "id.safetensors"))
    for name in ("cond_tokens", "uncond_tokens", "latent_mean", "latent_std"):
        assert torch.equal(getattr(loaded, name), getattr(identity, name).cpu()), name
    assert loaded.sources == identity.sources and len(loaded.sources[0]) == 64
    assert loaded.model_fingerprint == tiny.fingerprint
    # The detection is recorded: the default dlib backend found the sample face.
    assert loaded.face_backend == "dlib:hog,5" and torch.equal(loaded.face_embeddings, identity.face_embeddings)
    assert loaded.boxes == identity.boxes and loaded.landmarks == identity.landmarks and len(loaded.landmarks[0]) == 5
    # Generating from the stored identity equals generating from the photo, and skips the face work.
    assert torch.equal(_latents(tiny, loaded), _latents(tiny, face))


def test_identity_of_another_model_is_refused(tiny, face, tmp_path):
    path = tiny.encode_face(face).save(tmp_path / "id.safetensors")
    other = Identity.load(path)
    other.model_fingerprint = "0" * 64
    with pytest.raises(IdentityMismatchError, match="made by model 0000"):
        tiny.generate(other, "a face", steps=1)
    with pytest.raises(IdentityMismatchError):
        Identity.load(other.save(tmp_path / "other.safetensors"), expected_fingerprint=tiny.fingerprint)


def test_bad_identity_files(tmp_path):
    with pytest.raises(ModelFilesError, match="no such file"):
        Identity.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelFilesError, match="not a safetensors file"):
        Identity.load(tmp_path / "junk.safetensors")


def test_several_references_average_tokens_and_concatenate_kv(tiny, face, astronaut, monkeypatch):
    one, two = tiny.encode_face(face), tiny.encode_face(astronaut)
    both = tiny.encode_face([face, astronaut])
    assert both.num_references == 2 and both.sources == one.sources + two.sources
    torch.testing.assert_close(both.cond_tokens, (one.cond_tokens + two.cond_tokens) / 2)
    torch.testing.assert_close(both.latent_mean, torch.cat([one.latent_mean, two.latent_mean]), rtol=1e-5, atol=1e-5)
    # The denoiser receives, per image, the K/V of both references one after the other.
    seen = []
    original = Denoiser.forward

    def spy(self, latent, *args, **kwargs):
        kv = (args + (None,) * 8)[6]  # (timestep, text, pooled, time_ids, image_tokens, adapter_scale, kv, freeu)
        if kv is not None:
            seen.append((latent.shape[0], tuple(kv[0].shape)))
        return original(self, latent, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "forward", spy)
    tiny.generate(both, "a face", seed=1, steps=1, output="latent", num_images=2)
    single_tokens = tiny.kv_encoder(*unet_inputs(tiny, batch=1, side=16))[0].shape[1]
    # One pass: [uncond, cond] without K/V, then with them, x 2 images; the K/V rows (the last 4) carry 2 references.
    assert seen == [(8, (4, 2 * single_tokens, 64))]


def test_version_1_files_keep_their_arcface_embeddings(tiny, face, tmp_path):
    """Files written before the dlib backend stored insightface's embeddings as ``arcface``."""
    import json

    from safetensors.torch import save_file

    identity = tiny.encode_face(face)
    arcface = torch.nn.functional.normalize(torch.randn(1, 512), dim=1)
    tensors = {n: getattr(identity, n) for n in ("cond_tokens", "uncond_tokens", "latent_mean", "latent_std")}
    header = {"format": "lcmla-identity", "format_version": 1, "model_fingerprint": tiny.fingerprint,
              "sources": identity.sources, "crop": "none", "boxes": [[1.0, 2.0, 3.0, 4.0]]}  # fmt: skip
    save_file({**tensors, "arcface": arcface}, str(tmp_path / "v1.safetensors"), {"lcmla": json.dumps(header)})
    loaded = tiny.load_identity(tmp_path / "v1.safetensors")
    assert torch.equal(loaded.face_embeddings, arcface) and loaded.face_backend == "insightface"
    assert loaded.boxes == [[1.0, 2.0, 3.0, 4.0]] and loaded.landmarks == []


def test_a_blank_identity_has_the_shapes_of_a_real_one(tiny, face):
    """What warmup generates from: every tensor shaped as an encoded face's, taken from the model's components."""
    real = tiny.encode_face([face, face])
    blank = Identity.blank(2, tiny.components.resampler.latents.shape[1], tiny.unet.config.cross_attention_dim,
                           tiny.unet.config.in_channels, tiny.face_size // tiny.vae_scale, tiny.fingerprint)  # fmt: skip
    for name in ("cond_tokens", "uncond_tokens", "latent_mean", "latent_std"):
        assert getattr(blank, name).shape == getattr(real, name).shape, name
    assert not blank.cond_tokens.any() and (blank.latent_std == 1).all()
    assert tiny.generate(blank, "", mode="fast", output="latent").shape[0] == 1


def test_an_identity_prints_as_a_short_summary(tiny):
    from lcmla_sdk.warmup import blank_identity

    text = repr(blank_identity(tiny, 2))
    assert text.startswith("Identity(references=2, cond_tokens=(1, 16,") and "latent_mean=(2, 4," in text
    assert len(text) < 300 and "tensor(" not in text
