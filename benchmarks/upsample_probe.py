"""Probe: what the upsamplers computed by phases (:mod:`lcmla_sdk.upsampling`) give the decode and the UNets (issue 19).

For each network, diffusers' module and a copy of it whose upsamplers (nearest 2x + 3x3 convolution) run as one 2x2
convolution per output phase (for the decode: the library's decode network, whose attention also runs by
``WideHeadAttnProcessor``), each alone in a CUDA graph at the probe's shapes, eager and compiled (Inductor,
default mode, static shapes), with the largest difference of the outputs. ``--profile``: the compiled decode's
kernels by GPU time (outside a graph). Prints one JSON line a row and writes JSON. A CPU dry run:
``PROBE_PRESET=tiny PROBE_DEVICE=cpu PROBE_SIZE=128``.

    python benchmarks/upsample_probe.py --networks vae,lcm,kv --out $OUT/upsample.json      # on the GPU
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from compile_probe import DEVICE, PRESET, network_call
from kernel_probe import first

from lcmla_sdk import Personalizer
from lcmla_sdk.bench_timing import graph_ms
from lcmla_sdk.compiling import VaeDecode
from lcmla_sdk.decoding import decode_network
from lcmla_sdk.lora import materialize
from lcmla_sdk.networks import Denoiser, KVEncoder
from lcmla_sdk.upsampling import PhaseUpsample2D, install_phase_upsampling


def phased(module: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A copy of ``module`` (weights shared) with its upsamplers computed by phases, and how many there are."""
    if isinstance(module, VaeDecode):
        copy = decode_network(module.vae)
        return copy, sum(isinstance(m, PhaseUpsample2D) for m in copy.modules())
    if isinstance(module, KVEncoder):
        copy = KVEncoder(materialize(module.unet, ()), module.num_layers)
    else:
        copy = Denoiser(materialize(module.unet, ()))
    return copy, install_phase_upsampling(copy)


def kernel_table(module, args, top: int = 14) -> list[dict]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        module(*args)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:90]] += event.device_time_total / 1000
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return [{"kernel": name, "ms": round(ms, 3)} for name, ms in ranked[:top]] + [{"kernel": "all", "ms": sum(totals.values())}]


def probe(model, network: str, rows: int, compiled: bool, profile: bool) -> dict:
    module, args = network_call(model, network, rows, False)
    copy, swapped = phased(module)
    row = {"network": network, "rows": rows, "upsamplers": swapped}
    with torch.inference_mode():
        reference, out = first(module(*args)), first(copy(*args))
        row["eager_max_abs_diff"], row["ref_abs_max"] = (out - reference).abs().max().item(), reference.abs().max().item()
        row["eager_ms"] = graph_ms(model.device, lambda: module(*args), 20)
        row["eager_phased_ms"] = graph_ms(model.device, lambda: copy(*args), 20)
        if compiled:
            for key, net in (("compiled", module), ("compiled_phased", copy)):
                begin = time.perf_counter()
                fast = torch.compile(net, dynamic=False)
                result = first(fast(*args))
                row[f"{key}_compile_s"] = time.perf_counter() - begin
                row[f"{key}_max_abs_diff"] = (result - reference).abs().max().item()
                row[f"{key}_ms"] = graph_ms(model.device, lambda: fast(*args), 20)
                if profile and model.device.type == "cuda":
                    row[f"{key}_kernels"] = kernel_table(fast, args)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="vae,lcm,kv", help="of vae, lcm, kv; optionally name:rows (kv:4)")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--profile", action="store_true", help="the compiled rows' kernels by GPU time")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    model = Personalizer.from_pretrained(PRESET, device=DEVICE, cuda_graphs=False)
    rows = []
    for item in args.networks.split(","):
        network, _, count = item.partition(":")
        row = probe(model, network, int(count or 1), not args.no_compile, args.profile)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_kernels")}), flush=True)
        rows.append(row)
    print("| network | rows | upsamplers | eager ms | phased | compiled ms | phased | max abs diff (compiled) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['rows']} | {r['upsamplers']} | {r['eager_ms']:.2f} | {r['eager_phased_ms']:.2f} | "
              f"{r.get('compiled_ms', float('nan')):.2f} | {r.get('compiled_phased_ms', float('nan')):.2f} | "
              f"{r.get('compiled_phased_max_abs_diff', r['eager_max_abs_diff']):.2e} |")
    if args.out:
        info = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__}
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
