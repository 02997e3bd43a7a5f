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


def in_place(layout):
    return lambda x, conv: upsampling.interleave_into(upsampling.phase_views(x, conv), layout)


def stacked(x, conv):
    return upsampling.interleave_stacked(upsampling.phase_views(x, conv))


VARIANTS = {
    "library": library_way,
    "stacked": stacked,
    "in_place_contiguous": in_place(torch.contiguous_format),
    "in_place_channels_last": in_place(torch.channels_last),
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
        device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
        info = {"device": device, "torch": torch.__version__}
        args.out.write_text(json.dumps({"info": info, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
