"""The samplers' arithmetic as per-step coefficients, so a whole step runs on device tensors (and in a CUDA graph).

Both schedulers lcmla uses are linear in what a step sees. With ``x`` the current latents, ``eps`` the guided
noise prediction, ``m`` the previous step's data prediction and ``z`` fresh noise, every step is::

    x0  = k_x * x + k_eps * eps                          (the data prediction)
    x'  = c_x * x + c_x0 * x0 + c_m * m + c_z * z        (then m <- x0)

* LCM (``LCMScheduler``): ``x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)``; ``denoised = c_out x0 + c_skip x``;
  ``x' = sqrt(a_prev) denoised + sqrt(1 - a_prev) z``, and ``x' = denoised`` at the last step.
* DPM-Solver++ (``DPMSolverMultistepScheduler``, ``dpmsolver++``, orders 1 and 2, midpoint or heun): the first-
  and second-order multistep updates over diffusers' own sigma schedule, with diffusers' rules for when a step
  drops to first order.

The coefficients are computed in float64 on the host from the diffusers scheduler after ``set_timesteps``, so every
option that shapes its schedule (spacing, Karras sigmas, final sigma) is honoured. Each row also carries the DDPM
noising coefficients of the step's timestep (``sqrt(a_t)``, ``sqrt(1 - a_t)``) for the reference latent.
``tests/test_schedule.py`` checks the result against diffusers' ``step`` for every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler

# Column order of StepTable.coefficients.
K_X, K_EPS, C_X, C_X0, C_M, C_Z, FACE_SIGNAL, FACE_NOISE = range(8)


@dataclass
class StepTable:
    """Per-step timesteps and coefficients of one schedule, as device tensors."""

    timesteps: torch.Tensor  # (steps,) float32
    coefficients: torch.Tensor  # (steps, 8) float32, columns as above
    noise_steps: int  # how many leading steps inject fresh noise (LCM: all but the last; DPM-Solver++: none)
    host_timesteps: list[int]  # the same timesteps on the host (for callbacks, without a device sync)

    @property
    def steps(self) -> int:
        return self.timesteps.shape[0]


def build_table(scheduler, device: torch.device) -> StepTable:
    """The table of a diffusers scheduler on which ``set_timesteps`` has been called."""
    alphas = scheduler.alphas_cumprod.double().numpy()
    timesteps = [int(t) for t in scheduler.timesteps]
    if isinstance(scheduler, LCMScheduler):
        rows, noise_steps = _lcm_rows(scheduler, alphas, timesteps), len(timesteps) - 1
    elif isinstance(scheduler, DPMSolverMultistepScheduler):
        rows, noise_steps = _dpm_rows(scheduler, timesteps), 0
    else:
        raise ValueError(f"scheduler: {type(scheduler).__name__} has no device-side implementation")
    for row, t in zip(rows, timesteps):
        row[FACE_SIGNAL], row[FACE_NOISE] = math.sqrt(alphas[t]), math.sqrt(1.0 - alphas[t])
    return StepTable(
        torch.tensor(timesteps, dtype=torch.float32, device=device),
        torch.tensor(np.array(rows), dtype=torch.float32, device=device),
        noise_steps,
        timesteps,
    )


def make_scheduler(config: dict, mode: str):
    """The diffusers scheduler of a mode. DPM-Solver++ ends on sigma(t=0) ("sigma_min"), as the diffusers version
    of the authors' code did (diffusers' current default ends on zero)."""
    if mode == "fast":
        return LCMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, final_sigmas_type="sigma_min")


class StepTables:
    """The :class:`StepTable` of each (mode, steps) of one scheduler config on one device, built once."""

    def __init__(self, config: dict, device: torch.device) -> None:
        self.config, self.device = config, device
        self._tables: dict[tuple[str, int], StepTable] = {}

    def __call__(self, mode: str, steps: int) -> StepTable:
        key = (mode, steps)
        if key not in self._tables:
            scheduler = make_scheduler(self.config, mode)
            scheduler.set_timesteps(steps)
            self._tables[key] = build_table(scheduler, self.device)
        return self._tables[key]


def _lcm_rows(scheduler: LCMScheduler, alphas: np.ndarray, timesteps: list[int]) -> list[np.ndarray]:
    config = scheduler.config
    if config.prediction_type != "epsilon" or config.thresholding or config.clip_sample:
        raise ValueError("scheduler: the device-side LCM step supports epsilon prediction without clipping only")
    final_alpha = 1.0 if config.set_alpha_to_one else alphas[0]
    rows = []
    for index, t in enumerate(timesteps):
        last = index == len(timesteps) - 1
        a_t = alphas[t]
        a_prev = (alphas[timesteps[index + 1]] if timesteps[index + 1] >= 0 else final_alpha) if not last else 1.0
        scaled = t * config.timestep_scaling
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)  # sigma_data = 0.5
        row = np.zeros(8)
        row[K_X], row[K_EPS] = 1.0 / math.sqrt(a_t), -math.sqrt(1.0 - a_t) / math.sqrt(a_t)
        row[C_X], row[C_X0] = math.sqrt(a_prev) * c_skip, math.sqrt(a_prev) * c_out
        row[C_Z] = 0.0 if last else math.sqrt(1.0 - a_prev)
        rows.append(row)
    return rows


def _dpm_rows(scheduler: DPMSolverMultistepScheduler, timesteps: list[int]) -> list[np.ndarray]:
    config = scheduler.config
    if config.algorithm_type != "dpmsolver++" or config.solver_order > 2 or config.thresholding:
        raise ValueError("scheduler: the device-side DPM-Solver++ step supports dpmsolver++ of order 1 or 2 only")
    if config.prediction_type != "epsilon" or config.solver_type not in ("midpoint", "heun"):
        raise ValueError("scheduler: the device-side DPM-Solver++ step supports epsilon prediction only")
    sigmas = scheduler.sigmas.double().numpy()
    alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf where the final sigma is zero
    steps = len(timesteps)
    rows = []
    for i in range(steps):
        # diffusers' rules: the last step is first order for short schedules or a zero final sigma (and with
        # euler_at_final); the first step has no history.
        lower_final = i == steps - 1 and (
            config.euler_at_final or (config.lower_order_final and steps < 15) or config.final_sigmas_type == "zero"
        )
        first_order = config.solver_order == 1 or i == 0 or lower_final
        s0, t = i, i + 1
        h = lam[t] - lam[s0]
        expm1 = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
        row = np.zeros(8)
        row[K_X], row[K_EPS] = 1.0 / alpha[s0], -sigma[s0] / alpha[s0]
        row[C_X] = sigma[t] / sigma[s0]
        if first_order:
            row[C_X0] = -alpha[t] * expm1
        else:
            with np.errstate(divide="ignore"):  # h = 0 where Karras sigmas repeat: diffusers' step is then x' = x
                r0 = (lam[s0] - lam[s0 - 1]) / h
            # D0 = x0, D1 = (x0 - m) / r0
            d1 = -0.5 * alpha[t] * expm1 if config.solver_type == "midpoint" else alpha[t] * (expm1 / h + 1.0)
            row[C_X0] = -alpha[t] * expm1 + d1 / r0
            row[C_M] = -d1 / r0
        rows.append(row)
    return rows


def apply_step(
    coefficients: torch.Tensor, latents: torch.Tensor, eps: torch.Tensor, previous: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(next latents in latents' dtype, x0 in float32)`` for one row of a :class:`StepTable`; arithmetic in fp32.

    Only tensor operations on device tensors: no host synchronisation, so it can be captured in a CUDA graph.
    """
    c = coefficients
    x = latents.float()
    x0 = c[K_X] * x + c[K_EPS] * eps.float()
    out = c[C_X] * x + c[C_X0] * x0 + c[C_M] * previous + c[C_Z] * noise.float()
    return out.to(latents.dtype), x0


def noise_reference(coefficients: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPM ``add_noise`` at the step's timestep, from the row's coefficients."""
    return (coefficients[FACE_SIGNAL] * latent.float() + coefficients[FACE_NOISE] * noise.float()).to(latent.dtype)
