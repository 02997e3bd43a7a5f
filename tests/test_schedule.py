"""The device-side scheduler arithmetic against diffusers' own ``step``, step by step."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler

from lcmla_sdk.presets import preset_config
from lcmla_sdk.schedule import FACE_NOISE, FACE_SIGNAL, apply_step, build_table, noise_reference

CONFIG = preset_config("tiny")["scheduler"]


def _compare(scheduler, steps: int, noisy: bool) -> float:
    """Largest |difference| between diffusers' step and the table's, relative to the largest |latent|, over every
    step of one trajectory (the table's coefficients are float32: about 1e-7 relative error each)."""
    scheduler.set_timesteps(steps)
    table = build_table(scheduler, torch.device("cpu"))
    assert table.host_timesteps == [int(t) for t in scheduler.timesteps]
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 8, 8)
    ours = theirs = torch.randn(shape, generator=g, dtype=torch.float64)
    previous = torch.zeros(shape, dtype=torch.float64)
    worst = 0.0
    for index, t in enumerate(scheduler.timesteps):
        eps = torch.randn(shape, generator=g, dtype=torch.float64)
        seed = 100 + index
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        kwargs = {"generator": torch.Generator().manual_seed(seed)} if noisy else {}
        theirs = scheduler.step(eps, t, theirs, **kwargs).prev_sample
        if index >= table.noise_steps:
            noise = torch.zeros_like(noise)
        ours, x0 = apply_step(table.coefficients[index].double(), ours, eps, previous, noise)
        previous = x0
        worst = max(worst, (ours - theirs).abs().max().item() / theirs.abs().max().item())
    return worst


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_table_equals_diffusers_step_by_step_noise_included(steps):
    assert _compare(LCMScheduler.from_config(CONFIG), steps, noisy=True) < 1e-5


@pytest.mark.parametrize(
    ("steps", "options"),
    [
        (50, {"final_sigmas_type": "sigma_min"}),
        (50, {"final_sigmas_type": "zero"}),
        (10, {"final_sigmas_type": "sigma_min"}),
        (20, {"solver_type": "heun", "final_sigmas_type": "sigma_min"}),
        (25, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
        (12, {"solver_order": 1}),
    ],
)
def test_dpm_solver_table_equals_diffusers_step_by_step(steps, options):
    assert _compare(DPMSolverMultistepScheduler.from_config(CONFIG, **options), steps, noisy=False) < 1e-5


def test_unsupported_scheduler_options_are_refused():
    scheduler = DPMSolverMultistepScheduler.from_config(CONFIG, solver_order=3)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="^scheduler:"):
        build_table(scheduler, torch.device("cpu"))


def test_reference_noising_equals_ddpm_add_noise():
    from diffusers import DDPMScheduler

    scheduler = LCMScheduler.from_config(CONFIG)
    scheduler.set_timesteps(4)
    table = build_table(scheduler, torch.device("cpu"))
    latent, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for index, t in enumerate(table.host_timesteps):
        expected = DDPMScheduler.from_config(CONFIG).add_noise(latent, noise, torch.tensor([t, t]))
        torch.testing.assert_close(noise_reference(table.coefficients[index], latent, noise), expected)
        assert table.coefficients[index, FACE_SIGNAL] ** 2 + table.coefficients[index, FACE_NOISE] ** 2 == pytest.approx(1)


def test_quality_mode_ends_on_the_sigma_of_t0_as_the_authors_diffusers_did(tiny):
    scheduler = tiny.make_scheduler("quality")
    scheduler.set_timesteps(50)
    alpha0 = scheduler.alphas_cumprod[0].item()
    assert scheduler.sigmas[-1].item() == pytest.approx(math.sqrt((1 - alpha0) / alpha0), rel=1e-5)
    assert scheduler.sigmas[-1].item() > 0
