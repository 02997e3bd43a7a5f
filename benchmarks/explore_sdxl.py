"""Device exploration: which settings make the full-size networks faster (CUDA graphs, batch 1, 1024^2).

Times the LCM denoiser (with K/V) and the K/V-encoder captured in CUDA graphs under cuDNN autotuning,
channels-last weights and each SDPA backend; the VAE decode likewise; and lists the heaviest kernels of one eager
denoiser pass. Prints lines and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lcmla_sdk import Personalizer
from lcmla_sdk.bench import Inputs
from lcmla_sdk.bench_timing import graph_ms, measure
from lcmla_sdk.text import time_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=Path("explore.json"))
    args = parser.parse_args()
    model = Personalizer.from_pretrained("sdxl", device="cuda")
    device, dtype = model.device, model.dtype
    out: dict[str, float | list] = {}
    with torch.inference_mode():
        x = Inputs(model, 1024)
        latent = torch.randn(1, 4, 128, 128, device=device, dtype=dtype)
        t = torch.full((1,), 500.0, device=device)
        ids = time_ids(1024, 1024, 1, dtype, device)
        tokens, scale = x.identity.cond_tokens.to(device, dtype), torch.ones(1, device=device)
        kv = model.kv_encoder(latent, t, x.enc_text, x.enc_pooled, ids)

        def denoise():
            return model.lcm_denoiser(latent, t, x.text, x.pooled, ids, tokens, scale, kv)

        def encode():
            return model.kv_encoder(latent, t, x.enc_text, x.enc_pooled, ids)

        def decode():
            return model.vae.decode(latent).sample

        def record(name, value):
            out[name] = value
            print(f"{name}: {value:.2f} ms", flush=True)

        record("denoiser graph", graph_ms(device, denoise))
        record("encoder graph", graph_ms(device, encode))
        record("decode eager", measure(device, decode, 3)[1])
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    record(f"denoiser graph sdpa={backend.name}", graph_ms(device, denoise))
                    record(f"decode eager sdpa={backend.name}", measure(device, decode, 3)[1])
            except RuntimeError as error:
                print(f"{backend.name}: {error}")
        torch.backends.cudnn.benchmark = True
        record("denoiser graph cudnn.benchmark", graph_ms(device, denoise))
        record("encoder graph cudnn.benchmark", graph_ms(device, encode))
        record("decode eager cudnn.benchmark", measure(device, decode, 3)[1])
        record("decode graph cudnn.benchmark", graph_ms(device, decode, 3))
        model.vae.to(memory_format=torch.channels_last)
        record("decode eager channels_last+benchmark", measure(device, decode, 3)[1])
        model.lcm_denoiser.unet.to(memory_format=torch.channels_last)
        record("denoiser graph channels_last+benchmark", graph_ms(device, denoise))
        torch.backends.cudnn.benchmark = False
        model.lcm_denoiser.unet.to(memory_format=torch.contiguous_format)
        from torch.profiler import ProfilerActivity, profile

        denoise()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            denoise()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(table)
        out["profile"] = table.splitlines()
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
