"""Where a fast batch-1 call's time goes, part by part: each step of ``Personalizer.generate`` (and the K/V pass
ahead and the sampling loop inside the denoising step) timed between CUDA synchronisations, over 5 calls after 3
warm-up calls, for the authors' pairing, the K/V cache and the K/V cache with the tiny VAE; ``plain_call_ms`` is the
same call with no synchronisation inside. Run on a GPU:

    python benchmarks/host_profile.py --out host.json [--folder /tmp/compiled]   # --folder: compiled networks
"""

import argparse
import collections
import json
import time
from pathlib import Path

import torch

import lcmla_sdk.network_set as network_set
import lcmla_sdk.pipeline as pipeline
from lcmla_sdk.bench_profile import Inputs
from lcmla_sdk.request import Request

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--folder", default=None, help="a compiled folder (lcmla export --backend torch) to load")
args = parser.parse_args()
model = pipeline.Personalizer.from_pretrained("sdxl", device="cuda", compiled=args.folder)
times = collections.defaultdict(list)


def timed(name, function):
    def run(*a, **k):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        result = function(*a, **k)
        torch.cuda.synchronize()
        times[name].append(1000 * (time.perf_counter() - begin))
        return result

    return run


with torch.inference_mode():
    x = Inputs(model, model.default_size)


WAYS = {"authors": {}, "kv_cache": {"kv_cache": True}, "kv_cache_tiny_vae": {"kv_cache": True, "vae": "tiny"}}


def call(way):
    return model.generate(x.identity, "a photo of a person", seed=0, mode="fast", output="pt", **WAYS[way])


plain_ms = {}
for way in WAYS:
    for _ in range(3):
        call(way)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(5):
        call(way)
    torch.cuda.synchronize()
    plain_ms[way] = (time.perf_counter() - begin) / 5 * 1000
for name in ("prompt_identities", "encode_prompt", "denoise", "decode"):
    setattr(model, name, timed(name, getattr(model, name)))
# What generate and denoise call by these names (the sampling loop through the model's NetworkSet).
for module, name in ((pipeline, "draw_per_prompt"), (pipeline, "ahead_kv"), (network_set, "sample")):
    setattr(module, name, timed(name, getattr(module, name)))
from_call, step_inputs = Request.from_call, Request.step_inputs
Request.from_call = classmethod(lambda cls, *a, **k: timed("from_call", from_call)(*a, **k))
Request.step_inputs = lambda self, *a, **k: timed("step_inputs", step_inputs)(self, *a, **k)
result = {"device": torch.cuda.get_device_name(), "folder": args.folder}
for way in WAYS:
    times.clear()
    for _ in range(5):
        timed("generate", lambda: call(way))()
    result[way] = {"plain_call_ms": plain_ms[way], **{name: sum(v) / len(v) for name, v in times.items()}}
print(json.dumps(result, indent=1))
args.out.write_text(json.dumps(result, indent=1))
