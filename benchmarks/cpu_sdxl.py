"""Full-size SDXL (the ``sdxl`` preset, random weights) on the CPU: one fast image, timed, with its peak memory.

Run one size per process, so the peak resident memory is that size's own:
``PYTHONPATH=. python benchmarks/cpu_sdxl.py --size 512 --dtype bfloat16``. For a size too slow to run whole,
``--steps 2`` runs part of it: the first step also holds the face, text and K/V set-up, the second is a plain step
whose time extrapolates to the 4 steps of fast mode. Prints one JSON line (results: docs/CPU.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from lcmla_sdk import Personalizer
from lcmla_sdk.images import sample_face


def resident_bytes() -> int:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    begin = time.perf_counter()
    model = Personalizer.from_pretrained("sdxl", device="cpu", dtype=getattr(torch, args.dtype), faces=None)
    loaded = time.perf_counter()
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    after_load = resident_bytes()
    marks = []
    model.generate(sample_face(), "A photo of a face", mode="fast", steps=args.steps, seed=0, height=args.size,
                   width=args.size, callback=lambda *_: marks.append(time.perf_counter()))  # fmt: skip
    done = time.perf_counter()
    print(json.dumps({
        "size": args.size, "steps": args.steps, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "load_s": round(loaded - begin, 1), "generate_s": round(done - loaded, 1),
        # before the first step: face encoding, text, the K/V pass's setup; after the last: the VAE decode
        "step_s": [round(b - a, 1) for a, b in zip([loaded, *marks], marks)],
        "decode_s": round(done - marks[-1], 1),
        # building the random weights peaks above what the loaded model then holds
        "load_peak_rss_gib": round(load_peak / 2**20, 2), "rss_after_load_gib": round(after_load / 2**30, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
