"""``lcmla bench``: end-to-end generation speed, lcmla against the authors' way and plain diffusers, in one process.

Every way runs the same networks (the ``sdxl`` preset's seeded random weights: speed does not depend on weight values)
at the same shapes, from an :class:`~lcmla_sdk.identity.Identity` (or its photo's CLIP features) to an image tensor on
the device, with the VAE in fp16 (the fp16-fix SDXL VAE the authors decode with):

* ``authors``: their inference loop (``official_method_facts.md`` sections 5-6): a second UNet of their own weights as
  the K/V-encoder (run to the end of ``up_blocks[1]``, K/V from ``extract_kv1``), the reference face VAE-encoded
  again at every step, ``[uncond, cond]`` batch-2 passes everywhere (their LCM branch too), three per guided step.
* ``diffusers``: what a user would pick instead: diffusers' ``StableDiffusionXLPipeline`` with IP-Adapter Plus-Face
  (no K/V: the method's identity path is missing), LCM-LoRA merged for fast mode, CFG 5.0 for quality mode.
* ``eager``: lcmla with ``cuda_graphs=False``; ``graphs``: the default; ``kv_cache``: graphs + the per-identity K/V
  cache; ``tiny_vae``: the latter decoded by the tiny VAE; ``compiled``, ``compiled_kv`` and ``compiled_tiny``: the
  same three with the networks and the VAE decode compiled, loaded from a folder built by ``lcmla export --backend
  torch`` (``compiled``; built first, in other processes, when the folder does not exist, and then a fresh process's
  time from start to its first image is measured). The compiled ways run after every other
  (:mod:`lcmla_sdk.bench_compiled`).

Per mode and way: latency at batch 1 (median, after the first call, whose time is reported as first-call time),
throughput at ``--batch`` (fast mode), the memory the way holds (its UNet weights) and its peak extra memory during a
call, and for lcmla with graphs the share of time in the K/V pass, the denoiser, guidance + scheduler, and decode.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from .bench_compiled import use_compiled
from .bench_profile import PROMPT, Inputs, kv_cache_effect, network_rows, step_shares
from .bench_timing import gib, measure, sync
from .freeu import AUTHORS_FREEU, stage_values
from .guidance import DEFAULT_GUIDANCE, three_branch
from .images import to_unit
from .networks import Denoiser, KVEncoder
from .pipeline import Personalizer
from .request import MODES
from .text import time_ids

WAYS = ("authors", "diffusers", "eager", "graphs", "kv_cache", "tiny_vae", "compiled", "compiled_kv", "compiled_tiny")
FAST_ONLY = ("kv_cache", "tiny_vae", "compiled_kv", "compiled_tiny")
COMPILED_WAYS = ("compiled", "compiled_kv", "compiled_tiny")


@dataclass
class BenchConfig:
    preset: str = "sdxl"
    size: int = 1024
    batch: int = 8
    fast_steps: int = MODES["fast"]
    quality_steps: int = MODES["quality"]
    iters: int = 3
    modes: tuple[str, ...] = ("fast", "quality")
    ways: tuple[str, ...] = WAYS
    device: str | None = None
    compiled: str | None = None  # folder of compiled networks (built when missing)
    network_rows: bool = True  # time each network alone first (a GPU only)


@dataclass
class Row:
    mode: str
    way: str
    batch: int
    first_ms: float
    ms: float
    images_per_s: float
    weights_gib: float
    peak_extra_gib: float
    shares: dict[str, float] = field(default_factory=dict)


class AuthorsWay:
    """The authors' inference loop over their own two UNets (module docstring)."""

    def __init__(self, model: Personalizer, mode: str) -> None:
        self.model = model
        self.encoder = KVEncoder(copy.deepcopy(model.kv_encoder.unet), len(model.kv_blocks))
        self.decoder = Denoiser(copy.deepcopy((model.lcm_denoiser if mode == "fast" else model.denoiser).unet))
        self.mode = mode

    def weights_gib(self) -> float:
        return gib(self.encoder, self.decoder)

    def __call__(self, x: Inputs, batch: int, steps: int) -> torch.Tensor:
        model, device, dtype = self.model, self.model.device, self.model.dtype
        scheduler, ddpm = model.make_scheduler(self.mode), DDPMScheduler.from_config(model.config["scheduler"])
        scheduler.set_timesteps(steps, device=device)
        generator = torch.Generator(device).manual_seed(0)
        side = x.size // model.vae_scale
        init = torch.randn(batch, 4, side, side, generator=generator, device=device, dtype=dtype)
        latents = init
        rows = 2 * batch  # [uncond, cond]
        text = torch.cat([x.neg_text.expand(batch, -1, -1), x.text.expand(batch, -1, -1)])
        pooled = torch.cat([x.neg_pooled.expand(batch, -1), x.pooled.expand(batch, -1)])
        enc_text = torch.cat([x.neg_text.expand(batch, -1, -1), x.enc_text.expand(batch, -1, -1)])
        enc_pooled = torch.cat([x.neg_pooled.expand(batch, -1), x.enc_pooled.expand(batch, -1)])
        tokens = torch.cat([x.identity.uncond_tokens, x.identity.cond_tokens]).to(device, dtype).repeat_interleave(batch, 0)
        ids = time_ids(x.size, x.size, rows, dtype, device)
        scale = torch.ones(rows, device=device)
        freeu = stage_values(AUTHORS_FREEU, device)  # their README's inference enables FreeU on the decoder
        for t in scheduler.timesteps:
            # The reference is VAE-encoded (sampled) again at every step, then noised with the initial noise at t.
            face = model.vae.encode(x.face_pixels).latent_dist.sample(generator) * model.vae.config.scaling_factor
            face = ddpm.add_noise(face.to(dtype).expand(batch, -1, -1, -1), init, t.reshape(1).expand(batch))
            t_rows = t.reshape(1).expand(rows)
            kv = self.encoder(torch.cat([face, face]), t_rows, enc_text, enc_pooled, ids)
            latent_in = torch.cat([latents, latents])
            full = self.decoder(latent_in, t_rows, text, pooled, ids, tokens, scale, kv, freeu)
            if self.mode == "fast":
                eps = full.chunk(2)[1]
            else:
                nokv = self.decoder(latent_in, t_rows, text, pooled, ids, tokens, scale, None, freeu)
                eps = three_branch(*nokv.chunk(2), *full.chunk(2), DEFAULT_GUIDANCE)
            latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
        # their decode: diffusers' own, not the library's decode network
        return to_unit(model.vae.decode(model.decoder.scaled(latents)).sample)


