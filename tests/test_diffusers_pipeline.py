"""LCMLookaheadPipeline: diffusers' habits over the same Personalizer (tiny preset, CPU)."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, LCMScheduler
from diffusers.callbacks import PipelineCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from lcmla_sdk import Personalizer
from lcmla_sdk.diffusers_pipeline import LCMLookaheadPipeline

SIZE = {"height": 64, "width": 64}
FAST = {"num_inference_steps": 2, **SIZE}


@pytest.fixture(scope="module")
def pipe(tiny) -> LCMLookaheadPipeline:
    return LCMLookaheadPipeline(tiny)


@pytest.fixture(scope="module")
def identity(tiny, face):
    return tiny.encode_face(face)


def fast(pipe: LCMLookaheadPipeline) -> LCMLookaheadPipeline:
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_a_generator_seeded_s_gives_generate_seed_s_in_both_modes(pipe, tiny, face, identity):
    quality = pipe("A photo of a face", face_image=face, generator=torch.Generator().manual_seed(7),
                   num_inference_steps=3, **SIZE).images  # fmt: skip
    assert isinstance(pipe, DiffusionPipeline)
    expected = tiny.generate(face, "A photo of a face", seed=7, steps=3, output="np", **SIZE)
    np.testing.assert_array_equal(np.asarray(quality[0]), expected[0])

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    images = pipe("An oil painting", identity=identity, generator=generators, num_images_per_prompt=2, **FAST).images
    expected = tiny.generate(identity, "An oil painting", num_images=2, seed=[3, 4], mode="fast", steps=2,
                             output="np", **SIZE)  # fmt: skip
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(np.asarray(got), want)
    pipe.scheduler = tiny.make_scheduler("quality")


def test_output_types_and_return_dict(pipe, identity):
    fast(pipe)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = pipe(["a", "b"], identity=identity, generator=g(), num_images_per_prompt=2, output_type="np", **FAST)
    assert isinstance(out, StableDiffusionXLPipelineOutput)
    assert out.images.shape == (4, 64, 64, 3) and out.images.dtype == np.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    (pt,) = pipe("a", identity=identity, generator=g(), output_type="pt", return_dict=False, **FAST)
    assert pt.shape == (1, 3, 64, 64)
    one = pipe("a", identity=identity, generator=g(), output_type="np", **FAST).images
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), one)
    latents = pipe("a", identity=identity, generator=g(), output_type="latent", **FAST).images
    assert latents.shape == (1, 4, 8, 8)
    pil = pipe("a", identity=identity, generator=g(), height=64, width=128, num_inference_steps=2).images
    assert pil[0].size == (128, 64)


def test_callback_on_step_end_sees_and_replaces_latents(pipe, identity):
    fast(pipe)
    seen = []

    def zero_after_first(p, step, timestep, kwargs):
        seen.append((p.num_timesteps, step, timestep, sorted(kwargs)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 0 else kwargs

    kw = {"identity": identity, "output_type": "latent", **FAST}
    plain = pipe("a", generator=torch.Generator().manual_seed(0), **kw).images
    zeroed = pipe("a", generator=torch.Generator().manual_seed(0), callback_on_step_end=zero_after_first, **kw).images
    assert [s[:2] for s in seen] == [(2, 0), (2, 1)] and seen[0][3] == ["latents"]
    assert not torch.equal(plain, zeroed)

    class Record(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(callback_kwargs["latents"].shape)
            return callback_kwargs

    pipe("a", generator=torch.Generator().manual_seed(0), callback_on_step_end=Record(), **kw)
    assert seen[-1] == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a", callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw)


def test_errors_name_diffusers_arguments(pipe, face, identity):
    fast(pipe)
    with pytest.raises(ValueError, match="^face_image/identity"):
        pipe("a", **FAST)
    with pytest.raises(ValueError, match="^guidance_scale: .*three weights"):
        pipe("a", identity=identity, guidance_scale=7.5, **FAST)
    with pytest.raises(ValueError, match="^num_inference_steps"):
        pipe("a", identity=identity, num_inference_steps=0, **SIZE)
    with pytest.raises(ValueError, match="^num_images_per_prompt"):
        pipe("a", identity=identity, num_images_per_prompt=0, **FAST)
    with pytest.raises(ValueError, match="^generator: 1 seed given for 2 images"):
        pipe("a", identity=identity, generator=[torch.Generator()], num_images_per_prompt=2, **FAST)
    with pytest.raises(ValueError, match=r"^num_images_per_prompt/height/width \(1000000 images.*GiB"):
        pipe("a", identity=identity, num_images_per_prompt=10**6, **FAST)
    with pytest.raises(ValueError, match="^output_type"):
        pipe("a", identity=identity, output_type="jpeg", **FAST)
    with pytest.raises(ValueError, match="^height"):
        pipe("a", identity=identity, num_inference_steps=2, height=65, width=64)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="^scheduler: EulerDiscreteScheduler is not supported"):
        pipe("a", identity=identity, **FAST)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, beta_end=0.02)
    with pytest.raises(ValueError, match=r"^scheduler: .*changed: \['beta_end'\]"):
        pipe("a", identity=identity, **FAST)
    with pytest.raises(NotImplementedError, match="one UNet"):
        pipe.enable_model_cpu_offload()
    pipe.scheduler = pipe.personalizer.make_scheduler("fast")


def test_diffusers_habits_from_pretrained_save_to_progress_bar(face, identity, tmp_path, capsys):
    pipe = LCMLookaheadPipeline.from_pretrained("tiny")
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.unet is pipe.personalizer.unet and pipe.config["unet"][1] == "UNet2DConditionModel"
    assert set(pipe.components) >= {"unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "resampler"}
    fast(pipe)
    kw = {"face_image": face, "output_type": "np", **FAST}
    before = pipe("a", generator=torch.Generator().manual_seed(1), **kw).images

    pipe.save_pretrained(tmp_path / "saved")
    loaded = fast(LCMLookaheadPipeline.from_pretrained(tmp_path / "saved"))
    loaded.set_progress_bar_config(disable=True)
    capsys.readouterr()
    again = loaded("a", generator=torch.Generator().manual_seed(1), **kw)  # the same weights, from the directory
    np.testing.assert_array_equal(again.images, before)
    assert "2/2" not in capsys.readouterr().err  # the progress bar was turned off

    pipe.set_progress_bar_config(desc="lcmla")
    moved = pipe.to(torch.bfloat16)
    assert moved is pipe and pipe.dtype == torch.bfloat16 and pipe.personalizer.dtype == torch.bfloat16
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    low = pipe("a", generator=torch.Generator().manual_seed(1), **kw).images
    progress = capsys.readouterr().err
    assert "lcmla" in progress and "2/2" in progress
    assert np.abs(low - before).mean() < 0.05  # the same model, in bf16
    assert pipe.to("cpu", torch.bfloat16) is pipe
    if not torch.cuda.is_available():  # refused with the loading arguments' message, the pipeline as it was
        with pytest.raises(ValueError, match="^device: 'cuda' asked for, but no CUDA device is available"):
            pipe.to("cuda")
        assert pipe.device.type == "cpu"


def test_identity_file_and_several_photos(pipe, tiny, face, identity, tmp_path, astronaut):
    fast(pipe)
    identity.save(tmp_path / "person.safetensors")
    kw = {"generator": torch.Generator().manual_seed(2), "output_type": "np", **FAST}
    from_file = pipe("a", identity=tmp_path / "person.safetensors", **kw).images
    kw["generator"] = torch.Generator().manual_seed(2)
    direct = pipe("a", identity=identity, **kw).images
    np.testing.assert_array_equal(from_file, direct)
    kw["generator"] = torch.Generator().manual_seed(2)
    two = pipe("a", face_image=[face, astronaut], **kw).images
    assert two.shape == (1, 64, 64, 3) and not np.array_equal(two, direct)


def test_a_fresh_personalizer_from_the_pipeline_shares_its_modules(pipe):
    other = LCMLookaheadPipeline(pipe.personalizer)
    assert isinstance(other.personalizer, Personalizer) and other.vae is pipe.vae
