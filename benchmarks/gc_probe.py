"""Whether Python's garbage collector stalls the batch-1 calls of ``lcmla bench``: the default way (graphs, fast,
batch 1) timed call by call with every collection's pause in it, first in a fresh process, then after the bench's
diffusers and authors' ways have run (as `lcmla bench` orders them), then after ``gc.collect(); gc.freeze()``.

    python benchmarks/gc_probe.py --out $OUT/gc.json
"""

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from lcmla_sdk.bench import AuthorsWay, DiffusersWay, _lcmla
from lcmla_sdk.bench_profile import Inputs
from lcmla_sdk.bench_timing import sync
from lcmla_sdk.pipeline import Personalizer

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--calls", type=int, default=6)
parser.add_argument("--preset", default="sdxl")
args = parser.parse_args()

pauses: list[tuple[int, float]] = []  # (generation, ms) of each collection
started: list[float] = []


def on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        started.append(time.perf_counter())
    else:
        pauses.append((info["generation"], 1000 * (time.perf_counter() - started.pop())))


def timed_calls(run, x) -> list[dict]:
    calls = []
    for _ in range(args.calls):
        sync(model.device)
        pauses.clear()
        begin = time.perf_counter()
        run(x, 1, 4)
        sync(model.device)
        ms = 1000 * (time.perf_counter() - begin)
        calls.append({"ms": round(ms, 2), "gc_ms": round(sum(p for _, p in pauses), 2),
                      "collections": [[g, round(p, 2)] for g, p in pauses]})  # fmt: skip
    return calls


gc.callbacks.append(on_gc)
model = Personalizer.from_pretrained(args.preset)
results = {"device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"}
with torch.inference_mode():
    x = Inputs(model, model.default_size)
    graphs = _lcmla(model, "graphs", "fast")
    graphs(x, 1, 4)
    results["objects_fresh"] = len(gc.get_objects())
    results["fresh"] = timed_calls(graphs, x)
    for way in (DiffusersWay, AuthorsWay):
        other = way(model, "fast")
        for batch in (1, 8):
            other(x, batch, 4)
        del other
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    results["objects_after_other_ways"] = len(gc.get_objects())
    results["after_other_ways"] = timed_calls(graphs, x)
    gc.collect()
    gc.freeze()
    results["after_freeze"] = timed_calls(graphs, x)
for name in ("fresh", "after_other_ways", "after_freeze"):
    calls = results[name]
    print(name, [c["ms"] for c in calls], "gc ms", [c["gc_ms"] for c in calls])
print("objects", results["objects_fresh"], results["objects_after_other_ways"])
args.out.write_text(json.dumps(results, indent=1))
