"""Device run for the compiled networks: build the folder (timed), then `lcmla bench` of some modes and ways
against it, or a cold start. The Python API, as the device has no CLI dependencies.

    python benchmarks/compiled_bench.py build  --folder /tmp/compiled --out $OUT/build.json
    python benchmarks/compiled_bench.py bench  --folder /tmp/compiled --modes fast --out $OUT/bench_fast.json
    python benchmarks/compiled_bench.py cold   --folder /tmp/compiled --out $OUT/cold.json
"""

import argparse
import json
import time
from pathlib import Path

from lcmla_sdk.bench import WAYS, BenchConfig, run_bench, table
from lcmla_sdk.bench_compiled import cold_start
from lcmla_sdk.engines.compiled import build_compiled, parse_shapes

parser = argparse.ArgumentParser()
parser.add_argument("what", choices=("build", "bench", "cold"))
parser.add_argument("--folder", type=Path, required=True)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--shapes", default="fast:1:1024x1024,fast:8:1024x1024,quality:1:1024x1024")
parser.add_argument("--modes", default="fast,quality")
parser.add_argument("--ways", default=",".join(WAYS))
parser.add_argument("--iters", type=int, default=2)
parser.add_argument("--batch", type=int, default=8, help="the throughput batch of fast mode (1: latency only)")
parser.add_argument("--no-network-rows", action="store_true", help="skip timing each network alone first")
args = parser.parse_args()
if args.what == "build":
    begin = time.perf_counter()
    manifest = build_compiled("sdxl", args.folder, parse_shapes(args.shapes), "cuda", jobs=4)
    manifest["wall_s"] = time.perf_counter() - begin
    args.out.write_text(json.dumps(manifest, indent=1))
    print(f"built in {manifest['wall_s']:.0f} s")
elif args.what == "cold":
    seconds = cold_start("sdxl", args.folder, 1024, "cuda")
    args.out.write_text(json.dumps(seconds))
    print("cold start: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
else:
    config = BenchConfig(iters=args.iters, modes=tuple(args.modes.split(",")), ways=tuple(args.ways.split(",")),
                         compiled=str(args.folder), batch=args.batch, network_rows=not args.no_network_rows)  # fmt: skip
    print(table(run_bench(config, path=args.out)))
