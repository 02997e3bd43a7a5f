"""Full-size SDXL-architecture export (random weights) with parity at a small resolution. Run on a GPU machine.

Prints a table and writes JSON: export seconds, ONNX sizes, parity max error per graph, host peak memory.
The face size is lowered (default 256 px) so the onnxruntime parity runs finish on a CPU; the graphs have the
production weights' size, and differ from a 1024 px face export only in the static face-latent dims.

    python benchmarks/export_fullsize.py --out /tmp/engines/sdxl --json result.json [--networks a,b]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from lcmla_sdk import Personalizer
from lcmla_sdk.export import ShapeRanges, export_model, parse_range
from lcmla_sdk.export.graphs import onnx_files
from lcmla_sdk.images import sample_face
from lcmla_sdk.presets import preset_config


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--networks", default=None)
    parser.add_argument("--face-size", type=int, default=256)
    parser.add_argument("--size", default="256:256:320", help="height and width range in pixels")
    parser.add_argument("--smoke", action="store_true", help="also time one fast and one quality generation")
    args = parser.parse_args()

    start = time.perf_counter()
    config = preset_config("sdxl")
    config["pipeline"]["face_size"] = args.face_size
    model = Personalizer.from_config(config, device="cuda", dtype=torch.float16, label="sdxl")
    result = {
        "device": torch.cuda.get_device_name(),
        "face_size": args.face_size,
        "size_range": args.size,
        "load_seconds": time.perf_counter() - start,
        "host_peak_gib_after_load": host_peak_gib(),
        "unet_params": sum(p.numel() for p in model.unet.parameters()),
    }
    sizes = parse_range(args.size, "size")
    report = export_model(
        model, args.out, ShapeRanges((1, 1, 1), sizes, sizes), args.networks.split(",") if args.networks else None,
        check=True, log=lambda line: print(line, flush=True),
    )  # fmt: skip
    result["networks"] = {
        name: {
            "export_seconds": round(report.seconds[name], 1),
            "onnx_gib": round(sum(p.stat().st_size for p in onnx_files(args.out / entry.onnx)) / 1024**3, 3),
            "parity_max_error": entry.parity["max_error"],
            "tolerance": entry.parity["tolerance"],
            "passed": entry.parity["passed"],
            "cases": [c["case"] for c in entry.parity["cases"]],
        }
        for name, entry in report.manifest.networks.items()
    }
    result["host_peak_gib"] = host_peak_gib()
    result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    if args.smoke:
        face = sample_face()
        for mode, steps in (("fast", 4), ("quality", 2)):
            model.generate(face, "A photo of a face", mode=mode, steps=steps, seed=0, output="latent")  # warm-up
            torch.cuda.synchronize()
            begin = time.perf_counter()
            latents = model.generate(face, "A photo of a face", mode=mode, steps=steps, seed=0, output="latent")
            torch.cuda.synchronize()
            result[f"eager_{mode}_{steps}_steps_1024_ms"] = (time.perf_counter() - begin) * 1000
            result[f"eager_{mode}_finite"] = bool(torch.isfinite(latents).all())
    print(f"\n{'network':16} {'export s':>9} {'ONNX GiB':>9} {'max err':>9} {'tol':>6}  ok")
    for name, row in result["networks"].items():
        print(f"{name:16} {row['export_seconds']:9.1f} {row['onnx_gib']:9.3f} {row['parity_max_error']:9.2e} "
              f"{row['tolerance']:6.0e}  {row['passed']}")  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "networks"}, indent=1))
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
