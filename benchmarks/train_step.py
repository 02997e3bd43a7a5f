"""Time LCM-Lookahead training steps and measure peak memory.

Builds the trainer on an embedded preset (``sdxl``: the full SDXL architecture, TAESD-XL and an IResNet-50 ArcFace,
all with seeded random weights), on a synthetic face set at the training resolution, with gradient checkpointing on,
and runs warm-up plus timed steps. Each step is timed in its two parts, as the trainer runs them: the diffusion step
(encode batch, forward, backward, optimiser step) and the lookahead step (LCM preview, tiny-VAE decode, identity
loss, backward, optimiser step). Prints a table and writes JSON.

    python benchmarks/train_step.py --preset sdxl --steps 3 --json train_step.json          # on a GPU
    python benchmarks/train_step.py --preset tiny --resolution 64 --mixed-precision no       # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lcmla_sdk.train import Trainer, config_from_dict
from lcmla_sdk.train.synthetic import write_synthetic_dataset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(device: torch.device, work) -> tuple[float, float | None]:
    """(seconds, peak GiB allocated during ``work``)."""
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start, _peak_gib(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sdxl", choices=["sdxl", "tiny"])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="fp16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("train_step.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "faces"
        write_synthetic_dataset(data, identities=2, images=3, size=args.resolution)
        config = config_from_dict({
            "output_dir": str(Path(work) / "run"), "model": args.preset, "mixed_precision": args.mixed_precision,
            "batch_size": args.batch_size, "max_steps": args.warmup + args.steps,
            "gradient_checkpointing": not args.no_checkpointing,
            "data": {"sets": [{"root": str(data)}], "resolution": args.resolution, "num_workers": 0},
            "faces": {"landmarks": "template"}, "lookahead": {"batch_size": args.batch_size},
            "logging": {"tracker": None},
        })  # fmt: skip
        start = time.perf_counter()
        trainer = Trainer(config)
        build_s = time.perf_counter() - start
        device = trainer.device
        _sync(device)
        model_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None

        rows = []
        for step in range(args.warmup + args.steps):
            batch = trainer.batch_for_step(step)
            inputs = {}

            def diffusion(step=step, batch=batch, inputs=inputs):
                inputs.update(trainer.prepare_inputs(batch, step))
                trainer.optimise(trainer.diffusion_loss(inputs, step)["loss"])

            def lookahead(step=step, inputs=inputs):
                trainer.optimise(trainer.lookahead_loss(inputs, step)["loss"])

            diffusion_s, diffusion_gib = timed(device, diffusion)
            lookahead_s, lookahead_gib = timed(device, lookahead)
            rows.append({"step": step, "warmup": step < args.warmup, "diffusion_s": diffusion_s,
                         "lookahead_s": lookahead_s, "diffusion_peak_gib": diffusion_gib,
                         "lookahead_peak_gib": lookahead_gib})  # fmt: skip

    timed_rows = [r for r in rows if not r["warmup"]] or rows
    summary = {
        "preset": args.preset, "resolution": args.resolution, "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": not args.no_checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "build_s": build_s, "model_memory_gib": model_gib,
        "trainable_parameters": sum(p.numel() for p in trainer.params),
        "diffusion_step_s": statistics.median(r["diffusion_s"] for r in timed_rows),
        "lookahead_step_s": statistics.median(r["lookahead_s"] for r in timed_rows),
        "peak_memory_gib": max(max(r["diffusion_peak_gib"], r["lookahead_peak_gib"]) for r in rows)
        if device.type == "cuda" else None,
        "steps": rows,
    }  # fmt: skip

    def gib(value):
        return "-" if value is None else f"{value:.2f}"

    print(f"{summary['device']}, torch {summary['torch']}, preset {args.preset}, {args.resolution}px, "
          f"batch {args.batch_size}, {args.mixed_precision}, checkpointing {'on' if not args.no_checkpointing else 'off'}")
    print(f"built in {build_s:.1f} s; weights on device {gib(model_gib)} GiB; "
          f"{summary['trainable_parameters']:,} trainable parameters")
    print(f"{'step':>4} {'diffusion s':>12} {'peak GiB':>9} {'lookahead s':>12} {'peak GiB':>9}")
    for r in rows:
        mark = " (warm-up)" if r["warmup"] else ""
        print(f"{r['step']:>4} {r['diffusion_s']:>12.3f} {gib(r['diffusion_peak_gib']):>9} "
              f"{r['lookahead_s']:>12.3f} {gib(r['lookahead_peak_gib']):>9}{mark}")
    print(f"median: diffusion {summary['diffusion_step_s']:.3f} s, lookahead {summary['lookahead_step_s']:.3f} s, "
          f"peak {gib(summary['peak_memory_gib'])} GiB")
    args.json.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
