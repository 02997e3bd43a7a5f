"""Time LCM-Lookahead generation: lcmla's eager pipeline against the authors' plain-diffusers way of doing the same work.

Both run the same full-size SDXL-architecture networks (the ``sdxl`` preset: seeded random weights; speed does not
depend on weight values) in the same process, at the same shapes. The authors' way, from their inference code
(``official_method_facts.md``): a second, separate UNet copy as the K/V-encoder, run to the end (``up_blocks[2]`` and
``conv_out`` included) with the K/V read off its self-attention layers; the reference face VAE-encoded again at every
step; then the decoder passes. lcmla: one shared UNet, the K/V-encoder stopped after its last K/V layer, the face
encoded once per call.

Measured (CUDA events, median of ``--iters``): one guided step (quality mode: K/V-encoder + no-K/V and full decoder
passes, batch 2 each) and one fast step (LCM, conditional branch: encoder + LCM decoder, batch 1), each both ways;
the face VAE encode alone; peak memory of each way; and lcmla's whole ``generate()`` (text, face, loop, VAE decode)
in both modes. Prints a table and writes JSON.

    python benchmarks/generate_step.py --json generate_step.json                 # on a GPU
    python benchmarks/generate_step.py --preset tiny --size 128 --iters 2        # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lcmla_sdk import Personalizer
from lcmla_sdk.guidance import Guidance, three_branch
from lcmla_sdk.images import sample_face, vae_pixels
from lcmla_sdk.lora import KV_ENCODER_ADAPTER, activate_adapters
from lcmla_sdk.text import time_ids


def measure_ms(device: torch.device, work, warmup: int, iters: int) -> float:
    """Median milliseconds of ``work()`` (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            work()
            times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def peak_gib(device: torch.device, work) -> float | None:
    """Peak GiB allocated while ``work()`` runs, counting what is already resident."""
    if device.type != "cuda":
        work()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    work()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


class Inputs:
    """Every tensor one step needs, at ``size`` x ``size`` with the face at the model's face size."""

    def __init__(self, model: Personalizer, size: int, face) -> None:
        device, dtype, batch = model.device, model.dtype, 1
        side = size // model.vae_scale
        (text, pooled), (neg_text, neg_pooled) = model.encode_prompt(["An oil painting of a face"], None)
        (enc_text, enc_pooled), _ = model.encode_prompt([model.encoder_prompt], None)
        identity = model.encode_face(face)
        self.latent = torch.randn(2 * batch, 4, side, side, device=device, dtype=dtype)
        self.t = torch.full((2 * batch,), 500, device=device)
        self.text, self.pooled = torch.cat([neg_text, text]), torch.cat([neg_pooled, pooled])
        self.ids = time_ids(size, size, 2 * batch, dtype, device)
        self.tokens = torch.cat([identity.uncond_tokens, identity.cond_tokens]).to(device, dtype)
        self.enc_text, self.enc_pooled = torch.cat([neg_text, enc_text]), torch.cat([neg_pooled, enc_pooled])
        face_latent = identity.latent_mean * model.vae.config.scaling_factor  # the distribution mean, both ways
        self.face_latent = face_latent.to(device, dtype).repeat(2 * batch, 1, 1, 1)
        self.face_ids = time_ids(model.face_size, model.face_size, 2 * batch, dtype, device)
        self.face_pixels = vae_pixels(face, model.face_size).to(device, model.vae.dtype)

    def half(self, name: str) -> torch.Tensor:
        """The conditional half of a ``[uncond, cond]`` batch (fast mode runs only that)."""
        value = getattr(self, name)
        return value[value.shape[0] // 2 :]


def lcmla_steps(model: Personalizer, x: Inputs):
    """lcmla's steps: the shared UNet, the truncated K/V-encoder, the face latent encoded beforehand."""

    def guided():
        nokv = model.denoiser(x.latent, x.t, x.text, x.pooled, x.ids, x.tokens, 1.0, None)
        kv = model.kv_encoder(x.face_latent, x.t, x.enc_text, x.enc_pooled, x.face_ids)
        full = model.denoiser(x.latent, x.t, x.text, x.pooled, x.ids, x.tokens, 1.0, kv)
        return three_branch(*nokv.chunk(2), *full.chunk(2), Guidance())

    def fast():
        h = x.half
        kv = model.kv_encoder(h("face_latent"), h("t"), h("enc_text"), h("enc_pooled"), h("face_ids"))
        return model.lcm_denoiser(h("latent"), h("t"), h("text"), h("pooled"), h("ids"), h("tokens"), 1.0, kv)

    return guided, fast


def authors_steps(model: Personalizer, encoder_unet: torch.nn.Module, x: Inputs):
    """The authors' steps on plain diffusers modules: re-encode the face, run a separate encoder UNet to the end."""

    def encode_face(batch: int) -> torch.Tensor:
        latent = model.vae.encode(x.face_pixels).latent_dist.mean * model.vae.config.scaling_factor
        return latent.to(model.dtype).expand(batch, -1, -1, -1)

    def encoder_kv(face, t, text, pooled, ids) -> tuple[torch.Tensor, ...]:
        sink: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        activate_adapters(encoder_unet, (KV_ENCODER_ADAPTER,))
        encoder_unet(face, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                     cross_attention_kwargs={"kv_sink": sink}, return_dict=False)  # fmt: skip
        return tuple(tensor for index in sorted(sink) for tensor in sink[index])

    def guided():
        face = encode_face(x.latent.shape[0])
        nokv = model.denoiser(x.latent, x.t, x.text, x.pooled, x.ids, x.tokens, 1.0, None)
        kv = encoder_kv(face, x.t, x.enc_text, x.enc_pooled, x.face_ids)
        full = model.denoiser(x.latent, x.t, x.text, x.pooled, x.ids, x.tokens, 1.0, kv)
        return three_branch(*nokv.chunk(2), *full.chunk(2), Guidance())

    def fast():
        h = x.half
        kv = encoder_kv(encode_face(1), h("t"), h("enc_text"), h("enc_pooled"), h("face_ids"))
        return model.lcm_denoiser(h("latent"), h("t"), h("text"), h("pooled"), h("ids"), h("tokens"), 1.0, kv)

    return guided, fast, lambda: encode_face(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sdxl", choices=["sdxl", "tiny"])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--quality-steps", type=int, default=50)
    parser.add_argument("--json", type=Path, default=Path("generate_step.json"))
    args = parser.parse_args()

    begin = time.perf_counter()
    model = Personalizer.from_pretrained(args.preset)
    build_s = time.perf_counter() - begin
    device = model.device
    face = sample_face()
    x = Inputs(model, args.size, face)
    rows: dict[str, dict] = {}

    with torch.inference_mode():
        guided, fast = lcmla_steps(model, x)
        rows["lcmla guided step"] = {"ms": measure_ms(device, guided, args.warmup, args.iters),
                                      "peak_gib": peak_gib(device, guided)}  # fmt: skip
        rows["lcmla fast step"] = {"ms": measure_ms(device, fast, args.warmup, args.iters),
                                   "peak_gib": peak_gib(device, fast)}  # fmt: skip
        for mode, steps in (("fast", None), ("quality", args.quality_steps)):
            def generate(mode=mode, steps=steps):
                model.generate(face, "An oil painting of a face", seed=0, mode=mode, steps=steps,
                               height=args.size, width=args.size, output="pt")  # fmt: skip

            rows[f"lcmla generate() {mode}"] = {"ms": measure_ms(device, generate, 1, max(1, args.iters // 5)),
                                                "peak_gib": peak_gib(device, generate)}  # fmt: skip

        encoder_unet = copy.deepcopy(model.unet)  # the authors hold a second full UNet for the encoder
        a_guided, a_fast, vae_encode = authors_steps(model, encoder_unet, x)
        rows["authors' guided step"] = {"ms": measure_ms(device, a_guided, args.warmup, args.iters),
                                        "peak_gib": peak_gib(device, a_guided)}  # fmt: skip
        rows["authors' fast step"] = {"ms": measure_ms(device, a_fast, args.warmup, args.iters),
                                      "peak_gib": peak_gib(device, a_fast)}  # fmt: skip
        rows["face VAE encode (authors: every step)"] = {"ms": measure_ms(device, vae_encode, args.warmup, args.iters)}

        # Same work, same numbers: the two ways must agree (the face latent is the distribution mean in both).
        agree = (guided() - a_guided()).abs().max().item()

    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "preset": args.preset, "dtype": str(model.dtype), "size": args.size,
        "face_size": model.face_size, "latent": list(x.latent.shape), "quality_steps": args.quality_steps,
        "build_s": build_s, "guided_step_max_abs_difference": agree, "rows": rows,
        "guided_speedup": rows["authors' guided step"]["ms"] / rows["lcmla guided step"]["ms"],
        "fast_speedup": rows["authors' fast step"]["ms"] / rows["lcmla fast step"]["ms"],
    }  # fmt: skip
    print(f"{summary['device']}, torch {summary['torch']}, preset {args.preset} ({model.dtype}), "
          f"{args.size}x{args.size}, face {model.face_size}x{model.face_size}; built in {build_s:.0f} s")
    print(f"{'what':40s} {'ms':>10s} {'peak GiB':>9s}")
    for name, row in rows.items():
        peak = row.get("peak_gib")
        print(f"{name:40s} {row['ms']:>10.1f} {'-' if peak is None else f'{peak:.2f}':>9s}")
    print(f"guided step: authors / lcmla = {summary['guided_speedup']:.2f}x; fast step: {summary['fast_speedup']:.2f}x; "
          f"max |difference| of the guided step's eps: {agree:.2e}")
    args.json.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
