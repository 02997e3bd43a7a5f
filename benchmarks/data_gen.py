"""Synthetic-set generation speed on a GPU: `lcmla data`'s generator against a plain diffusers loop, one process.

Full-size SDXL-Turbo architecture with random weights (lcmla's `sdxl` preset configs + Turbo's scheduler), fp16,
512^2, 1 step, guidance 0. The same images (identities x 5 photos, same prompts and seeds) are made

* ``diffusers loop``: ``AutoPipelineForText2Image`` called once per image and each image saved as JPEG before the
  next call (the authors' ``scripts/faces_generation.py`` way);
* ``lcmla plain``: :class:`lcmla_sdk.data.SetGenerator`, batched, JPEG writes on threads, identity records;
* ``lcmla attention``: the same with anchor-shared self-attention (the consistent mode's cost);
* each lcmla way also with the VAE decoding in fp16 (``--vae`` with the fp16-fix VAE; here its config on random
  weights), since Turbo's own VAE is upcast to fp32.

Time and disk for 100k identities x 5 images are extrapolated from each. Random weights draw noise, which JPEG
cannot compress, so the disk figure is an upper bound (photos compress several times better).

    python benchmarks/data_gen.py --out $OUT/data.json [--identities 16] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, AutoPipelineForText2Image
from diffusers.models.attention_processor import AttnProcessor2_0

from lcmla_sdk.data import PlanOptions, SetGenerator, generated_identities, load_turbo, run_record
from lcmla_sdk.data.plan import image_jobs
from lcmla_sdk.presets import preset_config

TARGET_IMAGES = 100_000 * 5


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lcmla_way(pipe, identities, options, batch, folder: Path) -> dict:
    generator = SetGenerator(pipe, options, batch_size=batch, writers=4)
    record = run_record(options, "benchmark")
    generator.run(identities[:2], folder / "warmup", record)  # kernels, allocator, threads
    synchronize()
    begin = time.perf_counter()
    summary = generator.run(identities, folder / "timed", record)
    synchronize()
    seconds = time.perf_counter() - begin
    return _result(summary["images"], seconds, folder / "timed")


def diffusers_loop(pipe, identities, options, folder: Path) -> dict:
    plain = AutoPipelineForText2Image.from_pipe(pipe)
    plain.set_progress_bar_config(disable=True)
    jobs = [job for identity in identities for job in image_jobs(identity, options)]

    def make(job, root: Path) -> None:
        image = plain(prompt=job.prompt, num_inference_steps=1, guidance_scale=0.0, height=options.size,
                      width=options.size, generator=torch.Generator().manual_seed(job.seed)).images[0]  # fmt: skip
        path = root / job.relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=95)

    for job in jobs[:2]:
        make(job, folder / "warmup")
    synchronize()
    begin = time.perf_counter()
    for job in jobs:
        make(job, folder / "timed")
    synchronize()
    return _result(len(jobs), time.perf_counter() - begin, folder / "timed")


def _result(images: int, seconds: float, root: Path) -> dict:
    sizes = [p.stat().st_size for p in root.rglob("*.jpg")]
    rate = images / seconds
    return {
        "images": images, "seconds": round(seconds, 3), "images_per_second": round(rate, 2),
        "mean_jpeg_bytes": round(sum(sizes) / len(sizes)),
        "hours_for_100k_x_5": round(TARGET_IMAGES / rate / 3600, 2),
        "disk_gb_for_100k_x_5_upper_bound": round(TARGET_IMAGES * sum(sizes) / len(sizes) / 1e9, 1),
    }  # fmt: skip


def fp16_vae(pipe, preset: str) -> AutoencoderKL:
    """A VAE of the model's architecture that decodes in its dtype (the fp16-fix VAE's config: no force_upcast)."""
    torch.manual_seed(1)
    with torch.device(pipe.device):
        vae = AutoencoderKL(**{**preset_config(preset)["vae"], "force_upcast": False})
    return vae.to(dtype=pipe.unet.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file.")
    parser.add_argument("--identities", type=int, default=16, help="Identities timed (x 5 photos).")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--ways", default="diffusers,plain,attention,plain_fp16vae,attention_fp16vae")
    parser.add_argument("--preset", default="sdxl", help="'tiny' with --device cpu: a smoke run of this script.")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()  # the tiny tokenizer's truncation notes, once per call
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmarks/data_gen.py needs a CUDA GPU (or --preset tiny --device cpu for a smoke run)")

    begin = time.perf_counter()
    pipe = load_turbo(args.preset, args.device, torch.float16 if args.device.startswith("cuda") else torch.float32)
    build_seconds = time.perf_counter() - begin
    identities = generated_identities(args.identities)
    plain = PlanOptions(per_identity=5, per_style=0, styles=(), size=args.size)
    attention = PlanOptions(per_identity=5, per_style=0, styles=(), size=args.size, consistent=("attention",))
    turbo_vae, results = pipe.vae, {}
    with tempfile.TemporaryDirectory() as scratch:
        for way in args.ways.split(","):  # the attention ways install their processor last
            folder = Path(scratch) / way
            pipe.vae = fp16_vae(pipe, args.preset) if way.endswith("fp16vae") else turbo_vae
            pipe.unet.set_attn_processor(AttnProcessor2_0())  # diffusers' own, until an attention way replaces it
            if way == "diffusers":
                results[way] = diffusers_loop(pipe, identities, plain, folder)
            else:
                options = attention if way.startswith("attention") else plain
                results[way] = lcmla_way(pipe, identities, options, args.batch, folder)
            print(f"{way:20s} {results[way]}", flush=True)
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "size": args.size, "batch": args.batch, "identities": args.identities,
        "model": f"{args.preset} preset configs, random weights, fp16, Euler-ancestral trailing, 1 step, guidance 0",
        "build_seconds": round(build_seconds, 1), "results": results,
    }  # fmt: skip
    if "diffusers" in results:
        base = results["diffusers"]["images_per_second"]
        report["speedup_vs_diffusers_loop"] = {w: round(r["images_per_second"] / base, 2) for w, r in results.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
