"""The LCM-Lookahead training loop on accelerate: a diffusion step and a lookahead step per iteration.

Per step (``official_method_facts.md`` sections 7-11):

1. Load the batch for this step (data position = step) and encode it without gradients: VAE latents of target and
   reference, prompts of both.
2. Diffusion step: t ~ p(t) (alpha 0.5); target and reference noised with the same noise and t; the KV-encoder reads
   the noisy reference (K/V tokens dropped per layer), the denoiser predicts the target's noise with the image tokens
   (dropped to unconditional per sample); MSE; backward, clip, optimiser step.
3. Lookahead step (every ``lookahead.every`` steps, first ``lookahead.batch_size`` samples): t ~ p(t) (alpha 0.2);
   the LCM-LoRA denoiser (scale lambda) with the same kind of encoder K/V gives a one-step preview, decoded by the
   tiny VAE; identity and DreamSim losses against the reference (weights 1e-3, times lambda); backward, clip,
   optimiser step. As in the authors' code, the diffusion step clips the KV-encoder's gradients only, the lookahead
   step all trainables' together. ``combined_step`` sums both losses into one backward/optimiser step instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast, gather_object
from diffusers import DDPMScheduler, LCMScheduler
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lcmla_sdk.atomic import write_text
from lcmla_sdk.images import to_uint8
from lcmla_sdk.presets import PRESETS, preset_part

from . import checkpoints
from .arcface import training_arcface
from .config import ConfigError, TrainConfig
from .data import DataSummary, PairDataset, PairIndex, StepBatches, collate
from .faces import landmark_source
from .losses import IdentityLoss, load_perceptual, optional_dreamsim, preview_decoder
from .model import load_model
from .step_losses import StepLosses
from .trainables import (
    SharedUNetLora, average_gradients, checksum, make_optimizer, make_trainable, trainable_parameters,
    training_networks,
)  # fmt: skip

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
StepCallback = Callable[[int, dict[str, float]], Any]


class Trainer(StepLosses):
    """Builds everything a run needs from a :class:`TrainConfig`; :meth:`train` runs it (resuming if asked)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=config.logging.tracker,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        lookahead = config.lookahead

        # 1. What can be checked cheaply comes before the model load: random weights where none are given (presets
        #    only), the data sets and the face pack.
        random_parts = preset_parts(
            config.model, tiny_vae=config.tiny_vae is None, arcface=config.arcface.weights is None and not config.arcface.arch
        )  # fmt: skip
        self.index = PairIndex(config.data.sets)
        self.summary: DataSummary = self.index.summary
        self.landmarks = landmark_source(config.faces)

        # 2. The SDK model (frozen, weight dtype) and its schedulers.
        self.model = load_model(
            config.model, self.device, self.weight_dtype, lookahead=bool(lookahead.every),
            max_timestep=lookahead.max_timestep, resolution=config.data.resolution,
        )  # fmt: skip
        self.ddpm = DDPMScheduler.from_config(self.model.config["scheduler"])
        self.lcm_scheduler = LCMScheduler.from_config(
            self.model.config["scheduler"], timestep_scaling=lookahead.timestep_scaling
        )

        # 3. The lookahead objective: ArcFace for the identity loss, DreamSim, the optional perceptual loss, the tiny
        #    VAE that decodes the previews.
        arcface = training_arcface(config.arcface.weights, config.arcface.arch or random_parts.get("arcface"), config.seed)
        self.identity_loss = IdentityLoss(arcface.to(self.device))
        self.dreamsim = optional_dreamsim(lookahead.dreamsim, lookahead.dreamsim_weight, self.device) if lookahead.every else None
        self.perceptual = (
            load_perceptual(lookahead.perceptual, lookahead.perceptual_kwargs, self.device) if lookahead.perceptual else None
        )  # fmt: skip
        self.tiny_vae = preview_decoder(
            config.tiny_vae, random_parts.get("tiny_vae"), config.seed, self.device, self.weight_dtype
        )

        # 4. Trainables, optimiser, LR schedule; checkpointing that keeps each network's LoRA state on recomputation.
        self.groups = trainable_parameters(self.model)
        self.params = make_trainable(self.groups)
        self.encoder_params = [param for _, param in self.groups["encoder"]]
        self.lora = SharedUNetLora(self.model.unet)
        if config.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing(gradient_checkpointing_func=self.lora.checkpoint)
            self.tiny_vae.enable_gradient_checkpointing()
        optimizer = make_optimizer(self.groups, config.optim)
        self.networks = training_networks(self.model)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.lr_scheduler = get_scheduler(
            config.optim.lr_schedule, optimizer, num_warmup_steps=config.optim.warmup_steps,
            num_training_steps=config.max_steps,
        )  # fmt: skip
        if self.accelerator.num_processes > 1:  # every rank starts from rank 0's trainables
            for param in self.params:
                param.data.copy_(broadcast(param.data, from_process=0))

        # 5. Data: pairs by step, so the data position is the step.
        self.dataset = PairDataset(
            self.index, config.data.resolution, self.model.clip_size, self.landmarks, config.seed, self.rank,
            config.data.max_redraws,
        )  # fmt: skip
        self.step = 0
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ one step
    def batch_for_step(self, step: int) -> dict[str, Any]:
        """The batch the data loader yields at ``step`` (loaded in this process)."""
        return collate([self.dataset[(step, slot)] for slot in range(self.config.batch_size)])

    def optimise(self, loss: torch.Tensor, clipped: list[torch.nn.Parameter] | None = None) -> float | None:
        """Backward, average over processes, clip the norm of ``clipped``'s gradients (default: all trainables'),
        step; returns that norm. Skipped on every rank when no rank has a gradient (e.g. no face in any preview), so
        the processes stay in lockstep."""
        accelerator = self.accelerator
        has_grad = loss.requires_grad
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(has_grad)], device=self.device)
            any_grad = accelerator.reduce(flag, reduction="sum").item() > 0
        else:
            any_grad = has_grad
        if not any_grad:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if has_grad:
            accelerator.backward(loss)
        if accelerator.num_processes > 1:
            average_gradients(self.params, accelerator.reduce)
        norm = accelerator.clip_grad_norm_(self.params if clipped is None else clipped, self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One training step at ``self.step``; returns its logs (losses as floats, the preview tensor)."""
        config, step = self.config, self.step
        if set(batch["step"]) != {step}:
            raise RuntimeError(f"data position {sorted(set(batch['step']))} does not match training step {step}")
        inputs = self.prepare_inputs(batch, step)
        lookahead_due = bool(config.lookahead.every) and step % config.lookahead.every == 0
        logs: dict[str, Any] = {}
        diffusion = self.diffusion_loss(inputs, step) if config.diffusion.weight else None  # weight 0: no such step
        if config.combined_step:
            lookahead = self.lookahead_loss(inputs, step) if lookahead_due else None
            total = (diffusion["loss"] if diffusion else 0.0) + (lookahead["loss"] if lookahead else 0.0)
            logs["grad_norm"] = self.optimise(total) if torch.is_tensor(total) else None
        else:
            if diffusion is not None:
                logs["grad_norm/diffusion"] = self.optimise(diffusion["loss"], self.encoder_params)  # as the authors
            lookahead = self.lookahead_loss(inputs, step) if lookahead_due else None
            if lookahead is not None:
                logs["grad_norm/lookahead"] = self.optimise(lookahead["loss"])
        self.lr_scheduler.step()
        if diffusion is not None:
            logs["loss/diffusion"] = float(diffusion["diffusion"])
        if lookahead is not None:
            logs["lcm_scale"] = lookahead["lcm_scale"]
            logs["lookahead/faces_missing"] = lookahead["faces_missing"]
            logs["preview"] = lookahead["preview"]
            for key in ("identity", "dreamsim", "perceptual"):
                if key in lookahead:
                    logs[f"loss/{key}"] = float(lookahead[key])
        for group in self.optimizer.param_groups:
            logs[f"lr/{group['name']}"] = group["lr"]
        self.step += 1
        return logs

    # ------------------------------------------------------------------ the run
    def train(self, resume: str | Path | bool = False, on_step: StepCallback | None = None) -> dict[str, Any]:
        """Run to ``max_steps``. ``resume``: ``True`` for the newest checkpoint in the output directory, or a path.

        Returns the data summary and the last step's losses. ``on_step(step, logs)`` runs after every step.
        """
        config, accelerator = self.config, self.accelerator
        if resume:
            self.load_checkpoint(resume)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.output_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
            print(self.summary.text(), flush=True)
        if config.logging.tracker:
            accelerator.init_trackers("lcmla-train", config=_flat(config.to_dict()))
        loader = DataLoader(
            self.dataset, batch_sampler=StepBatches(self.step, config.max_steps, config.batch_size), collate_fn=collate,
            num_workers=config.data.num_workers, pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        progress = tqdm(total=config.max_steps, initial=self.step, disable=not accelerator.is_main_process, desc="train")
        logs: dict[str, Any] = {}
        for batch in loader:
            self._count_skipped(batch["skipped"])
            logs = self.train_step(batch)
            step = self.step  # steps completed
            progress.update(1)
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
            if on_step is not None:
                on_step(step - 1, logs)
            self._log(logs, step)
            if config.logging.check_sync_every and step % config.logging.check_sync_every == 0:
                self.check_sync(step)
            if step % config.checkpoint.every == 0 or step == config.max_steps:
                self.save_checkpoint()
        progress.close()
        if accelerator.is_main_process:
            print(self.summary.text(), flush=True)
            write_text(self.output_dir / "data_summary.json", json.dumps(self.summary.to_dict(), indent=1))
        accelerator.end_training()
        return {"step": self.step, "summary": self.summary.to_dict(),
                "losses": {k: v for k, v in logs.items() if k.startswith("loss/")}}  # fmt: skip

    def _count_skipped(self, skipped: list[tuple[str, str]]) -> None:
        if self.accelerator.num_processes > 1:
            skipped = [item for items in gather_object([skipped]) for item in items]
        self.summary.add_skipped(skipped)

    def _log(self, logs: dict[str, Any], step: int) -> None:
        config, accelerator = self.config, self.accelerator
        if not config.logging.tracker or not accelerator.is_main_process:  # trackers live on rank 0
            return
        if step % config.logging.every == 0:
            scalars = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            scalars["data/skipped"] = sum(len(paths) for paths in self.summary.skipped.values())
            accelerator.log(scalars, step=step)
        preview = logs.get("preview")
        if preview is not None and config.logging.preview_every and step % config.logging.preview_every == 0:
            tracker = accelerator.get_tracker(config.logging.tracker, unwrap=False)
            if hasattr(tracker, "log_images"):
                tracker.log_images({"preview": to_uint8(preview)}, step=step, dataformats="NHWC")

    def check_sync(self, step: int) -> None:
        """Compare the trainables across processes; raise if any rank differs."""
        sums = self.accelerator.gather(checksum(self.params).to(self.device).view(1)).tolist()
        if len(set(sums)) > 1:
            raise RuntimeError(f"step {step}: trainables differ between ranks: checksums {sums}")
        if self.accelerator.is_main_process:
            print(f"step {step}: trainables identical on {len(sums)} rank(s) (checksum {sums[0]:.10g})", flush=True)

    # ------------------------------------------------------------------ checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().cpu() for named in self.groups.values() for name, param in named}

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step atomically (all ranks take part; rank 0 writes the model)."""
        accelerator, step = self.accelerator, self.step
        if accelerator.is_main_process:
            # A model directory (from_pretrained reads it) naming the frozen parts where the base model has them.
            checkpoints.begin(self.output_dir, step, lambda staging: self.model.save_pretrained(staging, link_frozen=True))
        accelerator.wait_for_everyone()
        staging = checkpoints.staging_path(self.output_dir, step)
        checkpoints.write_rng_state(staging / checkpoints.STATE_DIR, self.rank)
        if accelerator.is_main_process:
            trainables = self.trainable_state()
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            state = {
                "step": step, "world_size": accelerator.num_processes,
                "samples_seen": step * self.config.batch_size * accelerator.num_processes,
                "skipped_paths": {reason: sorted(paths) for reason, paths in self.summary.skipped.items()},
                "config": self.config.to_dict(),
            }  # fmt: skip
            checkpoints.write_trainer_state(
                staging / checkpoints.STATE_DIR, trainables, self.optimizer.state_dict(), self.lr_scheduler.state_dict(),
                scaler, state,
            )  # fmt: skip
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpoints.commit(staging, self.output_dir, step, self.config.checkpoint.keep)
        accelerator.wait_for_everyone()
        return checkpoints.checkpoint_path(self.output_dir, step)

    def load_checkpoint(self, resume: str | Path | bool) -> Path:
        """Restore trainables, optimiser, LR schedule, gradient scaler, RNG states and the data position."""
        path = checkpoints.latest_checkpoint(self.output_dir) if resume is True else Path(resume)
        if path is None:
            raise checkpoints.CheckpointError(f"resume: no complete checkpoint in {self.output_dir / checkpoints.CHECKPOINTS}")
        trainables, optimisation, state = checkpoints.read_trainer_state(path)
        if state["world_size"] != self.accelerator.num_processes:
            raise checkpoints.CheckpointError(
                f"resume: {path} was saved by {state['world_size']} process(es); resume with the same number"
            )
        expected = {name for named in self.groups.values() for name, _ in named}
        if set(trainables) != expected:
            difference = sorted(set(trainables) ^ expected)[:3]
            raise checkpoints.CheckpointError(f"resume: {path} holds other trainables than this model ({difference})")
        with torch.no_grad():
            for named in self.groups.values():
                for name, param in named:
                    param.copy_(trainables[name].to(self.device))
        try:
            self.optimizer.load_state_dict(optimisation["optimizer"])
            self.lr_scheduler.load_state_dict(optimisation["scheduler"])
        except (ValueError, KeyError) as error:
            raise checkpoints.CheckpointError(f"resume: {path}: optimiser state does not fit: {error}") from None
        if self.accelerator.scaler is not None and optimisation["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(optimisation["scaler"])
        checkpoints.read_rng_state(path / checkpoints.STATE_DIR, self.rank)
        self.step = state["step"]
        self.summary.restore(state)
        return path


def preset_parts(model: str, *, tiny_vae: bool, arcface: bool) -> dict[str, Any]:
    """Constructor arguments of the lookahead networks to draw at random (``True``: their weights are not given);
    presets alone define them."""
    wanted = [part for part, random in (("tiny_vae", tiny_vae), ("arcface", arcface)) if random]
    if wanted and model not in PRESETS:
        key = {"tiny_vae": "tiny_vae", "arcface": "arcface.weights"}[wanted[0]]
        raise ConfigError(f"{key}: required for a model directory (random weights exist for presets only)")
    return {part: preset_part(model, part) for part in wanted}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b": value}`` with lists as strings (TensorBoard's hparams take scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
