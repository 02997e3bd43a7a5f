"""TensorRT-RTX engines for the full-size SDXL-architecture graphs (random weights, fp16). Run on a GPU machine.

For each network asked for: export its ONNX graph with ``lcmla_sdk.export.export_model`` (batch 1, 1024 px, one
reference photo; no parity check) into a folder of its own, build its TensorRT-RTX engine with
``lcmla_sdk.engines.build_engines`` (which checks the parsed graph's inputs and outputs against the manifest), and
record export seconds, ONNX size, build seconds, engine size and host peak memory. Then it loads one engine the way
the runtime does, to record what a GPU the engines do not support (an H100 or H200: compute capability 9.0) is told,
and probes whether TensorRT-RTX builds for the current GPU (``ComputeCapability.CURRENT``) at all.

Results are merged by network into ``--json`` and written as a Markdown table to ``--markdown`` (so that two calls,
one network each, add up to one table)::

    python benchmarks/trt_rtx_build.py --networks kv_encoder --out /tmp/rtx --json $OUT/rtx.json --markdown $OUT/rtx.md

A device machine has no network: carry ``tensorrt-rtx-cu13-libs`` (95 MB, split in two halves over two calls and
joined there), ``tensorrt-rtx-cu13-bindings`` for the machine's Python (3.12 on the lent H100s) and
``onnx-graphsurgeon`` (the export's graph clean-up), all from ``pip download --no-deps``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from lcmla_sdk import ModelFilesError, Personalizer
from lcmla_sdk.engines import BuildOptions, EngineMismatchError, TensorRTRTX, build_engines
from lcmla_sdk.engines.engine import Engine
from lcmla_sdk.export import ShapeRanges, export_model
from lcmla_sdk.export.graphs import onnx_files
from lcmla_sdk.manifest import Manifest
from lcmla_sdk.presets import preset_config


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def export_and_build(model: Personalizer, name: str, folder: Path, ranges: ShapeRanges) -> dict:
    start = time.perf_counter()
    export_model(model, folder, ranges, [name], log=lambda line: print(line, flush=True))
    exported = time.perf_counter()
    entry = Manifest.load(folder).networks[name]
    row = {
        "export_seconds": round(exported - start, 1),
        "onnx_gib": round(sum(p.stat().st_size for p in onnx_files(folder / entry.onnx)) / 1024**3, 3),
        "profile": {"min": entry.profile.min, "opt": entry.profile.opt, "max": entry.profile.max},
        "inputs": len(entry.inputs),
        "outputs": len(entry.outputs),
    }
    torch.cuda.empty_cache()  # the ahead-of-time build runs on the host
    try:
        manifest = build_engines(folder, BuildOptions("fp16"), log=lambda line: print(line, flush=True),
                                 backend=TensorRTRTX())  # fmt: skip
    except (ModelFilesError, RuntimeError) as error:  # a graph the parser rejects, or I/O unlike the manifest's
        return {**row, "build_error": str(error), "host_peak_gib": round(host_peak_gib(), 1)}
    entry = manifest.networks[name]
    return {
        **row,
        "build_seconds": round(time.perf_counter() - exported, 1),
        "engine_mib": round((folder / entry.engine).stat().st_size / 1024**2, 1),
        "io": "parsed graph's names, dtypes and dims equal the manifest's",  # build_engines raises otherwise
        "tensorrt": manifest.tensorrt,
        "host_peak_gib": round(host_peak_gib(), 1),
    }


def refusals(model: Personalizer, name: str, folder: Path) -> dict:
    """What loading says on this GPU: through the runtime (manifest check) and the engine itself (TensorRT-RTX's
    validity check before deserialising)."""
    found = {}
    try:
        model.use_exported(folder, backend="tensorrt-rtx")
        found["use_exported"] = "loaded"
    except EngineMismatchError as error:
        found["use_exported"] = str(error)
    entry = Manifest.load(folder).networks[name]
    try:
        Engine(folder / entry.engine, entry, TensorRTRTX()).load()
        found["engine_load"] = "loaded"
    except EngineMismatchError as error:
        found["engine_load"] = str(error)
    return found


def probe_current_target() -> str:
    """Whether TensorRT-RTX compiles a one-layer network for this GPU (``ComputeCapability.CURRENT``) and loads it."""
    import tensorrt_rtx_bindings as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(TensorRTRTX().network_flags(trt))
    relu = network.add_activation(network.add_input("x", trt.float16, (1, 8)), trt.ActivationType.RELU)
    network.mark_output(relu.get_output(0))
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return "build for the current GPU failed (see the log above)"
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    return "built and loaded" if engine is not None else "built, but not loadable (see the log above)"


def table(results: dict) -> str:
    rows = ["| network | export s | ONNX GiB | TensorRT-RTX build s | engine MiB | host peak GiB |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in results["networks"].items():
        built = f"{row['build_seconds']} | {row['engine_mib']}" if "build_error" not in row else f"failed: {row['build_error'][:200]} | -"
        rows.append(f"| {name} | {row['export_seconds']} | {row['onnx_gib']} | {built} | {row['host_peak_gib']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="kv_encoder,denoiser_lcm")
    parser.add_argument("--out", type=Path, required=True, help="one export folder per network goes under it")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()

    results = json.loads(args.json.read_text()) if args.json.exists() else {"networks": {}}
    start = time.perf_counter()
    model = Personalizer.from_config(preset_config("sdxl"), device="cuda", dtype=torch.float16, label="sdxl")
    results.update(device=torch.cuda.get_device_name(),
                   compute_capability=".".join(map(str, torch.cuda.get_device_capability())),
                   load_seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    ranges = ShapeRanges((1, 1, 1), (args.size,) * 3, (args.size,) * 3, (1, 1, 1))
    names = args.networks.split(",")
    for name in names:
        results["networks"][name] = export_and_build(model, name, args.out / name, ranges)
        print(json.dumps({name: results["networks"][name]}), flush=True)
        args.json.write_text(json.dumps(results, indent=1))
    built = [name for name in names if "build_error" not in results["networks"][name]]
    if built:
        results["refusal"] = refusals(model, built[0], args.out / built[0])
    try:
        results["current_target_probe"] = probe_current_target()
    except Exception as error:  # the probe reports whatever TensorRT-RTX does on this GPU, never stops the run
        results["current_target_probe"] = f"{type(error).__name__}: {error}"
    args.json.write_text(json.dumps(results, indent=1))
    args.markdown.write_text(table(results) + "\n")
    print(table(results))
    print(json.dumps({k: v for k, v in results.items() if k != "networks"}, indent=1))


if __name__ == "__main__":
    main()