class DiffusersWay:
    """diffusers' SDXL pipeline with IP-Adapter Plus-Face on a plain copy of the UNet (weights shared with ours)."""

    def __init__(self, model: Personalizer, mode: str) -> None:
        from diffusers import StableDiffusionXLPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        from .lora import LCM_ADAPTER, materialize

        unet = materialize(model.unet, (LCM_ADAPTER,) if mode == "fast" else ())
        processors = {}
        for name, attention in unet.attn_processors.items():
            block = unet.get_submodule(name.rsplit(".", 2)[0])
            if name.endswith("attn2.processor"):
                ours = block.attn2.processor
                ip = IPAdapterAttnProcessor2_0(block.attn2.inner_dim, ours.to_k_ip.in_features, num_tokens=(16,))
                ip.to_k_ip[0].weight, ip.to_v_ip[0].weight = ours.to_k_ip.weight, ours.to_v_ip.weight
                processors[name] = ip
            else:
                processors[name] = AttnProcessor2_0()
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([model.adapter.resampler])
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
        self.unet, self.mode, self.model = unet, mode, model
        self.pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=unet,
            scheduler=model.make_scheduler(mode),
        )  # fmt: skip
        self.pipe.set_progress_bar_config(disable=True)

    def weights_gib(self) -> float:
        return gib(self.unet)

    def __call__(self, x: Inputs, batch: int, steps: int) -> torch.Tensor:
        guided = self.mode == "quality"
        embeds = x.clip_hidden[:, None] if guided else x.clip_hidden[1:, None]  # (uncond, cond) x 1 image
        return self.pipe(
            prompt_embeds=x.text, pooled_prompt_embeds=x.pooled, negative_prompt_embeds=x.neg_text,
            negative_pooled_prompt_embeds=x.neg_pooled, ip_adapter_image_embeds=[embeds],
            num_inference_steps=steps, guidance_scale=5.0 if guided else 0.0, num_images_per_prompt=batch,
            height=x.size, width=x.size, output_type="pt", generator=torch.Generator(self.model.device).manual_seed(0),
        ).images  # fmt: skip


def _lcmla(model: Personalizer, way: str, mode: str):
    cached = way in ("kv_cache", "tiny_vae", "compiled_kv", "compiled_tiny")
    options = {"kv_cache": cached, "vae": "tiny" if way in ("tiny_vae", "compiled_tiny") else "full"}

    def run(x: Inputs, batch: int, steps: int) -> torch.Tensor:
        model.cuda_graphs = way != "eager"
        return model.generate(x.identity, PROMPT, num_images=batch, seed=0, mode=mode, steps=steps, height=x.size,
                              width=x.size, output="pt", **options)  # fmt: skip

    return run


