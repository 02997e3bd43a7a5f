"""Probe: what stopping the K/V-encoder at its last K/V projection gives (issue 19).

The K/V-encoder at the loop's shapes (1024^2 images, the face's latents), alone in a CUDA graph, eager and compiled
(Inductor, default mode, static shapes), run to the end of the up block that holds its last K/V layer (as before)
and stopped at that layer's projection (the library's way), with the largest difference of the K/V. Prints one
JSON line a row and writes JSON.

    python benchmarks/kv_stop_probe.py --rows 1,4 --compile-rows 4 --out $OUT/kv_stop.json      # on the GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from compile_probe import DEVICE, PRESET, network_call

from lcmla_sdk import Personalizer
from lcmla_sdk.bench_timing import graph_ms
from lcmla_sdk.networks import KVEncoder


def whole_block(module: KVEncoder) -> KVEncoder:
    """The same encoder (weights shared) that runs the last K/V layer's up block to its end."""
    copy = KVEncoder(module.unet, module.num_layers)
    copy._ends_in = lambda block: False
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--compile-rows", default="4", help="rows compiled too ('' for none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    model = Personalizer.from_pretrained(PRESET, device=DEVICE, cuda_graphs=False)
    compile_rows = {int(r) for r in args.compile_rows.split(",") if r}
    results = []
    for rows in map(int, args.rows.split(",")):
        stopped, inputs = network_call(model, "kv", rows, False)
        whole = whole_block(stopped)
        with torch.inference_mode():
            reference = whole(*inputs)
            diff = max((a - b).abs().max().item() for a, b in zip(stopped(*inputs), reference))
            row = {"rows": rows, "eager_max_abs_diff": diff,
                   "whole_block_ms": graph_ms(model.device, lambda: whole(*inputs), 20),
                   "stopped_ms": graph_ms(model.device, lambda: stopped(*inputs), 20)}  # fmt: skip
            if rows in compile_rows:
                for key, module in (("whole_block", whole), ("stopped", stopped)):
                    begin = time.perf_counter()
                    fast = torch.compile(module, dynamic=False)
                    out = fast(*inputs)
                    row[f"{key}_compile_s"] = time.perf_counter() - begin
                    row[f"{key}_compiled_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(out, reference))
                    row[f"{key}_compiled_ms"] = graph_ms(model.device, lambda: fast(*inputs), 20)
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        info = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__}
        args.out.write_text(json.dumps({"info": info, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
