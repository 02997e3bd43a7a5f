"""Probe: how the eager decode's upsamplers should interleave their phases on the GPU (issue 19).

The library's decode network (:func:`lcmla_sdk.decoding.decode_network`) run eagerly, alone in a CUDA graph, at batch
1 and 8, 1024^2, with each way of laying the four phases of :func:`lcmla_sdk.upsampling.upsample_conv` out into the
full-size output, against diffusers' own decode: milliseconds, the peak memory of one uncaptured decode, and the
largest difference to diffusers' output. Prints a table and writes JSON.

    python benchmarks/eager_upsample_probe.py --out $OUT/eager_upsample.json      # on the GPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from compile_probe import DEVICE, PRESET, network_call
from kernel_probe import first

import lcmla_sdk.upsampling as upsampling
from lcmla_sdk import Personalizer
from lcmla_sdk.bench_timing import graph_ms
from lcmla_sdk.decoding import decode_network

library_way = upsampling.upsample_conv


def phases_of(x, conv):
    channels, (height, width) = conv.out_channels, x.shape[-2:]
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    phases = torch.nn.functional.conv2d(x, upsampling.phase_kernels(conv.weight), bias, padding=1)
    phases = phases.unflatten(1, (2, 2, channels))
    return [[phases[:, a, b, :, a : a + height, b : b + width] for b in (0, 1)] for a in (0, 1)], channels, height, width


def stacked(x, conv):
    views, channels, height, width = phases_of(x, conv)
    return torch.stack([torch.stack(row, -1) for row in views], -3).reshape(-1, channels, 2 * height, 2 * width)


def in_place(layout):
    def run(x, conv):
        views, channels, height, width = phases_of(x, conv)
        fmt = layout(x)
        out = torch.empty(x.shape[0], channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device, memory_format=fmt)
        grid = out.view(x.shape[0], channels, height, 2, width, 2)
        for a in (0, 1):
            for b in (0, 1):
                grid[:, :, :, a, :, b] = views[a][b]
        return out

    return run


VARIANTS = {
    "library": library_way,
    "stacked": stacked,
    "in_place_contiguous": in_place(lambda x: torch.contiguous_format),
    "in_place_channels_last": in_place(lambda x: torch.channels_last),
    "contiguous_input_stacked": lambda x, conv: stacked(x.contiguous(), conv),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = Personalizer.from_pretrained(PRESET, device=DEVICE, cuda_graphs=False)
    results = []
    for rows in map(int, args.rows.split(",")):
        vae_decode, inputs = network_call(model, "vae", rows, False)
        copy = decode_network(vae_decode.vae)
        with torch.inference_mode():
            reference = first(vae_decode(*inputs))
            for name, way in [("diffusers", None), *VARIANTS.items()]:
                module = vae_decode if way is None else copy
                upsampling.upsample_conv = way or library_way
                cuda = model.device.type == "cuda"
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0
                out = first(module(*inputs))
                peak = torch.cuda.max_memory_allocated() - base if cuda else 0
                row = {"rows": rows, "way": name, "peak_gib": peak / 2**30,
                       "max_abs_diff": (out.float() - reference.float()).abs().max().item(),
                       "ms": graph_ms(model.device, lambda: module(*inputs), 10 if rows > 1 else 20)}  # fmt: skip
                del out
                print(json.dumps(row), flush=True)
                results.append(row)
        upsampling.upsample_conv = library_way
    print("| rows | way | ms | peak GiB | max abs diff to diffusers |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['way']} | {r['ms']:.2f} | {r['peak_gib']:.2f} | {r['max_abs_diff']:.2e} |")
    if args.out:
        args.out.write_text(json.dumps({"info": {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__},
                                        "rows": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