def _lcmla_weights(model: Personalizer, mode: str) -> float:
    denoiser = model.lcm_denoiser if mode == "fast" else model.denoiser
    return gib(model.kv_encoder, denoiser)


def planned_runs(config: BenchConfig) -> list[tuple[str, str]]:
    """(mode, way) pairs to run, the compiled ways last. No K/V cache in quality mode: 50 steps x [uncond, cond] of K/V are tens of GiB per
    identity at 1024^2 (docs/PERFORMANCE.md)."""
    runs = [(m, w) for m in config.modes for w in config.ways if not (m == "quality" and w in FAST_ONLY)]
    return sorted(runs, key=lambda run: run[1] in COMPILED_WAYS)  # compiling is for the rest of the process


def run_bench(config: BenchConfig, report: Callable[[str], None] = print, path: Path | None = None) -> dict[str, Any]:
    """Build the model, run every (mode, way), return the results (rows, network timings, environment); with
    ``path``, the JSON is rewritten after every row, so an interrupted run keeps what it measured."""
    begin = time.perf_counter()
    model = Personalizer.from_pretrained(config.preset, device=config.device)
    sync(model.device)
    build_s = time.perf_counter() - begin
    device = model.device
    report(f"built {config.preset} on {device} in {build_s:.1f} s")
    results: dict[str, Any] = {"config": asdict(config), "build_s": build_s, "rows": [], "networks": {}}
    results["environment"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "dtype": str(model.dtype), "size": config.size, "face_size": model.face_size,
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    with torch.inference_mode():
        x = Inputs(model, config.size)
        if device.type == "cuda" and config.network_rows:
            results["networks"] = network_rows(model, x)
            report("networks: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results["networks"].items()))
        for mode, way in planned_runs(config):
            steps = config.fast_steps if mode == "fast" else config.quality_steps
            if way in ("tiny_vae", "compiled_tiny") and model.decoder.tiny_vae is None:
                continue
            if way in COMPILED_WAYS and "compiled" not in results:
                results["compiled"] = use_compiled(model, config, planned_runs(config), report)
            runner = {"authors": AuthorsWay, "diffusers": DiffusersWay}.get(way)
            run = runner(model, mode) if runner else _lcmla(model, way, mode)
            weights = run.weights_gib() if runner else _lcmla_weights(model, mode)
            batches = tuple(sorted({1, config.batch})) if mode == "fast" else (1,)
            for batch in batches:
                first, ms, peak = measure(device, lambda: run(x, batch, steps), config.iters)
                row = Row(mode, way, batch, first, ms, 1000 * batch / ms, weights, peak)
                if way in ("graphs", "compiled") and batch == 1 and device.type == "cuda":
                    row.shares = step_shares(model, x, mode, steps, ms)
                results["rows"].append(asdict(row))
                if path is not None:
                    save(results, path)
                report(f"{mode:8s} {way:10s} b{batch}: {ms:9.1f} ms (first {first:.0f} ms), peak +{peak:.2f} GiB")
            if way == "kv_cache":
                results["kv_cache"] = kv_cache_effect(model, x, steps)
                report(f"K/V cache: {results['kv_cache']}")
            del run
            model.cuda_graphs = True
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def table(results: dict[str, Any]) -> str:
    """A Markdown table of the rows, with ratios to the authors' and diffusers' way of the same mode and batch."""
    rows = results["rows"]
    ref = {(r["mode"], r["batch"], r["way"]): r["ms"] for r in rows}
    lines = ["| mode | way | batch | ms | images/s | first call ms | UNet weights GiB | peak extra GiB | authors / this | diffusers / this |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ratios = [ref.get((r["mode"], r["batch"], way)) for way in ("authors", "diffusers")]
        ratio_text = [f"{v / r['ms']:.2f}x" if v else "-" for v in ratios]
        lines.append(f"| {r['mode']} | {r['way']} | {r['batch']} | {r['ms']:.1f} | {r['images_per_s']:.2f} | "
                     f"{r['first_ms']:.0f} | {r['weights_gib']:.2f} | {r['peak_extra_gib']:.2f} | "
                     f"{ratio_text[0]} | {ratio_text[1]} |")  # fmt: skip
    return "\n".join(lines)


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in results.items() if not callable(v)}, indent=1))
