import numpy as np
import pytest
import torch
from PIL import Image

from lcmla_sdk import InvalidImageError
from lcmla_sdk.images import sample_face


def _np(model, face, **kwargs):
    kwargs = {"seed": 7, "steps": 2, "output": "np", **kwargs}
    return np.stack(model.generate(face, kwargs.pop("prompt", "an oil painting of a face"), **kwargs))


class CallCounter:
    """Counts calls and passes them through to the real network."""

    def __init__(self, network):
        self.network, self.calls, self.batches = network, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.batches.append(args[0].shape[0])
        return self.network(*args, **kwargs)


@pytest.fixture
def counted(tiny):
    counters = {name: CallCounter(getattr(tiny, name)) for name in ("kv_encoder", "denoiser", "lcm_denoiser")}
    tiny.rebuild_networks(**counters)
    yield counters
    tiny.rebuild_networks()


def test_same_seed_same_images(tiny, face):
    first, second = _np(tiny, face), _np(tiny, face)
    assert first.shape == (1, 128, 128, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)


def test_other_seed_other_face_and_no_kv_change_the_images(tiny, face, astronaut):
    base = _np(tiny, face)
    assert not np.array_equal(base, _np(tiny, face, seed=8))
    assert not np.array_equal(base, _np(tiny, astronaut))
    assert not np.array_equal(base, _np(tiny, face, use_kv=False))
    assert not np.array_equal(base, _np(tiny, face, adapter_scale=0.0))


def test_an_image_does_not_depend_on_its_batch(tiny, face):
    batch = tiny.generate(face, "a face", num_images=2, seed=[11, 12], steps=2, output="latent")
    alone = tiny.generate(face, "a face", seed=[12], steps=2, output="latent")
    torch.testing.assert_close(batch[1:], alone, rtol=1e-4, atol=1e-4)


def test_prompts_times_num_images_and_output_types(tiny, face):
    images = tiny.generate(face, ["a face", "a cubism painting of a face"], num_images=2, seed=0, steps=1)
    assert len(images) == 4 and all(isinstance(i, Image.Image) and i.size == (128, 128) for i in images)
    pt = tiny.generate(face, "a face", seed=0, steps=1, output="pt", height=64, width=96)
    assert pt.shape == (1, 3, 64, 96) and 0.0 <= pt.min() and pt.max() <= 1.0
    latent = tiny.generate(face, "a face", seed=0, steps=1, output="latent", height=64, width=96)
    assert latent.shape == (1, 4, 8, 12)


def test_face_inputs_path_pil_and_arrays_agree(tiny, tmp_path):
    image = sample_face()
    path = tmp_path / "face.png"
    image.save(path)
    reference = _np(tiny, image)
    np.testing.assert_array_equal(_np(tiny, str(path)), reference)
    np.testing.assert_array_equal(_np(tiny, np.asarray(image)), reference)
    np.testing.assert_array_equal(_np(tiny, np.asarray(image).astype(np.float32) / 255.0), reference)


def test_quality_mode_calls_encoder_once_and_denoiser_once_per_step_with_both_branches_batched(tiny, face, counted):
    tiny.generate(face, "a face", seed=0, steps=3)
    assert counted["kv_encoder"].calls == 3 and counted["denoiser"].calls == 3
    assert counted["kv_encoder"].batches == [2] * 3 and counted["lcm_denoiser"].calls == 0
    assert counted["denoiser"].batches == [4] * 3  # [uncond, cond] without K/V, then with them


def test_fast_mode_calls_each_network_four_times_on_the_conditional_branch(tiny, face, counted):
    tiny.generate(face, "a face", seed=0, mode="fast")
    assert counted["kv_encoder"].calls == 4 and counted["lcm_denoiser"].calls == 4
    assert counted["kv_encoder"].batches == [1] * 4 and counted["lcm_denoiser"].batches == [1] * 4
    assert counted["denoiser"].calls == 0


def test_no_kv_mode_never_runs_the_encoder(tiny, face, counted):
    tiny.generate(face, "a face", seed=0, steps=2, use_kv=False)
    assert counted["kv_encoder"].calls == 0 and counted["denoiser"].calls == 2


def test_face_is_vae_encoded_once_per_call(tiny, face, monkeypatch):
    calls = []
    encode = tiny.vae.encode
    monkeypatch.setattr(tiny.vae, "encode", lambda x: calls.append(x.shape) or encode(x))
    tiny.generate(face, "a face", seed=0, steps=3)
    assert calls == [(1, 3, 128, 128)]


def test_callback_sees_every_step(tiny, face):
    seen = []
    tiny.generate(face, "a face", seed=0, steps=3, callback=lambda i, t, latents: seen.append((i, t, latents.shape)))
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(isinstance(s[1], int) for s in seen) and seen[0][1] > seen[1][1] > seen[2][1]
    assert all(s[2] == (1, 4, 16, 16) for s in seen)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"height": 100}, "height"),
        ({"width": 0}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": -2}, "steps"),
        ({"mode": "turbo"}, "mode"),
        ({"prompt": []}, "prompt"),
        ({"seed": [1, 2, 3]}, "seed"),
        ({"guidance": (3.0, -1.0, 2.0)}, "guidance"),
        ({"guidance": (3.0, 2.0)}, "guidance"),
        ({"num_images": 0}, "num_images"),
        ({"adapter_scale": -0.5}, "adapter_scale"),
        ({"output": "jpeg"}, "output"),
        ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(tiny, face, kwargs, argument):
    kwargs = {"prompt": "a face", **kwargs}
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        tiny.generate(face, kwargs.pop("prompt"), **kwargs)


def test_bad_face_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match="^face:"):
        tiny.generate(tmp_path / "missing.png", "a face", steps=1)
    with pytest.raises(ValueError, match="^face:"):
        tiny.generate(np.zeros((4, 4, 5), np.uint8), "a face", steps=1)
    with pytest.raises(InvalidImageError, match="^face:"):
        tiny.generate(12, "a face", steps=1)


def test_unknown_model_name_is_a_clear_error():
    from lcmla_sdk import Personalizer

    with pytest.raises(ValueError, match="^name:"):
        Personalizer.from_pretrained("no-such-model")


def test_the_kv_encoder_gets_the_generation_size_micro_conditioning_as_the_authors_give_it(tiny, face, counted):
    seen = []
    encoder = counted["kv_encoder"].network
    tiny.rebuild_networks(kv_encoder=lambda *args: seen.append(args[4]) or encoder(*args))
    tiny.generate(face, "a face", seed=0, steps=1, height=64, width=96)
    (ids,) = seen
    assert ids.tolist() == [[64, 96, 0, 0, 64, 96]] * 2  # [uncond, cond], not the face's 128 x 128
